"""Simulation only: data faults change a site's rows as declared, and the ClientApp misbehaves as told (parsing a
scenario's faults: tests/common/test_config.py)."""

import numpy as np
import pandas as pd
import pytest

from client.faults import corrupt_rows
from common.config import at_site
from common.config import parse_faults as parse
from common.datasets import LABEL, TEXT


def _rows(n=1000):
    rng = np.random.default_rng(0)
    return pd.DataFrame({TEXT: ["the medicine works well"] * n, LABEL: rng.integers(0, 3, n)})


def test_data_faults_change_the_rows_as_declared():
    rows = _rows()
    noisy = corrupt_rows(rows, at_site(parse('[{"site": "s", "kind": "label_noise", "rate": 0.3}]'), "s"),
                         num_classes=3, seed=1)
    changed = (noisy[LABEL] != rows[LABEL]).mean()
    assert 0.25 < changed < 0.35  # every hit moves to another label
    flipped = corrupt_rows(rows, at_site(parse('[{"site": "s", "kind": "label_flip", "from": 2, "to": 0}]'), "s"),
                           num_classes=3, seed=1)
    assert (flipped[LABEL] != 2).all() and (flipped[LABEL] == 0).sum() == (rows[LABEL] != 1).sum()
    missing = corrupt_rows(rows, at_site(parse('[{"site": "s", "kind": "class_missing", "class": 1}]'), "s"),
                           num_classes=3, seed=1)
    assert 1 not in set(missing[LABEL]) and len(missing) == (rows[LABEL] != 1).sum()
    garbled = corrupt_rows(rows, at_site(parse('[{"site": "s", "kind": "text_corruption", "rate": 0.5}]'), "s"),
                           num_classes=3, seed=1)
    same = np.mean([a == b for g, r in zip(garbled[TEXT], rows[TEXT], strict=True) for a, b in zip(g, r, strict=True)])
    assert 0.48 < same < 0.56  # half the characters replaced (a random letter matches 1 time in 26)
    assert at_site(parse('[{"site": "s", "kind": "crash"}]'), "other") == {}  # other sites are untouched


def test_partial_flips_swaps_class_conditional_noise_and_skew_change_only_their_classes():
    rows = _rows()
    y = rows[LABEL].to_numpy()

    def apply(fault):
        return corrupt_rows(rows, at_site(parse(f'[{{"site": "s", {fault}}}]'), "s"), num_classes=3,
                            seed=1)[LABEL].to_numpy()

    part = apply('"kind": "label_flip", "from": 2, "to": 0, "share": 0.4')
    assert 0.33 < ((y == 2) & (part == 0)).sum() / (y == 2).sum() < 0.47 and (part[y != 2] == y[y != 2]).all()
    swap = apply('"kind": "label_flip", "from": 2, "to": 0, "share": 1.0, "swap": true')
    assert (swap[y == 2] == 0).all() and (swap[y == 0] == 2).all() and (swap[y == 1] == 1).all()
    cond = apply('"kind": "label_noise", "rate": 0.5, "classes": [1]')
    assert (cond[y != 1] == y[y != 1]).all() and 0.4 < (cond[y == 1] != 1).mean() < 0.6
    skewed = corrupt_rows(rows, at_site(parse('[{"site": "s", "kind": "label_skew", "class": 1, "keep": 0.2}]'),
                                        "s"), num_classes=3, seed=1)
    kept = skewed[LABEL].to_numpy()
    assert (kept == 1).sum() == (y == 1).sum() and 0.12 < (kept != 1).sum() / (y != 1).sum() < 0.28


def test_a_domain_shift_can_bring_another_workloads_texts_under_labels_mapped_by_sentiment():
    from common.datasets import foreign_rows, load_movies

    drug = foreign_rows("drugreview", ("rotten", "fresh"))
    assert set(drug[LABEL]) == {0, 1} and len(drug) < 600  # the neutral reviews have no counterpart: dropped
    movies = load_movies(("rotten", "fresh"))
    assert not set(drug[TEXT]) & set(movies[TEXT])
    with pytest.raises(ValueError, match="domain_shift source must be one of"):
        foreign_rows("bbc", ("rotten", "fresh"))


def test_a_domain_shift_brings_reviews_of_conditions_the_site_never_held():
    from common.datasets import GROUP, load_drugreview

    reviews = load_drugreview("train", ("negative", "neutral", "positive"))
    rows = reviews[reviews[GROUP].isin(["Depression", "Anxiety"])].reset_index(drop=True)
    shifted = corrupt_rows(rows, at_site(parse('[{"site": "s", "kind": "domain_shift"}]'), "s"), num_classes=3,
                           seed=1, elsewhere=reviews)
    assert len(shifted) == len(rows) and not shifted[GROUP].isin(["Depression", "Anxiety"]).any()
    assert set(shifted[TEXT]) <= set(reviews[TEXT]) and not set(shifted[TEXT]) & set(rows[TEXT])


