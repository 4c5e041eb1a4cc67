"""The ClientApp as Flower calls it: the budget is enforced step by step against dp-accounting, and what a site
sends (serialised as Flower sends it) holds no text of its data and only the documented records."""

import logging
import re
from uuid import uuid4

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.serde import message_to_proto

from client import client_app
from client.site import NOT_PRIVATE
from common import diagnostics, records
from common.datasets import TEXT
from common.model import build_model, trainable_state
from tests.conftest import TINY


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 7, 42, 1


def _context(run_config, pid=0):
    return Context(run_id=42, node_id=100 + pid, node_config={"partition-id": pid, "num-partitions": 3},
                   state=RecordDict(), run_config=run_config)


def _message(content, message_type):
    msg = Message(content=content, message_type=message_type, dst_node_id=1)
    msg.metadata.__dict__["_message_id"] = uuid4().hex
    return msg


def _send(handler, ctx, arrays, rnd, rounds, message_type, thresholds=None):
    msg = _message(records.pack_instruction(arrays, rnd, rounds, thresholds), message_type)
    return client_app.app(msg, ctx) if handler is None else handler(msg, ctx)


def _dpa_epsilon(entries, delta):
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting drops orders it cannot converge on, noisily
    events = [dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), t) if q < 1
              else dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(s), t) for s, q, t in entries]
    acc = rdp.RdpAccountant()
    acc.compose(dpa.ComposedDpEvent(events))
    return acc.get_epsilon(delta)


def test_a_small_budget_stops_training_and_releases_exactly_when_the_next_step_would_cross_it(tiny_cfg):
    budget, sigma, release_sigma = 6.0, 1.0, 8.0
    run_config = {**TINY, "dp.target-epsilon": budget, "dp.noise-multiplier": sigma,
                  "dp.release-noise-multiplier": release_sigma, "num-server-rounds": 8}
    ctx = _context(run_config)
    arrays = trainable_state(build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0))

    # The site's census (its released sizes and label counts) is the run's first spend: σ = 10, Δ = 1.
    spent, outcomes = [(10.0, 1.0, 1)], []
    for rnd in range(1, 9):
        tr = records.unpack_train_reply(_send(client_app.train, ctx, arrays, rnd, 8, MessageType.TRAIN).content)
        ev = records.unpack_eval_reply(_send(client_app.evaluate, ctx, arrays, rnd, 8, MessageType.EVALUATE).content)
        # The same decision, made independently with dp-accounting: take a step only if it stays within budget.
        for kind, reply, entry in (("dpsgd", tr, (sigma, tr.sample_rate, tr.steps or
                                                  round(1 / tr.sample_rate) * tiny_cfg.train.local_epochs)),
                                   ("summary", ev, (release_sigma, 1.0, 1))):
            fits = _dpa_epsilon([*spent, entry], 1e-5) <= budget
            assert (reply.site.status == records.STATUS_OK) == fits, (rnd, kind, reply.site.reason)
            if fits:
                spent.append(entry)
            else:
                assert "would bring ε to" in reply.site.reason and f"budget {budget:g}" in reply.site.reason
            assert reply.epsilon <= budget + 1e-9
            assert reply.epsilon == pytest.approx(_dpa_epsilon(spent, 1e-5), rel=1e-3)
            outcomes.append((kind, fits))
    # Not vacuous: the site trained, then was stopped; summaries (cheaper) went on after training stopped.
    assert ("dpsgd", True) in outcomes and ("dpsgd", False) in outcomes
    assert outcomes.index(("dpsgd", False)) < max(i for i, o in enumerate(outcomes) if o == ("summary", True))
    # The split: training alone and diagnostics alone, each below the total (RDP composes sub-additively).
    assert 0 < ev.epsilon_diagnostics < ev.epsilon and 0 < ev.epsilon_training < ev.epsilon


def _printable_runs(blob: bytes) -> str:
    # Text in a serialised message would appear as a run of printable bytes; float arrays almost never do.
    return "\n".join(m.decode("ascii") for m in re.findall(rb"[\x20-\x7e]{12,}", blob))


def _windows(text: str, width: int = 16):
    ascii_only = text.encode("ascii", "ignore").decode()
    return [ascii_only[i:i + width] for i in range(0, max(1, len(ascii_only) - width), width)]


