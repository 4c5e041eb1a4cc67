"""No reply can crash a run: hostile and malformed replies against the round loop (a fake grid, the real strategy,
store and findings). Each bad site is failed for the phase with its reason; the honest sites' aggregate stands."""

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import diagnostics, records
from common.rounds import RoundRecord, SiteRoundRow
from common.run_store import RunWriter, load_run
from server.findings.cross_site import cross_site
from tests.server.test_strategy import GLOBAL, FakeGrid, K, make_strategy, site, task_identity  # noqa: F401

HONEST = ("h0", "h1", "h2", "h3", "h4")


def honest_round(tmp_path, hostile: dict, **server):
    """One round with the five honest sites (each +1 on every weight, 10 examples) beside `hostile` nodes; returns
    (final weights, stored run)."""
    behaviour = {i + 1: site(name) for i, name in enumerate(HONEST)}
    behaviour.update({100 + i: h for i, h in enumerate(hostile.values())})
    writer = RunWriter(tmp_path / "s.db", "r")
    writer.start(scenario="t", rounds_planned=1, model="m", config={})
    final = make_strategy(writer, class_names=("a", "b", "c"), **server).run(FakeGrid(behaviour), GLOBAL, 1)
    writer.finish("completed")
    return final, load_run(tmp_path / "s.db", "r")


def tampered(name, *, train=None, evaluate=None, hello=None, info=None):
    """A site answering like site(name) but passing each reply's RecordDict through the given function first."""
    honest = site(name) if info is None else None

    def handle(msg):
        kind = msg.metadata.message_type
        if info is not None and kind == "query":
            return records.pack_hello(info)
        out = (honest or site(name))(msg)
        fix = hello if kind == "query" else train if kind.startswith("train") else evaluate
        return fix(out) if fix is not None else out
    return handle


def set_in(record, key, value):
    def fix(content):
        content[record][key] = value
        return content
    return fix


def replace_weight(array):
    def fix(content):
        content.array_records[records.ARRAYS]["w"] = array
        return content
    return fix


def wrong_k_summary(content):
    s = content.config_records[records.SUMMARY]
    for b in diagnostics.BLOCKS:
        key = b.name.replace("_", "-")
        if key in s:
            s[key] = [0.0] * int(np.prod(b.shape(2, 0)))
    s["num-classes"] = 2
    return content


def summary_cell(block, value):
    def fix(content):
        s = content.config_records[records.SUMMARY]
        s[block] = [value] + list(s[block])[1:]
        return content
    return fix


CRASHERS = {
    # The five replies that ended the ServerApp before (issue 17), and two Arrays that escaped the same except.
    "string-typed array": ("train", tampered("x", train=replace_weight(Array(np.array([["a", "b"], ["c", "d"]]))))),
    "num-examples = inf": ("train", tampered("x", train=set_in(records.METRICS, records.NUM_EXAMPLES, float("inf")))),
    "unknown status": ("train", tampered("x", train=set_in(records.SITE, "status", "hacked"))),
    "duplicate site name": ("train", tampered("h0")),
    "summary over 2 classes": ("evaluate", tampered("x", evaluate=wrong_k_summary)),
    "empty Array": ("train", tampered("x", train=replace_weight(Array("float32", (2, 2), "numpy.ndarray", b"")))),
    "Array declaring 10^9 values": ("train", tampered("x", train=replace_weight(
        Array("float32", (10**9,), "numpy.ndarray", np.zeros(4, np.float32).tobytes())))),
    # Found by an independent review: finite values the findings engine squared into an OverflowError, a name that
    # is another node's placeholder (two rows under one key: the store's UNIQUE constraint), a name with a space
    # (its checkpoint file is the one of "h_1").
    "summary cell 1e200": ("evaluate", tampered("x", evaluate=summary_cell("calibration", 1e200))),
    "placeholder name": ("train", tampered("node-6")),
    "name with a space": ("train", tampered("h 1")),
}


@pytest.mark.parametrize("case", list(CRASHERS))
def test_a_hostile_reply_fails_its_site_not_the_run(tmp_path, case):
    phase, handler = CRASHERS[case]
    final, run = honest_round(tmp_path, {case: handler})
    np.testing.assert_equal(final["w"], np.ones((2, 2), np.float32))  # the honest sites' mean, untouched
    assert run["status"] == "completed" and [r["round"] for r in run["rounds"]] == [1]
    rows = [r for r in run["site_rounds"] if r["phase"] == phase]
    assert {r["site"] for r in rows if r["status"] == "ok"} >= set(HONEST)
    bad = [r for r in rows if r["status"] == "failed"]
    assert len(bad) == 1, rows
    if case in ("placeholder name", "name with a space"):
        assert bad[0]["site"].startswith("node-") and bad[0]["reason"].startswith("malformed reply: 'site' record")
    elif case == "duplicate site name":
        # Filed under the node's own id, never under the site it pretends to be; the impersonation is an event.
        assert bad[0]["site"].startswith("node-") and "a name node 1 holds in this run" in bad[0]["reason"]
        assert any(e["kind"] == "site-impersonation" for e in run["events"])
    else:
        assert bad[0]["site"] == "x"
        assert bad[0]["reason"].startswith(("malformed reply: ", "update rejected: ")), bad[0]["reason"]


