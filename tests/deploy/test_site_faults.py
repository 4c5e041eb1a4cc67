"""Sites failing under a real deployment: a SuperNode killed in the middle of a round (the round completes with the
others, the failure is filed under the site's name, the site is picked up again when it comes back), a site
that sends NaN weights and, every other round, a fuzzed reply (two bad fields; rejected before aggregation, the
global model stays finite) and a hostile site sending,
one a round, each reply that used to end the ServerApp, and a claim of 10⁹ examples (each fails that site for the
round; the run completes)."""

import json

import numpy as np
import pytest

from common.checkpoints import Checkpoints
from tests.deploy.conftest import write_site_csv

pytestmark = pytest.mark.deploy
ROUNDS = 8
# Site e's replies, one a round: the train reply's weight of strings, infinite count, unknown status, Array with no
# bytes, Array declaring 10⁹ values; the evaluate reply's summary over 4 classes and summary cell of 1e200; a claim
# of 10⁹ training examples.
HOSTILE = ("string-array", "inf-examples", "bad-status", "empty-array", "huge-array", "summary-classes",
           "summary-overflow", "examples")
REFUSED_BY = {"string-array": "declares dtype '<U6'", "inf-examples": "'num-examples' = inf",
              "bad-status": "'status' = 'hacked'", "empty-array": "does not decode",
              "huge-array": "shape (1000000000,)"}


def test_a_killed_site_is_recorded_by_name_and_rejoins_and_a_nan_site_is_rejected(deployment):
    d = deployment
    sites = ("a", "b", "c", "d", "e")
    d.certs_for(*sites)
    d.start_link()
    data = {}
    d.register(*sites)
    for i, site in enumerate(sites):
        data[site] = write_site_csv(d.root / f"{site}.csv", seed=i)
        # Sites d and e are the drill's faulty sites: a real site applies a run's injected faults only if its operator
        # said so.
        d.start_site(site, data[site], extra=["--allow-injected-faults"] if site in ("d", "e") else None)

    # Rounds take ~4 s once the sites' runners are warm and a restarted site needs ~10-20 s to be back (its runner
    # checks its own install's digest, its SuperNode reconnects): enough rounds for it to be picked up again.
    d.run("faults", rounds=ROUNDS, **{"server.min-sites": 3, "server.round-timeout": 300.0,
                                 "faults": json.dumps([{"site": "d", "kind": "bad_update", "mode": ["nan", "fuzz"]},
                                                       {"site": "e", "kind": "bad_update", "mode": list(HOSTILE)}])})
    # kill -9 site c's SuperNode (and the ClientApp it started) as soon as its first training message arrives.
    d.wait_for(lambda: "Receiving: train message" in d.log("c"), 180, "site c to receive its first train message")
    d.kill("c")
    d.wait_for(lambda: 1 in d.rounds("faults"), 240, "round 1 to complete without c")
    d.start_site("c", data["c"])  # the same key, name and state folder: the site comes back
    assert d.wait_done("faults") == "completed", d.tails()

    rows = d.query("SELECT site, round, phase, status, reason FROM site_rounds WHERE run_id = 'faults' "
                   "AND phase = 'train'")
    by = {(s, r): (status, reason) for s, r, _, status, reason in rows}
    assert d.rounds("faults") == list(range(1, ROUNDS + 1))
    # Flower's error reply for a dead node comes from the SuperLink; it is still filed under c.
    assert by[("c", 1)][0] == "failed" and "unavailable" in by[("c", 1)][1].lower(), by[("c", 1)]
    assert not any(s.startswith("node-") for s, *_ in rows)
    assert any(by.get(("c", r), ("",))[0] == "ok" for r in range(2, ROUNDS + 1)), by  # picked up again
    assert all(by[(s, r)] == ("ok", "") for s in ("a", "b") for r in range(1, ROUNDS + 1))
    evaluated = {r: (status, reason) for s, r, phase, status, reason in
                 d.query("SELECT site, round, phase, status, reason FROM site_rounds WHERE run_id = 'faults' "
                         "AND phase = 'evaluate' AND site = 'e'")}
    for r in range(1, ROUNDS + 1):
        if r % 2:
            assert by[("d", r)][0] == "failed" and "update rejected" in by[("d", r)][1] and "NaN" in by[("d", r)][1]
        else:  # fuzzed
            assert by[("d", r)][0] == "failed" and by[("d", r)][1].startswith("malformed reply"), by[("d", r)]
        mode = HOSTILE[r - 1]
        if mode.startswith("summary"):  # trained and averaged; its evaluate reply refused
            assert by[("e", r)] == ("ok", "") and evaluated[r][0] == "failed", (mode, by[("e", r)], evaluated[r])
            assert evaluated[r][1].startswith("malformed reply: site e: summary"), (mode, evaluated[r])
            assert ("over 4 classes, expected 3" if mode == "summary-classes" else "beyond ±1e+09") \
                in evaluated[r][1], (mode, evaluated[r])
        elif mode == "examples":  # 10⁹ examples against the ~50 it declared: its update does not own the average
            assert by[("e", r)][0] == "failed", by[("e", r)]
            assert "update rejected: claims 1000000000 training examples" in by[("e", r)][1], by[("e", r)]
        else:  # each refused by its own check, in its own round
            assert by[("e", r)][0] == "failed", (mode, by[("e", r)])
            assert by[("e", r)][1].startswith("malformed reply: site e"), (mode, by[("e", r)])
            assert REFUSED_BY[mode] in by[("e", r)][1], (mode, by[("e", r)])
    findings = {(s, k) for s, k in d.query("SELECT site, kind FROM findings WHERE run_id = 'faults'")}
    assert ("d", "update_rejected") in findings and ("c", "site_failed") in findings
    final, _ = Checkpoints(d.store, "faults", keep=20).load(ROUNDS)
    assert all(np.all(np.isfinite(v)) for v in final.values())
