"""Flower glue at the server: AppConfig -> initial weights -> DebugFedAvg round loop -> run store -> final model."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.checkpoints import Checkpoints
from common.config import AppConfig
from common.export import LiveExport
from common.log import get_logger
from common.model import build_model, load_tokenizer, load_trainable_state, save_final_model, trainable_state
from common.rounds import Event
from common.run_store import RunWriter, load_round_records
from server.central_eval import class_prior, make_central_eval, make_probe, server_split
from server.strategy import DebugFedAvg

app = ServerApp()
log = get_logger()


def _fast_object_pulls() -> None:
    """Deployment: the ServerApp asks again for a reply's objects the link does not have yet after 0.02 s, not
    Flower's first 1 s (a site's reply is visible before all its objects arrive; at every exchange that second was
    most of the wait on loopback, docs/PERFORMANCE.md). Flower 1.41/1.42's HttpGrid calls pull_objects with its
    defaults; the simulation's grid does not use it."""
    import functools

    from flwr.supercore.inflatable.inflatable_utils import pull_objects
    from flwr.superlink.grid import http_grid

    http_grid.pull_objects = functools.partial(pull_objects, initial_backoff=0.02, backoff_cap=1.0,
                                               max_tries_per_object=None)  # Flower's max_time still bounds it


_fast_object_pulls()


def new_run_id(scenario: str) -> str:
    """A fresh run id: time, the scenario's name (as a run id may spell it) and 6 random hex digits."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", scenario).strip("-.")[:80] or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{uuid.uuid4().hex[:6]}"


def model_description(cfg: AppConfig) -> str:
    name = "tiny random BERT" if cfg.model.tiny else (cfg.model.path or "all-MiniLM-L6-v2")
    mode = {"head": "linear head on frozen features", "lora": f"LoRA r={cfg.model.lora_r}",
            "head-then-lora": f"LP-FT: head for {cfg.model.probe_rounds} rounds, then LoRA r={cfg.model.lora_r}",
            "full": "full fine-tuning"}[cfg.model.mode]
    privacy = f"DP ε={cfg.dp.target_epsilon:g}" if cfg.dp.enabled else "no DP"
    return f"{name} ({mode}, {cfg.model.pooling} pooling, {privacy})"


def resume_point(cfg: AppConfig, writer: RunWriter, checkpoints: Checkpoints) -> tuple[int, dict] | None:
    """Where an interrupted run picks up: (its last completed round, the server state saved with it); None for a
    new run.

    Raises:
        ValueError: the run already completed, its configuration differs, or its last round has no checkpoint.
    """
    prior = writer.prior()
    if prior is None:
        return None
    if prior["status"] == "completed":
        raise ValueError(f"run {writer.run_id} already completed; choose another store.run-id")
    # Resuming is only exact if every site trains as before: the same config except where the store lives.
    changed = sorted(k for k in set(prior["config"]) | set(cfg.raw) if not k.startswith("store.")
                     and prior["config"].get(k) != cfg.raw.get(k))
    if changed:
        raise ValueError(f"run {writer.run_id} cannot resume with a different config; changed: "
                         + ", ".join(f"{k} ({prior['config'].get(k)!r} -> {cfg.raw.get(k)!r})" for k in changed[:5]))
    last = prior["last_round"]
    try:
        state = checkpoints.state(last)
    except LookupError as e:
        raise ValueError(f"run {writer.run_id} cannot resume after round {last}: {e}") from e
    writer.resume(last)
    log.info("fedlens run %s resumes after round %d of %d", writer.run_id, last, cfg.num_server_rounds)
    return last, state


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = AppConfig.from_run_config(dict(context.run_config))
    run_id = cfg.store.run_id or new_run_id(cfg.scenario)
    writer = RunWriter(cfg.store.path, run_id)
    checkpoints = Checkpoints(cfg.store.path, run_id, keep=cfg.server.keep_rounds)
    resumed = resume_point(cfg, writer, checkpoints)
    parent = (cfg.store.replay_from, cfg.store.replay_round) if cfg.store.replay_from else None
    if resumed is None:
        writer.start(scenario=cfg.scenario, rounds_planned=cfg.num_server_rounds, model=model_description(cfg),
                     config=cfg.raw, parent=parent)
        writer.record_faults([(f.site, f.kind, f.params) for f in cfg.injected])
    log.info("fedlens run %s -> %s", run_id, Path(cfg.store.path).resolve())
    export = LiveExport(cfg.store.path, run_id, cfg.store.export_targets(), cfg.store.export_dir)
    try:
        export.check()  # a missing library fails the run here, before any site spends ε
        tokenizer = load_tokenizer(cfg.model)
        model = build_model(cfg.model, cfg.data.labels, seed=cfg.train.seed)
        test = server_split(cfg, model, tokenizer)
        if test is None and cfg.server.central_eval == "auto":
            log.info("server.central-eval = auto: data.source = %s has no held-out set at the server, so the global "
                     "model is evaluated at the sites only; set server.central-eval to the path of a labelled file "
                     "here (columns data.text-column, data.label-column) to test it centrally", cfg.data.source)
        strategy = DebugFedAvg(cfg.server, writer=writer, loss_clip=cfg.dp.loss_clip, class_names=cfg.data.labels,
                               class_prior=class_prior(cfg, test), central_eval=make_central_eval(cfg, model, test),
                               probe=make_probe(cfg, model, test), checkpoints=checkpoints,
                               # LP-FT switches to AdamW after its probe rounds (train.adapt-optimizer)
                               plain_sgd=cfg.train.optimizer == "sgd" and cfg.model.mode != "head-then-lora")
        initial, start = trainable_state(model), 1
        if resumed is not None or parent is not None:
            # Resume this run after its last completed round, or replay another from its round R checkpoint.
            source = checkpoints if resumed is not None else Checkpoints(cfg.store.path, parent[0], keep=1)
            last = resumed[0] if resumed is not None else parent[1]
            kept, _ = source.load(last)
            # safetensors stores keys sorted; the sites and the update checks expect the model's own order.
            initial = type(initial)((k, kept[k]) for k in initial)
            state = source.state(last)
            # A resumed run's findings go on from its committed rounds; a replay is a new run, diagnosed afresh.
            strategy.restore(writer.prior()["sites"] if resumed is not None else [], state.get("thresholds"),
                             state.get("label_counts"),
                             load_round_records(cfg.store.path, run_id) if resumed is not None else None)
            start = last + 1
        final = strategy.run(grid, initial, cfg.num_server_rounds, start_round=start,
                             on_round=lambda rnd, _: _record(writer, export.submit(), rnd))
        model_path = None
        if cfg.server.save_model:
            load_trainable_state(model, final)
            out = save_final_model(model, tokenizer, Path(cfg.store.path).parent / run_id / "model")
            model_path = str(out.resolve())
            log.info("final model saved to %s", model_path)
        writer.finish("completed", model_path=model_path)
        _record(writer, export.finish(), None)
    except BaseException as e:
        # The rounds already committed stay; the run is marked failed with the reason.
        writer.event(Event("run-failed", f"{type(e).__name__}: {e}"))
        writer.finish("failed", error=f"{type(e).__name__}: {e}")
        _record(writer, export.finish(), None)
        raise
    finally:
        export.close()
        writer.close()


def _record(writer: RunWriter, problems: list[str], rnd: int | None) -> None:
    """The live export's failures, as events (of the round they are noticed in); never the run's end."""
    for problem in problems:
        log.warning("export failed (tried again after the next round): %s", problem)
        writer.event(Event("export-failed", problem), rnd)