def test_the_reasons_name_what_is_wrong(tmp_path):
    _, run = honest_round(tmp_path, {c: h for c, (_, h) in CRASHERS.items()
                                     if c not in ("duplicate site name", "placeholder name", "name with a space")})
    reasons = sorted(r["reason"] for r in run["site_rounds"] if r["status"] == "failed")
    assert any("'num-examples' = inf, expected a whole number in 0..1000000000" in r for r in reasons)
    assert any("'status' = 'hacked', expected one of ok, refused, failed" in r for r in reasons)
    assert any("summary is over 2 classes, expected 3 (data.labels)" in r for r in reasons)
    assert any("declares dtype '<U1'" in r for r in reasons)
    assert any("declares dtype 'float32', shape (1000000000,)" in r for r in reasons)


def test_a_site_claiming_a_billion_examples_does_not_own_the_average(tmp_path):
    # It declares 10⁹ when it joins and claims them when it trains; its update (+1.5, an ordinary norm) would be the
    # average uncapped.
    def liar(msg):
        if msg.metadata.message_type == "query":
            return records.pack_hello(records.SiteInfo("liar", 10**9, 5))
        return site("liar", arrays=OrderedDict(w=np.full((2, 2), 1.5, np.float32)), claims=10**9)(msg)

    final, run = honest_round(tmp_path, {"liar": liar})
    # Capped at 4 × the others' median (10 each): (5 × 10 × 1 + 40 × 1.5) / 90; the honest sites keep 5/9.
    np.testing.assert_allclose(final["w"], np.full((2, 2), (50 + 40 * 1.5) / 90, np.float32), rtol=1e-6)
    row = next(r for r in run["site_rounds"] if r["site"] == "liar" and r["phase"] == "train")
    assert row["status"] == "ok" and row["reason"] == (
        "its weight 1e+09 was capped at 40, 4× the other sites' median (server.max-weight-ratio)")
    assert [e["site"] for e in run["events"] if e["kind"] == "weight-capped"] == ["liar"]
    final, _ = honest_round(tmp_path / "off", {"liar": liar}, max_weight_ratio=0.0)
    np.testing.assert_allclose(final["w"], np.full((2, 2), 1.5, np.float32), rtol=1e-6)  # uncapped: it owns it


def test_a_site_answering_under_another_name_is_refused_and_filed_under_its_own(tmp_path):
    # "evil" joins under its own name, then sends its train and evaluate replies as h1.
    evil = tampered("h1", info=records.SiteInfo("evil", 10, 5))
    final, run = honest_round(tmp_path, {"evil": evil})
    np.testing.assert_equal(final["w"], np.ones((2, 2), np.float32))
    rows = [(r["site"], r["phase"], r["status"]) for r in run["site_rounds"] if r["site"] in ("evil", "h1")]
    assert sorted(rows) == [("evil", "evaluate", "failed"), ("evil", "train", "failed"),
                            ("h1", "evaluate", "ok"), ("h1", "train", "ok")]
    reasons = {r["reason"] for r in run["site_rounds"] if r["site"] == "evil"}
    assert reasons == {"identity refused: node 100 answered as h1, a name node 2 holds in this run"}
    # h1's ε is its own: one DP-SGD and one summary entry, not the impostor's too.
    assert [e["kind"] for e in run["ledger"] if e["site"] == "h1"] == ["dpsgd", "summary"]


# --- fuzzing: ≥ 10,000 malformed replies against the round loop -------------------------------------------------

SITE_KEYS = ("name", "n-train", "n-val", "status", "reason", "census-labels", "census-n-val", "census-noise",
             "census-run")
METRIC_KEYS = (records.NUM_EXAMPLES, "epsilon", "delta", "epsilon-budget", "noise-multiplier", "sample-rate",
               "steps", "seconds", "sensitivity", "epsilon-lifetime", "epsilon-cap", "started-at")
