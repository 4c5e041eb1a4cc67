"""The label tests on synthetic releases (fedlens/detection_limits.py: a calibrated model, sites whose texts differ
a little in difficulty, release noise of the real σ at ε = 8 over 4 rounds): each label fault is named at its site
with its cause and a sentence with the right classes, shares and site counts; clean and merely skewed sites are
not flagged."""

import numpy as np
import pytest

from fedlens.detection_limits import Fault, summary_sigma, synthetic_run
from server.findings import Diagnosis
from server.findings.agreement import kind_of

NAMES = ("rotten", "fresh")


def _found(faults, *, n=2200, sigma=None, seed=0, **kw):
    """{(site, kind): finding} after the last round, and the round each key first appeared."""
    sigma = summary_sigma(8.0, 4) if sigma is None else sigma
    n_val = int(0.3 * n)
    d, first = Diagnosis(loss_clip=3.0, class_names=kw.pop("names", NAMES)), {}
    for rec in synthetic_run(faults, n_train=n - n_val, n_val=n_val, release_sigma=sigma, seed=seed, **kw):
        d.add(rec)
        for key in d.findings():
            first.setdefault(key, rec.round)
    return d.findings(), first


def _alarms(found):
    return {k: f for k, f in found.items() if f.severity != "info"}


def test_label_noise_is_named_at_its_site_with_its_rate():
    found, first = _found({"site-2": Fault("label_noise", 0.4)})
    assert set(_alarms(found)) == {("site-2", "label_noise")}, {k: f.message for k, f in found.items()}
    f = found[("site-2", "label_noise")]
    assert first[("site-2", "label_noise")] <= 3 and f.severity == "critical" and f.confidence >= 0.9
    assert f.message.startswith("site-2's labels disagree with what the model every site received predicts")
    assert "over 8 noised releases" in f.message  # 4 rounds × (validation, train)
    rate = int(f.message.split("about ")[1].split("%")[0])
    assert 30 <= rate <= 50  # r̂ = excess / (a − b): 40 % injected


def test_a_partial_flip_names_its_direction():
    # 60 % of fresh relabelled rotten: the texts the model reads as fresh carry the label rotten.
    found, _ = _found({"site-1": Fault("label_flip", 0.6, a=1, b=0)})
    assert set(_alarms(found)) == {("site-1", "label_flip")}, {k: f.message for k, f in found.items()}
    msg = found[("site-1", "label_flip")].message
    assert "texts the model every site received reads as fresh carry the label rotten" in msg
    assert "part of fresh looks relabelled as rotten" in msg and "-" not in msg.split("about ")[1][:4]


def test_a_class_swap_on_three_classes_is_a_flip_both_ways():
    names = ("negative", "neutral", "positive")
    found, _ = _found({"site-3": Fault("label_flip", 0.8, a=0, b=2)}, k=3, names=names,
                      shares=np.array([0.3, 0.2, 0.5]))
    assert set(_alarms(found)) == {("site-3", "label_flip")}
    assert "negative looks relabelled as positive" in found[("site-3", "label_flip")].message


def test_a_missing_class_is_told_from_a_flip_by_where_its_texts_went():
    # (Two sites without the same class among five leave no robust reference for it: one each way here.)
    found, _ = _found({"site-0": Fault("class_missing", 1.0, a=0), "site-4": Fault("label_flip", 1.0, a=1, b=0)})
    assert set(_alarms(found)) == {("site-0", "class_missing"), ("site-4", "label_flip")}, {
        k: f.message for k, f in found.items()}
    missing = found[("site-0", "class_missing")].message
    assert missing.startswith("site-0 holds no training examples of rotten (0% vs ") and "at the other 4 sites" in missing
    flip = found[("site-4", "label_flip")].message
    assert flip.startswith("site-4 holds no training examples labelled fresh (0%, others ")
    assert "fresh looks relabelled as rotten" in flip and "-" not in flip.split("(")[1][:3]


def test_corrupted_texts_are_a_data_shift_not_wrong_labels():
    found, _ = _found({"site-2": Fault("text_corruption", 0.6)})
    assert set(_alarms(found)) == {("site-2", "data_shift")}, {k: f.message for k, f in found.items()}
    assert "not its labels" in found[("site-2", "data_shift")].message