def test_no_text_and_no_undocumented_record_leaves_a_site(tiny_cfg):
    from client.data import SiteIdentity, load_site_data, site_rows
    from common.model import load_tokenizer

    run_config = {**TINY, "num-server-rounds": 2}
    arrays = trainable_state(build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0))
    sent = []
    for pid in range(2):
        ctx = _context(run_config, pid)
        sent.append(_send(None, ctx, None, 0, 2, MessageType.QUERY))
        for rnd in (1, 2):
            sent.append(_send(None, ctx, arrays, rnd, 2, MessageType.TRAIN))
            sent.append(_send(None, ctx, arrays, rnd, 2, MessageType.EVALUATE, [0.5, 0.5, 0.5]))
    blobs = [message_to_proto(m).SerializeToString() for m in sent]
    strings = "\n".join(_printable_runs(b) for b in blobs)

    rows = [site_rows(tiny_cfg.data, SiteIdentity(f"site-{p}", p, 3, "")) for p in range(2)]
    texts = [t for r in rows for t in r[TEXT]]
    hits = [w for t in texts for w in _windows(t) if w in strings]
    assert len(texts) > 200 and not hits
    # The scan does find text when there is some: a review fragment put into a reply's reason is caught.
    leaky = records.reply(records.pack_hello(records.SiteInfo("site-0", 1, 1, "ok", texts[0][:80])),
                          _message(RecordDict(), MessageType.QUERY))
    assert any(w in _printable_runs(message_to_proto(leaky).SerializeToString()) for w in _windows(texts[0][:80]))

    # Every record and key of every message is classified (records.OUTBOUND): public config echo, DP-SGD
    # weights, a noised and charged release, public metadata, status or coarse timing. Nothing else travels.
    for m in sent:
        for name, record in m.content.items():
            assert name in records.OUTBOUND, f"unclassified record {name!r} leaves the site"
            kinds = records.OUTBOUND[name]
            if isinstance(kinds, dict):
                assert set(record) <= set(kinds), f"unclassified keys {set(record) - set(kinds)} in {name!r}"
        site = m.content.config_records[records.SITE]
        # Add/remove neighbours: the sizes a site reports are its noised census, rounded; never the exact ones.
        assert site["n-train"] == max(1, round(sum(site["census-labels"])))
        assert site["census-noise"] == 10.0 and site["census-n-val"] != round(site["census-n-val"])
        metrics = m.content.metric_records.get(records.METRICS, {})
        for key in ("seconds", "diagnostics-seconds", "started-at", "ended-at"):
            if key in metrics:
                assert metrics[key] == round(metrics[key], 1)  # timings are coarsened
        if records.SUMMARY in m.content.config_records:
            s = m.content.config_records[records.SUMMARY]
            for b in diagnostics.BLOCKS:
                values = np.asarray(s[b.name.replace("_", "-")])
                assert values.dtype == np.float64 and values.size < 200  # aggregates, not per example
    exact = [np.bincount(load_site_data(tiny_cfg, SiteIdentity(f"site-{p}", p, 3, ""),
                                        load_tokenizer(tiny_cfg.model)).train.labels.numpy(), minlength=3)
             for p in range(2)]
    for pid in range(2):
        released = sent[pid * 5].content.config_records[records.SITE]["census-labels"]
        assert not np.allclose(released, exact[pid], atol=1e-6)  # the counts went out noised


def test_error_reasons_that_leave_a_site_carry_no_paths_and_no_data_values(tmp_path):
    data = tmp_path / "private" / "clinic.csv"
    data.parent.mkdir()
    data.write_text("review,rating\nfine,superb\n")  # a label outside data.labels: a data value
    ctx = Context(run_id=42, node_id=7, node_config={"site-name": "clinic", "data-path": str(data)},
                  state=RecordDict(), run_config={**TINY, "data.source": "files",
                                                                  "data.labels": "negative,neutral,positive"})
    reply = client_app.app(_message(records.pack_instruction(None, 0, 2), MessageType.QUERY), ctx)
    info = records.unpack_site(reply.content)
    assert info.status == records.STATUS_FAILED and "clinic.csv" in info.reason
    assert str(tmp_path) not in info.reason and "superb" not in info.reason
    # A crash inside a handler: the server gets the exception's type and message without paths, not a traceback.
    crash = client_app.app(_message(records.pack_instruction({"x": np.zeros(1)}, 1, 2), MessageType.TRAIN), ctx)
    assert crash.has_error() and str(tmp_path) not in crash.error.reason and "Traceback" not in crash.error.reason


def test_noise_makes_every_release_different_and_dp_off_sends_the_exact_summary(tiny_cfg):
    arrays = trainable_state(build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0))

    def summary(run_config):
        ctx = _context(run_config)
        return records.unpack_eval_reply(_send(client_app.evaluate, ctx, arrays, 1, 2, MessageType.EVALUATE).content)

    a, b = summary({**TINY, "dp.release-noise-multiplier": 1.0}), summary({**TINY, "dp.release-noise-multiplier": 1.0})
    assert not np.array_equal(a.blocks["confusion"], b.blocks["confusion"])
    exact1, exact2 = summary({**TINY, "dp.enabled": False}), summary({**TINY, "dp.enabled": False})
    assert exact1.noise_multiplier == 0 and exact1.epsilon == NOT_PRIVATE
    np.testing.assert_array_equal(exact1.blocks["confusion"], exact2.blocks["confusion"])
    assert exact1.blocks["confusion"].sum() == exact1.num_examples  # exact counts: every validation example


