"""Findings observed directly in a round: each rule fires on its evidence, with the sentence that justifies it."""

from server.findings.direct import observed
from tests.server.findings.conftest import round_record


def test_each_rule_fires_on_its_evidence_with_a_sentence():
    found = observed(round_record(3, share=0.97, snr=(0.2, 0.4), fail=True))
    assert set(found) == {("c", "budget_exhausted"), ("d", "update_rejected"), ("e", "site_failed"),
                          (None, "majority_collapse"), (None, "dp_noise_dominates")}
    assert found[("e", "site_failed")].severity == "critical"
    assert found[("e", "site_failed")].message == "e failed in train in round 3: no reply before the timeout"
    assert found[("d", "update_rejected")].message.endswith("weight w contains NaN or Inf")
    assert "97%" in found[(None, "majority_collapse")].message
    assert "at the top of its noise (+2 std), is 0.60 over the 2 sites" in (
        found[(None, "dp_noise_dominates")].message)  # median of 2·0.2 and 2·0.4 (no noise on these readings)
    # A reading whose own release noise could explain it does not fire the finding.
    noisy = round_record(3, snr=(0.2, 0.4))
    for r in noisy.sites:
        if r.phase == "evaluate" and r.signal_to_noise is not None:
            r.signal_to_noise_std = 0.5
    assert (None, "dp_noise_dominates") not in observed(noisy)
    assert set(observed(round_record(3))) == {("c", "budget_exhausted"), ("d", "update_rejected")}  # healthy otherwise
