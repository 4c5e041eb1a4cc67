"""The whole server side (SuperLink, SuperExec and the ServerApp) killed with -9 in the middle of round 2 and
restarted: `flwr run` with the same store.run-id resumes from the last completed round. No round is lost or
counted twice, every site's ε is exactly that of a run that was never interrupted, and the diagnosis goes on from
the stored rounds (a finding recorded before the crash is not recorded again after it)."""

import json

import pytest

from client import privacy
from tests.deploy.conftest import write_site_csv

pytestmark = pytest.mark.deploy
SITES = ("a", "b", "c")
CONFIG = {"server.min-sites": 3, "faults": json.dumps([{"site": "c", "kind": "bad_update", "mode": "nan"}])}


def _site_ledger(d, site):
    """This run's entries in the site's own lifetime ledger (on its disk, across the crash)."""
    path = d.root / "state" / site / "lifetime.json"
    saved = json.loads(path.read_text())["entries"] if path.is_file() else []
    return [privacy.LedgerEntry(**{k: v for k, v in e.items() if k not in ("run_id", "fingerprint")})
            for e in saved if e["run_id"] == "resume"]


def test_a_killed_server_resumes_from_the_last_completed_round_with_exact_epsilon(deployment):
    d = deployment
    d.certs_for(*SITES)
    d.start_link()
    d.register(*SITES)
    for i, site in enumerate(SITES):
        # Site c sends NaN weights every round (it trains and charges first): a finding from round 1 on.
        d.start_site(site, write_site_csv(d.root / f"{site}.csv", seed=i),
                     extra=["--allow-injected-faults"] if site == "c" else None)
    d.run("resume", rounds=3, **CONFIG)

    # Round 1 committed, and every site has trained round 2 and charged it: then the server side goes down.
    d.wait_for(lambda: d.rounds("resume") == [1], 300, "round 1 to complete")
    d.wait_for(lambda: all(any(e.round == 2 and e.kind == "dpsgd" for e in _site_ledger(d, s)) for s in SITES),
               180, "every site to train round 2")
    d.kill("link")
    assert d.rounds("resume") == [1] and d.status("resume") == "running"  # the ServerApp died without a word

    d.start_link()  # the same --database: the SuperLink keeps its nodes; the sites reconnect by themselves
    d.run("resume", rounds=3, **CONFIG)
    assert d.wait_done("resume") == "completed", d.tails()

    assert d.rounds("resume") == [1, 2, 3]
    rows = d.query("SELECT site, round, status FROM site_rounds WHERE run_id = 'resume' AND phase = 'train'")
    # every honest update of the resumed rounds used, c's refused each round
    assert sorted(rows) == [(s, r, "ok" if s != "c" else "failed") for s in SITES for r in (1, 2, 3)]
    # The findings tracker was rebuilt from the stored rounds: c's finding stays the one of round 1.
    assert d.query("SELECT round FROM findings WHERE run_id = 'resume' AND site = 'c' AND kind = 'update_rejected'") \
        == [(1,)]
    events = d.query("SELECT kind, round, message FROM events WHERE run_id = 'resume' AND kind = 'run-resumed'")
    assert events == [("run-resumed", 1, "resumed after round 1 from its checkpoint")]
    for site in SITES:
        ledger = _site_ledger(d, site)
        # The census once, then one DP-SGD segment and one summary per round: round 2 was answered again from the
        # site's saved reply, and the resumed run's hello reused the census.
        assert sorted((e.round, e.kind) for e in ledger) == [(0, "census")] + [
            (r, k) for r in (1, 2, 3) for k in ("dpsgd", "summary")]
        reported = d.query("SELECT epsilon FROM site_rounds WHERE run_id = 'resume' AND site = ? AND round = 3 "
                           "AND phase = 'evaluate'", (site,))[0][0]
        # The server's ledger of the run (one row per round and kind) gives the same ε as the site reports.
        rows = d.query("SELECT round, kind, mechanism, noise_multiplier, sample_rate, steps, sensitivity FROM ledger "
                       "WHERE run_id = 'resume' AND site = ?", (site,))
        assert len(rows) == 7
        straight = privacy.epsilon([privacy.LedgerEntry(*r) for r in rows], 1e-5)
        assert reported == pytest.approx(straight, rel=1e-9)
        assert reported == pytest.approx(privacy.epsilon(ledger, 1e-5), rel=1e-12)
    assert "Receiving: train message" in d.log("a")
