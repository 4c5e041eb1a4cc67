"""Step 4 (server/aggregate.py): each rule on hand-built arrays, and the checks an update passes before it is averaged."""

from collections import OrderedDict

import numpy as np
import pytest

from server.aggregate import aggregate, check_update, fedavg, median, update_geometry, update_norm


def _arrays(a, b):
    return OrderedDict(w=np.array(a, dtype=np.float32), b=np.array(b, dtype=np.float32))


def test_fedavg_weights_by_examples():
    # Prepare
    updates = {"a": (_arrays([[1.0, 2.0]], [0.0]), 10), "b": (_arrays([[3.0, 6.0]], [4.0]), 30)}
    # Execute
    avg = fedavg(updates)
    # Assert
    np.testing.assert_equal(avg["w"], np.array([[2.5, 5.0]], dtype=np.float32))
    np.testing.assert_equal(avg["b"], np.array([3.0], dtype=np.float32))
    assert list(avg) == ["w", "b"]


def test_fedavg_refuses_nothing_to_average():
    with pytest.raises(ValueError, match="cannot average 0 update"):
        fedavg({})
    with pytest.raises(ValueError, match="0 examples"):
        fedavg({"a": (_arrays([1.0], [1.0]), 0)})


def test_updates_with_nan_wrong_shape_or_keys_are_rejected_with_the_reason():
    ref = _arrays([[0.0, 0.0]], [0.0])
    assert check_update(_arrays([[1.0, 2.0]], [3.0]), ref) == ""
    assert check_update(_arrays([[np.nan, 2.0]], [3.0]), ref) == "weight w contains NaN or Inf"
    assert check_update(_arrays([[1.0]], [3.0]), ref) == "weight w has shape (1, 1), expected (1, 2)"
    assert "missing ['b']" in check_update(OrderedDict(w=ref["w"]), ref)


def test_update_norm_is_the_l2_distance_to_the_global_model():
    assert update_norm(_arrays([[3.0, 4.0]], [0.0]), _arrays([[0.0, 0.0]], [0.0])) == pytest.approx(5.0)


def test_update_geometry_compares_each_update_with_the_others_leaving_itself_out():
    g = OrderedDict(w=np.zeros(4, np.float32))
    along = {"a": [1, 1, 0, 0], "b": [1, 0.9, 0.1, 0], "c": [0.9, 1, 0, 0.1], "x": [-1, -1, 0, 0]}
    geo = update_geometry({s: OrderedDict(w=np.array(v, np.float32)) for s, v in along.items()}, g)
    assert geo["x"][0] < -0.99 and geo["x"][1] < -0.99  # points against the others
    # a's others: mean (0.3, 0.3, 0.033, 0.033) -> cos ≈ 0.994; median (0.9, 0.9, 0, 0) -> exactly along a.
    assert geo["a"][0] == pytest.approx(0.6 / np.sqrt(2) / np.linalg.norm([0.3, 0.3, 0.1 / 3, 0.1 / 3]), rel=1e-6)
    assert geo["a"][1] == pytest.approx(1.0)
    # Pure noise updates are near orthogonal in many dimensions: a site's own update is not in its reference.
    rng = np.random.default_rng(0)
    noise = {f"s{i}": OrderedDict(w=rng.normal(size=75_000).astype(np.float32)) for i in range(5)}
    assert max(abs(c) for pair in update_geometry(noise, OrderedDict(w=np.zeros(75_000, np.float32))).values()
               for c in pair) < 0.02
    assert update_geometry({"a": g, "b": g}, g) == {}  # two sites: no "others" to speak of


@pytest.mark.parametrize("method", ["median", "trimmed-mean", "krum"])
def test_robust_rules_bound_a_scaled_update_and_score_every_site(method):
    honest = {f"s{i}": (OrderedDict(w=np.full((2, 2), 1.0 + 0.01 * i, np.float32)), 10) for i in range(4)}
    hostile = {**honest, "x": (OrderedDict(w=np.full((2, 2), 1e6, np.float32)), 10)}
    out, scores = aggregate(hostile, method, trim_fraction=0.2, byzantine=1)
    assert np.all(np.abs(out["w"] - 1.0) < 0.05)  # FedAvg would give ~2e5
    assert set(scores) == set(hostile)
    if method == "krum":
        assert scores["x"] > 1e10 > max(v for s, v in scores.items() if s != "x")
    else:
        assert scores["x"] == 0.0 and max(scores.values()) == 1.0  # the outlier's values are never kept
    fedavg, none = aggregate(hostile, "fedavg")
    assert none == {} and fedavg["w"][0, 0] > 1e5


def test_median_is_coordinate_wise_and_unweighted_and_scores_the_middle():
    # Prepare: three sites, one far off in one coordinate; the counts must not matter.
    updates = {"a": (_arrays([[1.0, 5.0]], [0.0]), 1), "b": (_arrays([[2.0, 6.0]], [1.0]), 100),
               "c": (_arrays([[9.0, 7.0]], [2.0]), 1)}
    # Execute
    out, scores = median(updates)
    # Assert
    np.testing.assert_equal(out["w"], np.array([[2.0, 6.0]], np.float32))
    np.testing.assert_equal(out["b"], np.array([1.0], np.float32))
    assert scores == {"a": 0.0, "b": 1.0, "c": 0.0}  # only the middle value of each coordinate is kept
    assert aggregate(updates, "median")[0]["w"].tolist() == [[2.0, 6.0]]
    # Under three sites every rule is FedAvg (a median of two is their mean)
    two = {k: updates[k] for k in ("a", "b")}
    np.testing.assert_allclose(aggregate(two, "median")[0]["w"], fedavg(two)["w"])
    with pytest.raises(ValueError, match="server.aggregation must be one of"):
        aggregate(updates, "mean")