def test_the_client_app_crashes_free_rides_and_blows_up_as_told(tiny_cfg):
    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client import client_app
    from common import records
    from common.model import build_model, trainable_state
    from tests.conftest import TINY

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 7, 42, 1
    arrays = trainable_state(build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0))

    def train(fault, rnd=1):
        ctx = Context(run_id=42, node_id=100, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config={**TINY, "faults": f'[{{"site": "site-0", {fault}}}]'})
        msg = Message(content=records.pack_instruction(arrays, rnd, 2), message_type=MessageType.TRAIN, dst_node_id=1)
        msg.metadata.__dict__["_message_id"] = "m"
        return records.unpack_train_reply(client_app.train(msg, ctx).content)

    with pytest.raises(RuntimeError, match="site site-0: injected crash at round 2"):
        train('"kind": "crash", "round": 2', rnd=2)
    assert train('"kind": "crash", "round": 2', rnd=1).site.status == "ok"  # before its round it is fine
    echo = train('"kind": "free_rider"')
    assert echo.steps == 0 and echo.noise_multiplier == 0.0  # it never trained: no σ beside it
    assert all(np.array_equal(echo.arrays[k], arrays[k]) for k in arrays)
    rand = train('"kind": "free_rider", "mode": "random"')
    assert all(rand.arrays[k].shape == v.shape and not np.allclose(rand.arrays[k], v) for k, v in arrays.items())
    normal, blown = train('"kind": "straggler", "seconds": 0.01, "factor": 0.5'), train('"kind": "lr_blowup", "factor": 100')

    def moved(reply):
        return float(np.sqrt(sum(np.sum((reply.arrays[k] - arrays[k]) ** 2) for k in arrays)))

    assert moved(blown) > 5 * moved(normal)
    # Many epochs on few examples: σ and the budget check follow the schedule it really runs, so it cannot overspend.
    over = train('"kind": "overfit", "epochs": 20, "examples": 16')
    assert over.site.status == "ok" and over.steps == 20 and 0 < over.epsilon <= 8.0
    assert over.noise_multiplier > normal.noise_multiplier


@pytest.mark.parametrize("mode, error", [
    ("string-array", "declares dtype '<U6'"),
    ("inf-examples", "'num-examples' = inf, expected a whole number"),
    ("bad-status", "'status' = 'hacked', expected one of ok, refused, failed"),
    ("empty-array", "weight 'w'.* does not decode"),
    ("huge-array", r"weight 'w'.* shape \(1000000000,\)"),
])
def test_a_hostile_reply_fault_breaks_the_packed_message(mode, error):
    # The replies that ended the ServerApp before it validated every field, as a real site in a fault drill sends them.
    from collections import OrderedDict

    from client import faults
    from common import records

    weights = OrderedDict(w=np.zeros((2, 2), np.float32))
    content = records.pack_train_reply(records.TrainReply(records.SiteInfo("e", 10, 5), weights, 10, 1.0, 1e-5, 8.0,
                                                          1.0, 0.5, 2, 0.1))
    faults.break_message({"mode": mode, "round": 2}, 1, content)  # before its round: untouched
    records.unpack_train_reply(content, like=weights, num_classes=3)
    faults.break_message({"mode": mode, "round": 2}, 2, content, "evaluate")  # a train mode leaves evaluate alone
    records.unpack_train_reply(content, like=weights, num_classes=3)
    faults.break_message({"mode": mode, "round": 2}, 2, content)
    with pytest.raises(records.Malformed, match=error):
        records.unpack_train_reply(content, like=weights, num_classes=3)
    assert faults.break_reply({"mode": mode, "round": 1}, 2, weights, 10) == (weights, 10)  # weights left alone


@pytest.mark.parametrize("mode, error", [
    ("summary-classes", "summary is over 4 classes, expected 3"),
    ("summary-overflow", r"summary: 'calibration' .* beyond ±1e\+09"),
])
def test_a_hostile_summary_fault_breaks_the_evaluate_reply(mode, error):
    from client import faults
    from common import diagnostics, records

    blocks = {b.name: np.zeros(b.shape(3, 0)) for b in diagnostics.BLOCKS}
    content = records.pack_eval_reply(records.EvalReply(records.SiteInfo("e", 10, 5), 5, 1.0, blocks, 4.0, 2.0, 1))
    faults.break_message({"mode": mode, "round": 1}, 1, content)  # an evaluate mode leaves the train phase alone
    records.unpack_eval_reply(content, 3)
    faults.break_message({"mode": mode, "round": 1}, 1, content, "evaluate")
    with pytest.raises(records.Malformed, match=error):
        records.unpack_eval_reply(content, 3)


def test_a_list_of_bad_update_modes_is_taken_in_turn_one_a_round():
    from client import faults
    from common.config import parse_faults

    (fault,) = parse_faults('[{"site": "e", "kind": "bad_update", "mode": ["nan", "examples", "bad-status"], '
                            '"round": 2}]')
    assert [faults.bad_update_mode(fault, r) for r in range(1, 7)] == [None, "nan", "examples", "bad-status", "nan",
                                                                      "examples"]
    with pytest.raises(ValueError, match=r"faults\[0\] \(bad_update\): mode must be one of .* got \['nan', 'boom'\]"):
        parse_faults('[{"site": "e", "kind": "bad_update", "mode": ["nan", "boom"]}]')
    with pytest.raises(ValueError, match="non-empty list"):
        parse_faults('[{"site": "e", "kind": "bad_update", "mode": []}]')


def test_the_fuzz_drill_sends_a_malformed_train_reply_every_round():
    from collections import OrderedDict

    from client import faults
    from common import records

    weights = OrderedDict(w=np.zeros((2, 2), np.float32))
    drawn = set()
    for rnd in range(1, 31):
        content = records.pack_train_reply(records.TrainReply(records.SiteInfo("d", 10, 5), weights, 10, 1.0, 1e-5,
                                                              8.0, 1.0, 0.5, 2, 0.1))
        faults.break_message({"mode": "fuzz", "round": 1}, rnd, content)
        with pytest.raises(records.Malformed):
            records.unpack_train_reply(content, like=weights, num_classes=3)
        drawn |= {int(i) for i in np.random.default_rng(rnd).choice(len(faults.FUZZ), size=2, replace=False)}
    assert len(drawn) > len(faults.FUZZ) // 2  # the rounds draw across the catalogue, not one entry
