"""A 3-site deployment over TLS with SuperNode authentication completes a 2-round run; a SuperNode with an
unregistered key or without the CA is refused; sites whose data file is broken answer with an error naming the
site and the path, and the run goes on with the others."""

import json
import subprocess

import httpx
import pytest

from tests.deploy.conftest import BIN, free_port, write_site_csv

pytestmark = pytest.mark.deploy


def test_a_secure_three_site_deployment_survives_intruders_and_broken_files(deployment):
    d = deployment
    d.certs_for("a", "b", "c", "wrong-columns", "bad-encoding", "intruder", "impostor", "pinned")
    d.start_link()
    d.register("a", "b", "c", "wrong-columns", "bad-encoding", "impostor", "pinned")  # "intruder": not registered

    # Only the Fleet API is public: through the sites' address nobody registers a key or submits a run.
    out = d.flwr("supernode", "register", str(d.certs / "sites" / "intruder.pub"), "public", "--name", "intruder",
                 timeout=90)
    assert "registered successfully" not in out, out
    out = d.flwr("run", ".", "public", timeout=90)
    assert "Successfully started run" not in out, out
    ca = str(d.certs / "ca.crt")
    for api in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/get-nodes"):
        refused = httpx.post(f"https://127.0.0.1:{d.port}{api}", content=b"", verify=ca, timeout=30)
        assert refused.status_code == 404 and "only Flower's Fleet API" in refused.text, (api, refused.text)
    assert "intruder" not in d.flwr("supernode", "ls", "test")
    for i, site in enumerate(("a", "b", "c")):
        d.start_site(site, write_site_csv(d.root / f"{site}.csv", seed=i))
    (d.root / "cols.csv").write_text("note,stars\nfine,3\nbad,9\n")
    d.start_site("wrong-columns", d.root / "cols.csv")
    (d.root / "enc.csv").write_bytes(b"review,rating\n\xff\xfe broken,positive\nok,negative\n")
    d.start_site("bad-encoding", d.root / "enc.csv")
    intruder = d.start_site("intruder", None, extra=["--max-retries", "0"])
    plaintext = d.start("plaintext", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                      f"127.0.0.1:{d.port}", "--max-retries", "0", "--port", str(free_port())])
    # A site that pinned another app than the one the coordinator sends: it runs none of it.
    d.start_site("pinned", write_site_csv(d.root / "pinned.csv", seed=7), extra=["--app-digest", "0" * 64])
    # A registered node (its own key, registered as "impostor") that calls itself "a" in every reply.
    d.start("impostor", d.fedlens("site", "a", "--superlink", f"127.0.0.1:{d.port}", "--ca", ca, "--key",
                                  str(d.certs / "sites" / "impostor"), "--port", str(free_port()), "--state-dir",
                                  str(d.root / "state" / "impostor"), "--data",
                                  str(write_site_csv(d.root / "impostor.csv", seed=9))))

    # Refused: Flower's exit code 305 for both (reliability.md A1, A2); the process status is 305 mod 256 or 1.
    assert intruder.wait(timeout=60) != 0 and plaintext.wait(timeout=60) != 0
    assert "Exit Code: 305" in d.log("intruder") and "Failed to activate SuperNode" in d.log("intruder")
    assert "Exit Code: 305" in d.log("plaintext")

    d.run("secure", rounds=2, **{"server.min-sites": 7, "server.site-registry": str(d.certs / "registry.toml")})
    assert d.wait_done("secure") == "completed", d.tails()

    report = json.loads(subprocess.run([str(BIN / "fedlens"), "report", "--store", str(d.store), "--run", "secure",
                                        "--json"], capture_output=True, text=True, check=True).stdout)
    assert report["rounds_completed"] == 2
    sites = {s["site"]: s for s in report["sites"]}
    assert {"a", "b", "c"} <= set(sites) and "intruder" not in sites
    for name in "abc":  # each site's own lifetime ledger, under the default policy `fedlens site` wrote for it
        assert sites[name]["epsilon"] <= sites[name]["epsilon_lifetime"] <= sites[name]["epsilon_cap"] == 16.0
        assert {e["kind"] for e in sites[name]["ledger"]} == {"census", "dpsgd", "summary"}
    # a's ε is a's alone: its census, and one DP-SGD step and one summary a round, none of the impostor's.
    assert sorted(e["kind"] for e in sites["a"]["ledger"]) == ["census", "dpsgd", "dpsgd", "summary", "summary"]
    impersonations = [m for k, m in d.query("SELECT kind, message FROM events WHERE run_id = 'secure'")
                      if k == "site-impersonation"]
    assert impersonations and all("answered as a without a's registered key" in m for m in impersonations)
    rows = d.query("SELECT site, round, phase, status, reason FROM site_rounds WHERE run_id = 'secure'")
    ok = {(s, r) for s, r, phase, status, _ in rows if phase == "train" and status == "ok"}
    assert ok == {(s, r) for s in "abc" for r in (1, 2)}
    # The broken sites: named (not by their random node id), with the path and what was expected, every round.
    reasons = {(s, r, phase): reason for s, r, phase, status, reason in rows if status == "failed"}
    for r in (1, 2):
        assert "site wrong-columns:" in reasons[("wrong-columns", r, "train")]
        assert "cols.csv has no column(s) review, rating" in reasons[("wrong-columns", r, "train")]
        assert "enc.csv cannot be read as csv (UTF-8 expected)" in reasons[("bad-encoding", r, "train")]
    started = [m for k, m in d.query("SELECT kind, message FROM events WHERE run_id = 'secure'") if k == "site-failed"
               and "failed to start" in m]
    # Named with the file, never with the site's absolute path (it stays in the site's own log).
    # The pinned site never ran the app, so it never named itself: its error is filed under its node id.
    assert any(m.startswith("node-") and "is not one this site pinned (00000000" in m for m in started), started
    assert {r for s, r, phase, status, reason in rows if phase == "train" and "is not one this site pinned" in reason
            and s.startswith("node-")} == {1, 2}
    started = [m for m in started if not m.startswith("node-")]
    assert len(started) == 2 and any(m.startswith("wrong-columns failed to start: site wrong-columns: cols.csv") and
                                     "cols.csv has no column(s) review, rating" in m for m in started)
    assert not any(str(d.root) in m for m in started) and not any(str(d.root) in r for r in reasons.values())
    # TLS and authentication were on: the SuperLink was started that way and the sites dialled with their keys.
    assert "Uvicorn running on https://" in d.log("link")