SUMMARY_KEYS = ("num-classes", "embedding-dims", "noise-multiplier", "sensitivity", "health-round", "confusion",
                "train-labels", "self-confidence", "cross-correct", "cross-models")
NUMBERS = st.sampled_from([-1, 0, 1, 2**31, 10**18, -(10**18), 0.5, -0.5, float("nan"), float("inf"),
                           float("-inf"), 1e308])
LISTS = st.lists(NUMBERS, max_size=12)
TEXT = st.sampled_from(["", "x", "ok", "failed", "refused", "h0", "h1", "a/b", "\x00", "é" * 500, "node-1"])
CONFIG_VALUES = st.one_of(NUMBERS, LISTS, TEXT, st.booleans(), st.just(b"\x00\xff"), st.lists(TEXT, max_size=4))
METRIC_VALUES = st.one_of(NUMBERS, LISTS)
ARRAYS = st.sampled_from([
    Array(np.full((2, 2), np.nan, np.float32)), Array(np.full((2, 2), 1e30, np.float32)),
    Array(np.ones((2, 2), np.float64)), Array(np.ones((2, 2), np.int32)), Array(np.ones((3, 2), np.float32)),
    Array(np.ones((4,), np.float32)), Array(np.array(["a"])), Array("float32", (2, 2), "numpy.ndarray", b""),
    Array("float32", (2, 2), "numpy.ndarray", b"\x93NUMPY garbage" * 3),
    Array("float32", (2**40,), "numpy.ndarray", b"x"), Array("float32", (-1,), "numpy.ndarray", b"x"),
    Array("int8", (2, 2), "numpy.ndarray", b"x"), Array("float32", (2, 2), "torch.Tensor", b"x"),
])

EXTREME = st.sampled_from([1e300, -1e300, 1e200, 1e9, -1e9, 1e-200, 0.0, -0.0])
MUTATION = st.one_of(
    st.tuples(st.just("config"), st.sampled_from((records.SITE, records.SUMMARY)),
              st.sampled_from(SITE_KEYS + SUMMARY_KEYS), CONFIG_VALUES),
    st.tuples(st.just("metric"), st.just(records.METRICS), st.sampled_from(METRIC_KEYS), METRIC_VALUES),
    st.tuples(st.just("drop-key"), st.sampled_from((records.SITE, records.METRICS, records.SUMMARY)),
              st.sampled_from(SITE_KEYS + METRIC_KEYS + SUMMARY_KEYS), st.none()),
    st.tuples(st.just("drop-record"), st.sampled_from((records.SITE, records.METRICS, records.SUMMARY,
                                                       records.ARRAYS)), st.none(), st.none()),
    st.tuples(st.just("array"), st.sampled_from(("w", "extra")), st.none(), ARRAYS),
    st.tuples(st.just("empty"), st.none(), st.none(), st.none()),
    # Right length, extreme values: what passes a shape check and must still not break the findings or the prior.
    st.tuples(st.just("fill"), st.sampled_from([b.name.replace("_", "-") for b in diagnostics.BLOCKS]
                                               + ["census-labels"]), st.none(), EXTREME),
    st.tuples(st.just("config"), st.just(records.SITE), st.just("census-noise"), EXTREME),
    st.tuples(st.just("config"), st.just(records.SUMMARY), st.just("noise-multiplier"), EXTREME),
)


def mutate(content: RecordDict, mutation) -> RecordDict:
    kind, record, key, value = mutation
    if kind == "empty":
        return RecordDict()
    if kind == "drop-record":
        if record in content:
            del content[record]
        return content
    if kind == "fill":
        where = content.config_records.get(records.SITE if record == "census-labels" else records.SUMMARY)
        if where is not None:
            size = K if record == "census-labels" else len(where.get(record, []))
            where[record] = [value] * size
        return content
    if kind == "array":
        if records.ARRAYS in content.array_records:
            content.array_records[records.ARRAYS][record] = value
        return content
    target = content.get(record) if record else None
    if target is None:
        return content
    if kind == "drop-key":
        if key in target:
            del target[key]
        return content
    try:
        target[key] = value
    except (TypeError, ValueError):  # Flower's records refuse the type: the wire cannot carry it either
        pass
    return content


def fuzzed_site(i: int, train_mutations, eval_mutations, hello_mutation):
    name = f"fuzz-{i}"

    def handle(msg):
        kind = msg.metadata.message_type
        out = site(name)(msg)  # its weights are the honest ones' (+1): an accepted mutation cannot move the mean
        if kind == "query":
            return mutate(out, hello_mutation) if hello_mutation is not None else out
        for m in train_mutations if kind.startswith("train") else eval_mutations:
            out = mutate(out, m)
        return out
    return handle


