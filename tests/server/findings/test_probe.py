"""The probe test: each site's local model on public texts, against the other sites' models."""

from tests.server.findings.conftest import probed_run


def test_local_models_on_public_texts_name_noisy_and_flipped_labels():
    usual = {f"s{i}": [0.02 + 0.01 * i, 0.06, 0.92 - 0.01 * i] for i in range(4)}
    noisy = probed_run({**usual, "x": [0.36, 0.30, 0.34]})
    assert set(noisy) == {("x", "label_noise")}
    assert "almost evenly (36%, 30%, 34%)" in noisy[("x", "label_noise")].message
    flipped = probed_run({**usual, "x": [0.93, 0.01, 0.06]})
    assert set(flipped) == {("x", "label_flip")}
    assert "predicts negative for 93% of public texts where the other sites' models predict positive" in \
        flipped[("x", "label_flip")].message
    assert probed_run(usual) == {} and probed_run({**usual, "x": [0.2, 0.2, 0.6]}) == {}  # a milder model: no claim
