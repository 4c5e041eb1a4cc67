"""The inputs' side on synthetic releases: a site whose texts the received model is less sure of, and disagrees
with more, is a data shift; a site whose loss alone is high is not."""

import numpy as np

from fedlens.detection_limits import Fault
from server.findings.agreement import Agreement
from server.findings.evidence import SiteEvidence
from server.findings.loss import data_shift
from tests.server.findings.test_labels import _found


def test_corrupted_texts_read_as_a_data_shift_with_both_readings_in_the_sentence():
    found, first = _found({"site-3": Fault("text_corruption", 0.6)})
    f = found[("site-3", "data_shift")]
    assert first[("site-3", "data_shift")] <= 3 and f.severity == "warning"
    assert f.message.startswith("site-3's texts read unlike the other sites' to the model every site received: its "
                                "mean confidence on them is 0.")
    assert "below the others'" in f.message and "more of their labels than at the other sites" in f.message
    assert "over 4 noised releases" in f.message


def test_a_high_loss_with_the_others_confidence_is_not_a_data_shift():
    ev = SiteEvidence(loss_sum=2 * 1.6, loss_rounds=2, loss_var_sum=2 * 0.01 ** 2, n_train=1000, noised=True,
                      confidence=[(0.8, 1e-4), (0.8, 1e-4)])
    calm = Agreement(excess=0.2, scale=0.02, rate=0.4, pattern=np.zeros((2, 2)), entries=4, confidence_drop=0.0,
                     confidence_z=0.0)
    assert data_shift("s", ev, calm, [1.0, 1.05, 0.95, 1.0]) is None  # wrong labels give a high loss too
    unsure = Agreement(excess=0.05, scale=0.02, rate=0.1, pattern=np.zeros((2, 2)), entries=4, confidence_drop=0.06,
                       confidence_z=6.0)
    f = data_shift("s", ev, unsure, [1.0, 1.05, 0.95, 1.0])
    assert f is not None and "its training loss stays at 1.60 against the others' median 1.00" in f.message
    assert data_shift("s", ev, unsure, None) is not None  # the disagreement (z = 2.5) corroborates alone