HOSTILE_SITES = 25  # × 2 replies (train, evaluate) × 200 examples = 10,000 malformed replies


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(st.lists(st.tuples(st.lists(MUTATION, min_size=1, max_size=3), st.lists(MUTATION, min_size=1, max_size=3),
                          st.one_of(st.none(), MUTATION)), min_size=HOSTILE_SITES, max_size=HOSTILE_SITES))
def test_fuzzed_replies_never_stop_the_run_nor_move_the_honest_aggregate(tmp_path_factory, plan):
    hostile = {i: fuzzed_site(i, *mutations) for i, mutations in enumerate(plan)}
    final, run = honest_round(tmp_path_factory.mktemp("fuzz"), hostile)
    np.testing.assert_array_equal(final["w"], np.ones((2, 2), np.float32))
    assert run["status"] == "completed" and len(run["rounds"]) == 1
    ok = {(r["site"], r["phase"]) for r in run["site_rounds"] if r["status"] == "ok"}
    assert {(s, p) for s in HONEST for p in ("train", "evaluate")} <= ok
    assert all(np.isfinite(v) for v in (run["rounds"][0]["accuracy"], run["rounds"][0]["loss"]))


def test_a_hello_that_would_break_the_prior_fails_its_site_not_the_run(tmp_path):
    # A census with a noise std of 1e-200 divided by zero in the prior's inverse-variance weights, at hello, before
    # any round; one of 10⁹ "exact" examples of one class set every site's loss prior.
    tiny = records.SiteInfo("tiny", 10, 5, census_labels=(3.0, 3.0, 4.0), census_noise=1e-200)
    liar = records.SiteInfo("liar", 10**9, 5, census_labels=(1e9, 0.0, 0.0), census_noise=0.0)
    honest = {n: tampered(n, info=records.SiteInfo(n, 10, 5, census_labels=(3.0, 3.0, 4.0), census_noise=2.0))
              for n in HONEST}
    behaviour = {i + 1: h for i, h in enumerate(honest.values())}
    behaviour.update({100: tampered("tiny", info=tiny), 101: tampered("liar", info=liar)})
    writer = RunWriter(tmp_path / "s.db", "r")
    writer.start(scenario="t", rounds_planned=2, model="m", config={})
    strategy = make_strategy(writer, class_names=("a", "b", "c"), class_prior="released")
    strategy.run(FakeGrid(behaviour), GLOBAL, 2)
    assert [r["round"] for r in load_run(tmp_path / "s.db", "r")["rounds"]] == [1, 2]
    prior = strategy.prior()
    assert all(np.isfinite(prior)) and prior[0] < 0.6  # the liar's 10⁹ counts as 4 × the others' median (10)


def test_quarantine_never_leaves_out_half_a_round(tmp_path):
    # Three sites on plain SGD: one sends an update whose noise reading is 0. Judged against a median it halved,
    # each honest site read 2× and both were quarantined as diverging, leaving the attacker's update alone.
    rows = [SiteRoundRow(site=s, phase="train", status="ok", update_norm=1.0, steps=5, sample_rate=0.5,
                         noise_scale=v) for s, v in (("a", 1.0), ("b", 1.02), ("evil", 0.0))]
    rec = RoundRecord(round=1, seconds=0.0, sites=rows)
    updates = {r.site: (GLOBAL, 10.0) for r in rows}
    writer = RunWriter(tmp_path / "s.db", "r")
    make_strategy(writer)._quarantine(updates, rec)
    assert sorted(updates) == ["a", "b", "evil"] and not any(r.left_out for r in rows)
    assert cross_site(rec, before_evaluation=True) == {}  # a reading of 0 is nobody's median


def test_the_engineers_weights_apply_after_the_cap(tmp_path):
    # server.weights multiplies what survived the cap: an engineer's 0.5 on a capped site is not undone.
    writer = RunWriter(tmp_path / "s.db", "r")
    writer.start(scenario="t", rounds_planned=1, model="m", config={})
    behaviour = {i + 1: site(n) for i, n in enumerate(HONEST[:3])}
    behaviour[9] = lambda m: (records.pack_hello(records.SiteInfo("big", 1000, 5)) if m.metadata.message_type
                              == "query" else site("big", arrays=OrderedDict(w=np.full((2, 2), 1.5, np.float32)),
                                                   claims=1000)(m))
    final = make_strategy(writer, weights="big=0.5").run(FakeGrid(behaviour), GLOBAL, 1)
    np.testing.assert_allclose(final["w"], np.full((2, 2), (30 * 1 + 20 * 1.5) / 50, np.float32), rtol=1e-6)