def test_a_zero_diagnostics_share_releases_nothing_and_spends_nothing_on_it(tiny_cfg):
    arrays = trainable_state(build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0))
    ctx = _context({**TINY, "dp.diagnostics-share": 0.0})
    ev = records.unpack_eval_reply(_send(client_app.evaluate, ctx, arrays, 1, 2, MessageType.EVALUATE).content)
    assert ev.blocks is None and ev.site.status == records.STATUS_OK and "diagnostics-share = 0" in ev.site.reason
    # Its only spend is the census (σ = 10, Δ = 1): ε ≈ 0.375 at δ = 1e-5.
    assert ev.epsilon == pytest.approx(_dpa_epsilon([(10.0, 1.0, 1)], 1e-5), rel=1e-3)
    assert ev.epsilon_diagnostics == 0.0 and ev.epsilon_training == 0.0


def test_cross_site_evaluation_scores_each_local_model_inside_the_one_release(tiny_cfg):
    from common.model import load_trainable_state, predict

    model = build_model(tiny_cfg.model, tiny_cfg.data.labels, seed=0)
    arrays = trainable_state(model)
    # Two "local models": the global one with its head nudged two ways (the frozen base is shared, as at sites).
    local = {}
    for name, shift in (("site-1", 3.0), ("site-2", -3.0)):
        moved = {k: v.copy() for k, v in arrays.items()}
        head = next(k for k in moved if k.endswith("bias") and moved[k].shape == (3,))
        moved[head] = moved[head] + np.array([shift, 0.0, -shift], np.float32)
        local[name] = moved

    def evaluate(run_config, models, pid=0):
        ctx = _context(run_config, pid)
        msg = _message(records.pack_instruction(arrays, 1, 2, None, local_models=models), MessageType.EVALUATE)
        return ctx, records.unpack_eval_reply(client_app.evaluate(msg, ctx).content)

    _, exact = evaluate({**TINY, "dp.enabled": False}, local)
    assert exact.cross_models == ("site-1", "site-2")
    from client.data import SiteIdentity, load_site_data
    from common.model import load_tokenizer

    val = load_site_data(tiny_cfg, SiteIdentity("site-0", 0, 3, ""), load_tokenizer(tiny_cfg.model)).val
    for i, name in enumerate(exact.cross_models):
        load_trainable_state(model, local[name])
        probs, _ = predict(model, val)
        assert exact.cross[i] == (probs.argmax(axis=1) == val.labels.numpy()).sum()
    assert exact.cross[0] != exact.cross[1]  # the two head shifts favour different classes
    # The site's own summary is still the global model's: the same as without local models.
    _, plain = evaluate({**TINY, "dp.enabled": False}, None)
    assert plain.cross is None and np.array_equal(plain.blocks["confusion"], exact.blocks["confusion"])

    # Under DP: one Gaussian release whose Δ includes the counts' block; ε is what the same σ costs without them.
    # (Other sites than the one that just took the runs without DP: that one has no DP guarantee left.)
    ctx, noised = evaluate({**TINY, "dp.release-noise-multiplier": 4.0}, local, pid=1)
    _, alone = evaluate({**TINY, "dp.release-noise-multiplier": 4.0}, None, pid=2)  # a site with a fresh ledger
    assert noised.sensitivity == 2.0 and alone.sensitivity == pytest.approx(2.0)
    assert noised.epsilon == pytest.approx(alone.epsilon) and noised.cross.shape == (2,)
    assert not np.array_equal(noised.cross, exact.cross)


def test_a_librarys_error_message_stays_at_the_site_and_fedlens_own_ones_leave_it():
    import torch

    from client.client_app import _public_message

    try:
        torch.nn.Linear(384, 3)(torch.zeros(812, 32))  # at q = 1, 812 would be the site's exact train size
    except RuntimeError as e:
        assert "812" not in _public_message(e) and "raised inside torch" in _public_message(e)
    try:
        torch.zeros(812, 2) @ torch.zeros(3, 2)  # a C-level error, raised in the calling frame
    except RuntimeError as e:
        assert "812" not in _public_message(e)
    try:
        raise RuntimeError("site site-0: injected crash at round 2")
    except RuntimeError as e:
        assert _public_message(e) == "site site-0: injected crash at round 2"
