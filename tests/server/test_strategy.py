"""The round loop against a fake grid: failed, silent, refused and poisoned sites are recorded by name; the round goes on."""

from collections import OrderedDict
from dataclasses import replace
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import RecordDict

from common import diagnostics, records
from common.checkpoints import Checkpoints
from common.config import AppConfig
from common.run_store import RunWriter, load_run
from server.strategy import DebugFedAvg


class FakeGrid:
    """Answers each message at once with `behaviour[node](msg)`: a RecordDict, an Error, or None (stays silent)."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.replies = {}

    def get_node_ids(self):
        return list(self.behaviour)

    def push_messages(self, messages):
        from flwr.app import Error, Message

        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = mid = uuid4().hex
            ids.append(mid)
            out = self.behaviour[m.metadata.dst_node_id](m)
            if out is None:
                continue
            reply = Message(out, reply_to=m) if not isinstance(out, Error) else Message(out, reply_to=m)
            if isinstance(out, Error):
                reply.metadata.__dict__["_src_node_id"] = 1  # a dead node's error comes from the SuperLink
            self.replies[mid] = reply
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


GLOBAL = OrderedDict(w=np.zeros((2, 2), np.float32))


@pytest.fixture(autouse=True)
def task_identity():
    # Flower stamps messages with the identity of the running task; the real engines set it.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 7, 42, 1
K = 3
sent_thresholds = []


def site(name, *, arrays=None, refuse=False, claims=10):
    info = records.SiteInfo(name, 10, 5)

    def handle(msg):
        if msg.metadata.message_type == "query":
            return records.pack_hello(info)
        if msg.metadata.message_type.startswith("train"):
            got = records.unpack_arrays(msg.content)
            if refuse:
                return records.pack_train_reply(records.TrainReply(
                    records.SiteInfo(name, 10, 5, records.STATUS_REFUSED, f"{name}: budget"), None, 10, 7.9,
                    1e-5, 8.0, 1.0, 0.5, 0, 0.0))
            out = arrays if arrays is not None else OrderedDict((k, v + 1.0) for k, v in got.items())
            claimed = records.SiteInfo(name, claims, 5)  # a lying site lies everywhere in its reply
            return records.pack_train_reply(records.TrainReply(claimed, out, claims, 2.0, 1e-5, 8.0, 1.0, 0.5, 2,
                                                               0.1))
        blocks = diagnostics.empty_blocks(K)
        blocks["confusion"] = np.eye(K) * 2
        blocks["train_loss_sum"][0] = 2.0  # Σ min(loss, L) / L: × L = 3 / 10 train examples = 0.6
        blocks["self_confidence"][:] = 1.2  # 2 examples per class at mean confidence 0.6
        sent_thresholds.append(records.unpack_thresholds(msg.content))
        return records.pack_eval_reply(records.EvalReply(info, 5, 2.5, blocks, 3.0, 3 ** 0.5, 1, 1.5, 1.0))

    return handle


def make_strategy(writer, *, checkpoints=None, class_names=(), class_prior="released", **server):
    """The round loop under the pyproject defaults, with the few server settings a test changes."""
    cfg = replace(AppConfig.from_run_config({}).server, **{"min_sites": 2, "fraction_train": 1.0, "round_timeout": 0.5,
                                                           **server})
    return DebugFedAvg(cfg, writer=writer, loss_clip=3.0, checkpoints=checkpoints, class_names=class_names,
                       class_prior=class_prior)


def test_one_round_records_every_kind_of_site(tmp_path):
    from flwr.app import Error

    # Prepare
    behaviour = {
        11: site("good"),
        12: lambda m: records.pack_hello(records.SiteInfo("crashy", 10, 5)) if m.metadata.message_type == "query"
        else Error(code=2, reason="site crashy: data file /x.csv does not exist"),
        13: lambda m: records.pack_hello(records.SiteInfo("silent", 10, 5)) if m.metadata.message_type == "query" else None,
        14: site("poisoned", arrays=OrderedDict(w=np.full((2, 2), np.nan, np.float32))),
        15: site("broke", refuse=True),
        16: lambda m: records.pack_hello(records.SiteInfo("garbled", 10, 5)) if m.metadata.message_type == "query"
        else RecordDict(),
    }
    writer = RunWriter(tmp_path / "s.db", "r")
    writer.start(scenario="t", rounds_planned=1, model="m", config={})
    ckpt = Checkpoints(tmp_path / "s.db", "r", keep=3)
    strategy = make_strategy(writer, checkpoints=ckpt)
    # Execute
    final = strategy.run(FakeGrid(behaviour), GLOBAL, 1)
    # Assert: only the good site's update was averaged
    np.testing.assert_equal(final["w"], np.ones((2, 2), np.float32))
    run = load_run(tmp_path / "s.db", "r")
    train = {r["site"]: (r["status"], r["reason"]) for r in run["site_rounds"] if r["phase"] == "train"}
    assert train["good"] == ("ok", "")
    assert train["crashy"] == ("failed", "site crashy: data file /x.csv does not exist")
    assert train["silent"] == ("failed", "no reply before the timeout")
    assert train["poisoned"][0] == "failed" and "NaN" in train["poisoned"][1]
    assert train["broke"] == ("refused", "broke: budget")
    assert train["garbled"][0] == "failed" and train["garbled"][1].startswith("malformed reply: ")
    assert [r["sites_ok"] for r in run["rounds"]] == [1]
    # The sum of the noised confusion matrices of the 3 sites that answered the evaluation: eye(3) * 2 each
    assert run["rounds"][0]["accuracy"] == 1.0
    assert run["rounds"][0]["train_loss"] == pytest.approx(6.0 / 10)
    # Every spend the sites reported is in the ledger: the refusing site still released its summary, and the
    # poisoned site spent ε on training even though its update was then rejected.
    assert [(e["site"], e["kind"], e["noise_multiplier"]) for e in run["ledger"]] == [
        ("broke", "summary", 3.0), ("good", "dpsgd", 1.0), ("good", "summary", 3.0), ("poisoned", "dpsgd", 1.0),
        ("poisoned", "summary", 3.0)]
    # Round 1 has no thresholds yet; the next evaluation gets the noised mean self-confidence: 3.6 / 6 per class.
    assert sent_thresholds[-1] is None and strategy.thresholds == pytest.approx([0.6] * 3)
    # The round's weights are kept for what-if: the initial model, then the global and the one accepted update.
    assert ckpt.rounds() == [0, 1]
    kept_global, kept_updates = ckpt.load(1)
    assert list(kept_updates) == ["good"] and kept_updates["good"][1] == 10
    np.testing.assert_equal(kept_global["w"], final["w"])
    # Findings, committed with the round: the failures, the refusal and the rejected update, by site.
    assert sorted((f["site"], f["kind"]) for f in run["findings"]) == [
        ("broke", "budget_exhausted"), ("crashy", "site_failed"), ("garbled", "site_failed"),
        ("poisoned", "update_rejected"), ("silent", "site_failed")]
    kinds = [e["kind"] for e in run["events"]]
    assert kinds.count("site-joined") == 6 and "update-rejected" in kinds and "site-refused" in kinds


def test_a_round_with_no_usable_update_keeps_the_model_and_says_so(tmp_path):
    writer = RunWriter(tmp_path / "s.db", "r")
    writer.start(scenario="t", rounds_planned=1, model="m", config={})
    behaviour = {1: site("p", arrays=OrderedDict(w=np.full((2, 2), np.inf, np.float32))),
                 2: site("q", arrays=OrderedDict(w=np.zeros((3,), np.float32)))}
    final = make_strategy(writer).run(FakeGrid(behaviour), GLOBAL, 1)
    np.testing.assert_equal(final["w"], GLOBAL["w"])
    assert "round-skipped" in [e["kind"] for e in load_run(tmp_path / "s.db", "r")["events"]]


def test_hostile_weights_and_counts_are_rejected_before_averaging(tmp_path):
    # FedAvg alone lets a ×1e30 update or a site claiming 10⁹ examples own the average (reliability.md B1-B3).
    writer = RunWriter(tmp_path / "s.db", "r")
    writer.start(scenario="t", rounds_planned=1, model="m", config={})
    behaviour = {1: site("good"), 2: site("scaled", arrays=OrderedDict(w=np.full((2, 2), 1e30, np.float32))),
                 3: site("inflated", claims=10**9), 4: site("empty", claims=0)}
    final = make_strategy(writer, max_update_norm=1e4).run(FakeGrid(behaviour), GLOBAL, 1)
    np.testing.assert_equal(final["w"], np.ones((2, 2), np.float32))  # the good site's update alone
    run = load_run(tmp_path / "s.db", "r")
    reasons = {r["site"]: r["reason"] for r in run["site_rounds"] if r["phase"] == "train"}
    assert reasons["good"] == ""
    assert "update norm 2e+30 exceeds server.max-update-norm 10000" in reasons["scaled"]
    assert "claims 1000000000 training examples; expected 1..10" in reasons["inflated"]
    assert "claims 0 training examples" in reasons["empty"]
    assert sorted(f["site"] for f in run["findings"] if f["kind"] == "update_rejected") == [
        "empty", "inflated", "scaled"]


@pytest.mark.parametrize("outlier, quarantine", [(20.0, True), (0.0, True), (0.0, False)])
def test_an_update_many_times_the_median_norm_is_left_out_of_the_average(tmp_path, outlier, quarantine):
    # A site making hundreds of local passes sent 450× the others' norm; averaged in, it left the model at chance.
    writer = RunWriter(tmp_path / "s.db", "r")
    writer.start(scenario="t", rounds_planned=1, model="m", config={})
    behaviour = {i: site(f"s{i}") for i in range(1, 4)}
    behaviour[4] = site("far", arrays=OrderedDict(w=np.full((2, 2), 100.0, np.float32)))  # norm 200, median 2
    final = make_strategy(writer, update_norm_outlier=outlier, quarantine=quarantine).run(
        FakeGrid(behaviour), GLOBAL, 1)
    run = load_run(tmp_path / "s.db", "r")
    far = next(r for r in run["site_rounds"] if r["phase"] == "train" and r["site"] == "far")
    assert far["status"] == "ok" and far["update_norm"] == pytest.approx(200.0)  # it trained; the findings read it
    if outlier:
        np.testing.assert_equal(final["w"], np.ones((2, 2), np.float32))  # the three others' mean
        assert far["reason"] == ("left out of the average: its update norm 200 is 100× the round's median 2 "
                                 "(server.update-norm-outlier 20)")
        assert [e["site"] for e in run["events"] if e["kind"] == "update-excluded"] == ["far"]
    elif quarantine:  # the cross-site rules name it diverging in this round: it is kept out of this round's average
        np.testing.assert_equal(final["w"], np.ones((2, 2), np.float32))
        assert far["reason"] == "left out of the average: quarantined as a divergence (server.quarantine)"
        divergence = next(f for f in run["findings"] if f["kind"] == "divergence")
        assert divergence["site"] == "far" and divergence["message"].endswith("it was left out of the average")
    else:  # both off: FedAvg by examples, 10 each
        np.testing.assert_allclose(final["w"], np.full((2, 2), (3 + 100) / 4, np.float32))
        assert far["reason"] == ""


def test_too_few_sites_is_an_event_then_a_failure_with_the_reason(tmp_path):
    # Flower's sampling would wait forever without a word.
    writer = RunWriter(tmp_path / "s.db", "r")
    writer.start(scenario="t", rounds_planned=1, model="m", config={})
    strategy = make_strategy(writer, min_sites=3, wait_for_sites=11.5)
    with pytest.raises(TimeoutError, match=r"only 1 site\(s\) connected after 1\d s; server.min-sites is 3"):
        strategy.run(FakeGrid({1: site("lonely")}), GLOBAL, 1)
    events = load_run(tmp_path / "s.db", "r")["events"]
    assert [e["message"] for e in events if e["kind"] == "waiting-for-sites"] == [
        "waiting for sites: 1 connected, server.min-sites = 3"]


def test_the_round_loop_stores_each_sites_aggregation_score(tmp_path):
    writer = RunWriter(tmp_path / "s.db", "r")
    writer.start(scenario="t", rounds_planned=1, model="m", config={})
    behaviour = {i: site(f"s{i}", arrays=OrderedDict(w=np.full((2, 2), float(i), np.float32))) for i in range(1, 4)}
    make_strategy(writer, aggregation="krum").run(
        FakeGrid(behaviour), GLOBAL, 1)
    scores = {r["site"]: r["aggregation_score"] for r in load_run(tmp_path / "s.db", "r")["site_rounds"]
              if r["phase"] == "train"}
    # Krum with f = 1 of 3: each site's distance to its one nearest update (4 values apart by 1 or 2 per cell).
    assert scores == {"s1": 4.0, "s2": 4.0, "s3": 4.0}
    # The updates' geometry is stored beside it: s1..s3 all moved every value up from GLOBAL, the same direction.
    cosines = {r["site"]: (r["update_cosine"], r["update_cosine_median"])
               for r in load_run(tmp_path / "s.db", "r")["site_rounds"] if r["phase"] == "train"}
    assert cosines == {s: (pytest.approx(1.0), pytest.approx(1.0)) for s in ("s1", "s2", "s3")}


def test_excluded_sites_are_not_asked_to_train_and_weights_scale_the_average(tmp_path):
    writer = RunWriter(tmp_path / "s.db", "r")
    writer.start(scenario="t", rounds_planned=1, model="m", config={})
    behaviour = {1: site("a", arrays=OrderedDict(w=np.full((2, 2), 4.0, np.float32))),
                 2: site("b", arrays=OrderedDict(w=np.full((2, 2), 1.0, np.float32))),
                 3: site("c", arrays=OrderedDict(w=np.full((2, 2), 100.0, np.float32)))}
    final = make_strategy(writer, exclude=("c",), weights="a=0.5").run(FakeGrid(behaviour), GLOBAL, 1)
    np.testing.assert_allclose(final["w"], np.full((2, 2), (4.0 * 5 + 1.0 * 10) / 15, np.float32))
    rows = load_run(tmp_path / "s.db", "r")["site_rounds"]
    assert {r["site"] for r in rows if r["phase"] == "train"} == {"a", "b"}
    assert {r["site"] for r in rows if r["phase"] == "evaluate"} == {"a", "b", "c"}  # c is still evaluated


def test_cross_site_evaluation_sends_the_accepted_local_models_and_stores_the_matrix(tmp_path):
    seen = {}

    def scoring(name, value):
        inner = site(name, arrays=OrderedDict(w=np.full((2, 2), value, np.float32)))

        def handle(msg):
            if msg.metadata.message_type.startswith("train") or msg.metadata.message_type == "query":
                return inner(msg)
            models = records.unpack_local_models(msg.content)
            seen[name] = list(models)
            blocks = diagnostics.empty_blocks(K)
            blocks["confusion"] = np.eye(K) * 2
            # "correct" = the model's weight value: s1 -> 1, s2 -> 2 (of 5 validation examples), noised to 7 once
            cross = np.array([float(m["w"][0, 0]) for m in models.values()])
            if models and name == "s3":
                cross[-1] += 5.0
            return records.pack_eval_reply(records.EvalReply(records.SiteInfo(name, 10, 5), 5, 2.5, blocks, 3.0,
                                                             2.0, 1, 1.5, 1.0, cross=cross if models else None,
                                                             cross_models=tuple(models)))
        return handle

    behaviour = {1: scoring("s1", 1.0), 2: scoring("s2", 2.0), 3: scoring("s3", 2.0),
                 4: site("bad", arrays=OrderedDict(w=np.full((2, 2), np.nan, np.float32)))}
    writer = RunWriter(tmp_path / "s.db", "r")
    writer.start(scenario="t", rounds_planned=1, model="m", config={})
    make_strategy(writer, cross_site_eval=True).run(
        FakeGrid(behaviour), GLOBAL, 1)
    # Every site is sent the accepted local models (not the rejected NaN one), in site order.
    assert seen == {s: ["s1", "s2", "s3"] for s in ("s1", "s2", "s3")}
    from common.run_store import load_summaries

    rows = load_summaries(tmp_path / "s.db", "r")
    assert rows["s1"]["cross_site"]["models"] == ["s1", "s2", "s3"]
    assert rows["s1"]["cross_site"]["accuracy"] == [0.2, 0.4, 0.4]
    assert rows["s3"]["cross_site"]["correct"] == [1.0, 2.0, 7.0] and rows["s3"]["cross_site"]["accuracy"][2] == 1.0
    # Three models: each count's noise std is σ·Δ·√3 with Δ = 2.
    assert rows["s1"]["cross_site"]["noise_std"] == pytest.approx(3.0 * 2.0 * 3 ** 0.5)
    assert rows["s1"]["noise_std"]["confusion"] == pytest.approx(6.0)
    # Off (the default): evaluate instructions carry no local model.
    seen.clear()
    writer = RunWriter(tmp_path / "t.db", "r")
    writer.start(scenario="t", rounds_planned=1, model="m", config={})
    make_strategy(writer).run(FakeGrid(behaviour), GLOBAL, 1)
    assert seen == {s: [] for s in ("s1", "s2", "s3")}