def test_clean_runs_stay_quiet():
    runs = [_found({}, seed=seed)[0] for seed in range(30)]
    alarms = [seed for seed, found in enumerate(runs) if _alarms(found)]
    assert len(alarms) <= 1, alarms
    # Nor does a clean site's texts read as another domain (a note, but a wrong one).
    assert not [seed for seed, found in enumerate(runs) if any(k[1] == "domain_difference" for k in found)]


def test_one_naturally_skewed_site_is_a_difference_not_a_fault():
    # Three quarters of its rows in one class, its labels right: the case a new user met as a critical label_flip.
    skewed = {"site-2": np.array([0.25, 0.75])}
    for seed in range(5):
        found, _ = _found({}, seed=seed, site_shares=skewed)
        assert _alarms(found) == {}, {k: f.message for k, f in found.items()}
        note = found.get(("site-2", "label_skew"))
        if note is not None:  # said when its labels affirmatively agree with the model as the others' do
            assert note.severity == "info" and "not a fault" in note.message and "noised releases" in note.message
            fresh = int(note.message.split("rotten, ")[1].split("% fresh")[0])
            assert 70 <= fresh <= 80  # its own mix (75 % drawn), not the others' 


def test_without_dp_the_evidence_says_exact_releases():
    found, _ = _found({"site-1": Fault("label_noise", 0.4)}, sigma=0.0)
    msg = found[("site-1", "label_noise")].message
    assert "exact releases" in msg and "noised" not in msg


@pytest.mark.parametrize("sites", [4, 6])
def test_sentences_count_the_runs_own_sites(sites):
    found, _ = _found({"site-0": Fault("class_missing", 1.0, a=1)}, sites=sites)
    assert f"at the other {sites - 1} sites" in found[("site-0", "class_missing")].message


def test_foreign_texts_the_model_reads_as_well_are_a_domain_difference_note():
    # Half its texts from another domain, read as confidently as the others' (the drug reviews at a movie site):
    # only the embedding block sees them; no fault is claimed, and no other site is touched.
    found, first = _found({"site-3": Fault("domain_shift", 0.5)})
    assert _alarms(found) == {}, {k: f.message for k, f in found.items()}
    note = found[("site-3", "domain_difference")]
    assert note.severity == "info" and first[("site-3", "domain_difference")] <= 3
    assert "in the encoder's space" in note.message and "not a fault" in note.message
    assert not any(k[1] == "domain_difference" for k in found if k[0] != "site-3")


def test_which_labels_went_wrong_is_read_off_the_pattern():
    # Rows given, columns predicted: (given rotten, read as fresh) is fresh relabelled as rotten.
    assert kind_of(np.array([[0.0, 0.08], [0.002, 0.0]])) == ("flip", 1, 0)
    # Two classes, uniform noise: both cells in proportion to the classes' shares (here 2 : 1): noise, not a flip.
    assert kind_of(np.array([[0.0, 0.06], [0.03, 0.0]]))[0] == "noise"
    assert kind_of(np.array([[0.0, 0.086], [0.014, 0.0]]))[0] == "noise"  # 86 % one-sided: still within noise
    # Three classes: two transposed cells are a swap, one cell a flip, a spread noise.
    swap = np.zeros((3, 3))
    swap[2, 0], swap[0, 2] = 0.05, 0.04
    assert kind_of(swap) == ("swap", 0, 2)
    one = np.zeros((3, 3))
    one[1, 2], one[0, 1] = 0.08, 0.01
    assert kind_of(one) == ("flip", 2, 1)
    assert kind_of(np.full((3, 3), 0.01) - np.diag([0.01] * 3))[0] == "noise"


def test_wrong_labels_stand_on_one_strong_reading_or_two_weaker_ones():
    from server.findings.agreement import Agreement
    from server.findings.labels import wrong_labels

    def ag(uz, second, rate=0.3):
        return Agreement(excess=0.1, scale=0.1 / uz, rate=rate, pattern=np.zeros((2, 2)), entries=8,
                         unexplained=0.1, unexplained_z=uz, confident_z=second)
    assert wrong_labels(ag(4.6, 1.9))  # the Dirichlet-site case: strong alone (Z_ALARM)
    assert not wrong_labels(ag(3.2, 1.9)) and wrong_labels(ag(3.2, 2.1))  # weaker: the second reading decides
    assert not wrong_labels(ag(2.9, 5.0))  # below Z_WRONG nothing does
    assert not wrong_labels(ag(6.0, 3.0, rate=0.05))  # an estimated share of wrong labels under MIN_RATE


