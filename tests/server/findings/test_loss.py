"""The first-use training loss test on synthetic noised releases."""

from tests.server.findings.conftest import released_run


def test_a_site_whose_loss_stays_high_with_ordinary_labels_is_a_data_shift():
    found = released_run({}, loss={"site-2": 1.6, "site-0": 1.0, "site-1": 1.05, "site-3": 0.95, "site-4": 1.0},
                         n=300)
    assert set(found) == {("site-2", "data_shift")}
    assert "training loss stays at 1.58 while the other sites' median is 1.01" in \
        found[("site-2", "data_shift")][1].message