def test_a_strong_reading_contradicted_by_the_confident_ones_is_not_wrong_labels():
    from server.findings.agreement import Agreement
    from server.findings.labels import wrong_labels

    # A Dirichlet site half of whose texts were drug reviews: unexplained 4.6, confident readings 0.1 and -0.5.
    ag = Agreement(excess=0.06, scale=0.06, rate=0.3, pattern=np.zeros((2, 2)), entries=8, unexplained=0.1,
                   unexplained_z=4.6, confident_z=0.1, calibrated_z=-0.5)
    assert not wrong_labels(ag)
    lean = {0.9: False, 1.0: True}  # Z_HINT: the confident readings must lean its way
    for second, found in lean.items():
        assert wrong_labels(Agreement(excess=0.06, scale=0.06, rate=0.3, pattern=np.zeros((2, 2)), entries=8,
                                      unexplained=0.1, unexplained_z=4.6, confident_z=second)) is found


def test_releases_at_a_model_that_cannot_tell_the_classes_apart_are_not_read():
    from server.findings.agreement import agreements, separates
    from server.findings.evidence import SiteEvidence

    learned = np.array([[70.0, 30.0], [25.0, 75.0]])  # a − b = 0.725 − 0.275
    # The largest site held one class and the model predicts it for every text: read per given label, a site
    # holding mostly the other class (the second) would look relabelled.
    one_class = [np.array([[1.0, 99.0], [0.0, 900.0]]), np.array([[2.0, 440.0], [1.0, 67.0]]),
                 np.array([[3.0, 80.0], [1.0, 240.0]]), np.array([[0.0, 210.0], [1.0, 6.0]])]
    assert separates([learned] * 3)
    assert not separates(one_class) and not separates([np.array([[52.0, 48.0], [47.0, 53.0]])] * 3)  # at chance
    sites = {f"s{i}": SiteEvidence(n_train=int(c.sum()), confusions={(2, "val"): (c, 25.0, float(c.sum()))})
             for i, c in enumerate(one_class)}
    assert agreements(sites) == {}
    for i, ev in enumerate(sites.values()):  # the next round's model learned: that release is read
        ev.confusions[(3, "val")] = (learned * (i + 1), 25.0, float(learned.sum()) * (i + 1))
    assert {s: a.entries for s, a in agreements(sites).items()} == {s: 1 for s in sites}


def test_a_large_site_with_wrong_labels_does_not_switch_off_its_own_reading():
    from server.findings.agreement import agreements, separates
    from server.findings.evidence import SiteEvidence

    honest = np.array([[80.0, 20.0], [20.0, 80.0]])
    swapped = np.array([[600.0, 2400.0], [2400.0, 600.0]])  # 6,000 of 6,800 examples, every label swapped
    # Pooled with it the model would read as if at chance (a − b = −0.46); the median site reads 0.6.
    assert separates([honest] * 4 + [swapped]) and separates([honest] * 3 + [swapped])
    sites = {f"s{i}": SiteEvidence(n_train=200, confusions={(2, "val"): (honest, 25.0, 200.0)}) for i in range(4)}
    sites["big"] = SiteEvidence(n_train=6000, confusions={(2, "val"): (swapped, 25.0, 6000.0)})
    ag = agreements(sites)
    assert set(ag) == set(sites) and ag["big"].excess > 0.5


def test_a_label_nobody_holds_is_not_read_for_the_separation():
    from server.findings.agreement import separates

    # Three classes, the third held by no site: its pooled row is release noise (~1/3 a cell).
    c = np.array([[50.0, 30.0, 20.0], [25.0, 52.0, 23.0], [1.0, 1.0, 1.0]])
    assert separates([c] * 3)  # 0.235 over the two labels held; read with the noise row, 0.177
