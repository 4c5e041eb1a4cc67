"""Every step's settings: the one frozen config tree of a run (defaults from pyproject, overrides from a scenario,
checked once).

Injected faults (simulation only) are parsed here too: the run config key `faults` holds a JSON list of
{"site", "kind", ...parameters}; each site applies its own (client/faults.py) and the server records them as the
run's ground truth (run store table `faults`); no diagnosis code reads them. Kinds and their parameters
(docs/scenarios.md):

  data       label_noise (rate; classes: only labels of these true classes, [] = all), label_flip (from, to;
             share of `from` relabelled; swap: `to` relabelled as `from` too), class_missing (class),
             label_skew (class, keep: rows of the other classes kept at this share; not a fault: a naturally
             skewed site, for benchmarks of what must *not* be flagged), text_corruption (rate), domain_shift (rate; source: "" = rows of conditions the site does not hold, or
             another embedded workload, "movies" / "drugreview", its labels mapped by sentiment)
  training   lr_blowup (factor), overfit (epochs, examples)
  behaviour  free_rider (mode: "echo" | "random"), crash (round), straggler (seconds + factor × its training time),
             bad_update (mode: "nan" | "inf" | "shape" | "scale" | "examples" | "string-array" | "inf-examples" |
               "bad-status" | "empty-array" | "huge-array" | "summary-classes" | "summary-overflow" | "fuzz", or a list of
               them taken in turn, one a round; from round): a broken or hostile reply
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

# Flower run-config values are bool / int / float / str only; nesting is spelled with dots ("dp.max-grad-norm").
RunConfig = dict[str, Any]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Where the loss's class prior comes from (never a site's exact counts): the sites' released label counts, the
# server's own labelled data (server.central-eval), or uniform; or K weights in the config.
PRIOR_SOURCES = ("released", "server-data", "uniform")
SOURCES = ("drugreview", "movies", "debates", "files")  # data.source: the embedded workloads (common/datasets.py), or own files
# Each embedded workload's own label set, which data.labels = "" takes (own files must name theirs).
SOURCE_LABELS = {"drugreview": ("negative", "neutral", "positive"), "movies": ("rotten", "fresh"),
                 "debates": ("TRUMP", "CLINTON", "PENCE", "KAINE", "HOLT", "QUIJANO", "RADDATZ", "COOPER", "WALLACE")}
EXPORT_TARGETS = ("mlflow", "tensorboard")  # store.export / fedlens export --to (common/export.py)
# A run id names folders (checkpoints, exports) and is quoted in MLflow filters: letters, digits, '.', '_', '-'.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# server.central-eval names for the embedded workloads' held-out sets, with the workload they belong to.
EMBEDDED_TEST_SETS = {"drugreview-test": "drugreview", "movies-test": "movies", "debates-test": "debates"}
# What a site trains (common/model.build_model); head-then-lora is LP-FT: the head alone on frozen features for
# model.probe-rounds rounds, then LoRA adapters and the head on tokens (train.adapt-*).
MODES = ("head", "lora", "full", "head-then-lora")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")  # labelled files the loaders read (common/datasets.py)


def pyproject_path() -> Path:
    """The pyproject.toml whose [tool.flwr.app.config] holds every default.

    In a checkout (editable install) it is the project's own file; a wheel carries a copy inside `common/`.
    """
    for candidate in (PROJECT_ROOT / "pyproject.toml", Path(__file__).resolve().parent / "pyproject.toml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"pyproject.toml with the fedlens defaults not found next to {PROJECT_ROOT}")


def flatten(tree: dict[str, Any], prefix: str = "") -> RunConfig:
    """{"dp": {"max-grad-norm": 1.0}} -> {"dp.max-grad-norm": 1.0} (what Flower puts in context.run_config)."""
    flat: RunConfig = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def default_run_config() -> RunConfig:
    """The flat run config of pyproject.toml, exactly what `flwr run .` starts from."""
    with pyproject_path().open("rb") as f:
        return flatten(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def load_overrides(path: str | Path) -> RunConfig:
    """Read a scenario file (a TOML of run-config overrides, dotted keys or tables) into a flat dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scenario file {path} does not exist")
    try:
        with path.open("rb") as f:
            tree = tomllib.load(f)
        if isinstance(tree.get("faults"), list):
            # [[faults]] tables in a scenario file travel as one JSON string (run-config values are scalars).
            tree["faults"] = json.dumps(tree["faults"])
        return flatten(tree)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"scenario file {path} is not valid TOML: {e}") from e


def parse_overrides(items: list[str]) -> RunConfig:
    """`key=value` strings (the CLI's --set) as run-config values: true/false, int, float, else the string.

    Raises:
        ValueError: an item without '=' (names it).
    """
    out: RunConfig = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = (x.strip() for x in item.split("=", 1))
        out[k] = _scalar(v)
    return out


def _scalar(v: str) -> bool | int | float | str:
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v.strip('"').strip("'")


def resolve_run_config(*overrides: RunConfig) -> RunConfig:
    """Defaults from pyproject, then each override in turn. Unknown keys are an error that names them."""
    config = default_run_config()
    unknown = [k for o in overrides for k in o if k not in config]
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(sorted(set(unknown)))}; known keys are listed in pyproject.toml "
            "[tool.flwr.app.config]"
        )
    for o in overrides:
        for key, value in o.items():
            config[key] = _coerce(key, value, config[key])
    return config


def _coerce(key: str, value: Any, default: Any) -> Any:
    # A TOML file and the CLI give ints where floats are expected ("dp.target-epsilon = 8"); keep the default's type.
    if isinstance(default, bool) or isinstance(value, bool):
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Injected faults (module docstring).

KINDS: dict[str, dict[str, Any]] = {  # kind -> parameters with their defaults
    "label_noise": {"rate": 0.5, "classes": []},
    "label_flip": {"from": 2, "to": 0, "share": 1.0, "swap": False},
    "class_missing": {"class": 0},
    "label_skew": {"class": 1, "keep": 0.3},
    "text_corruption": {"rate": 0.3},
    "domain_shift": {"rate": 1.0, "source": ""},
    "lr_blowup": {"factor": 50.0},
    "overfit": {"epochs": 20, "examples": 16},
    "free_rider": {"mode": "echo"},
    "crash": {"round": 2},
    "straggler": {"seconds": 0.0, "factor": 0.0},
    "bad_update": {"mode": "nan", "round": 1},
}
BAD_UPDATE_MODES = ("nan", "inf", "shape", "scale", "examples", "string-array", "inf-examples", "bad-status",
                    "empty-array", "huge-array", "summary-classes", "summary-overflow", "fuzz")


@dataclass(frozen=True)
class Fault:
    site: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.params.get(key, KINDS[self.kind][key])


def parse_faults(text: str) -> list[Fault]:
    """The faults of a run config.

    Raises:
        ValueError: not a JSON list of objects, an unknown kind or parameter (names the entry and what is allowed).
    """
    if not text:
        return []
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"faults must be a JSON list of {{'site', 'kind', ...}} objects: {e}") from e
    if not isinstance(items, list):
        raise ValueError(f"faults must be a JSON list, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "site" not in item or "kind" not in item:
            raise ValueError(f"faults[{i}] must be an object with 'site' and 'kind', got {item!r}")
        kind = item["kind"]
        if kind not in KINDS:
            raise ValueError(f"faults[{i}]: unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
        params = {k: v for k, v in item.items() if k not in ("site", "kind")}
        unknown = sorted(set(params) - set(KINDS[kind]))
        if unknown:
            raise ValueError(f"faults[{i}] ({kind}): unknown parameter(s) {', '.join(unknown)}; "
                             f"{kind} takes {', '.join(KINDS[kind])}")
        mode = params.get("mode", "nan")
        modes = mode if isinstance(mode, list) else [mode]
        if kind == "bad_update" and (not modes or any(not isinstance(m, str) or m not in BAD_UPDATE_MODES
                                                      for m in modes)):
            raise ValueError(f"faults[{i}] (bad_update): mode must be one of {', '.join(BAD_UPDATE_MODES)}, or a "
                             f"non-empty list of them (taken in turn, one a round), got {mode!r}")
        out.append(Fault(str(item["site"]), kind, params))
    return out


def at_site(faults: list[Fault], site: str) -> dict[str, Fault]:
    """The faults injected at `site`, by kind."""
    return {f.kind: f for f in faults if f.site == site}


# ---------------------------------------------------------------------------------------------------------------------
# The tree. Field names are the config keys with "-" -> "_"; every default lives in pyproject, not here.


@dataclass(frozen=True)
class DataConfig:
    source: str
    files: str
    partitioner: str
    dirichlet_alpha: float
    val_fraction: float
    seed: int
    text_column: str
    label_column: str
    labels: tuple[str, ...]
    max_length: int


@dataclass(frozen=True)
class ModelConfig:
    path: str
    tiny: bool
    mode: str
    pooling: str
    lora_r: int
    lora_alpha: int
    lora_targets: tuple[str, ...]
    lora_freeze_a: bool
    probe_rounds: int


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: int
    batch_size: int
    max_physical_batch: int
    optimizer: str
    lr: float
    head_lr: float
    class_balance: str
    class_prior: str
    seed: int
    adapt_epochs: int
    adapt_batch_size: int
    adapt_optimizer: str
    adapt_lr: float
    adapt_head_lr: float

    def adapting(self) -> TrainConfig:
        """The adaptation phase's settings (head-then-lora after its probe rounds)."""
        return dataclasses.replace(self, local_epochs=self.adapt_epochs, batch_size=self.adapt_batch_size,
                                   optimizer=self.adapt_optimizer, lr=self.adapt_lr, head_lr=self.adapt_head_lr)


@dataclass(frozen=True)
class DPConfig:
    enabled: bool
    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    noise_multiplier: float
    release_noise_multiplier: float
    diagnostics_share: float
    census_noise_multiplier: float
    loss_clip: float
    grad_sample_mode: str


@dataclass(frozen=True)
class ServerConfig:
    fraction_train: float
    min_sites: int
    round_timeout: float
    central_eval: str
    val_fraction: float
    save_model: bool
    keep_rounds: int
    max_update_norm: float
    update_norm_outlier: float
    max_weight_ratio: float
    quarantine: bool
    site_registry: str
    wait_for_sites: float
    aggregation: str
    trim_fraction: float
    byzantine: int
    exclude: tuple[str, ...]
    weights: str
    probe_inputs: int
    cross_site_eval: bool

    def site_weights(self) -> dict[str, float]:
        """server.weights "site-a=0.5,site-b=0" -> {site: multiplier of its example count in the average}.

        Raises:
            ValueError: an entry that is not site=number with a number in [0, 1].
        """
        out = {}
        for item in filter(None, (x.strip() for x in self.weights.split(","))):
            site, _, value = item.partition("=")
            try:
                w = float(value)
            except ValueError:
                w = -1.0
            if not site.strip() or not 0.0 <= w <= 1.0:
                raise ValueError(f"server.weights entries must be site=weight with a weight in [0, 1], got {item!r}")
            out[site.strip()] = w
        return out


@dataclass(frozen=True)
class SimulationConfig:
    num_sites: int
    client_cpus: float
    client_gpus: float


@dataclass(frozen=True)
class StoreConfig:
    path: str
    run_id: str
    replay_from: str
    replay_round: int
    export: str  # "", "mlflow", "tensorboard" or both, comma-separated: copied after every round (common/export.py)
    export_dir: str  # "" = beside the store (runs/mlflow, runs/tensorboard); else <export-dir>/<target>

    def export_targets(self) -> tuple[str, ...]:
        """store.export "mlflow, tensorboard" -> ("mlflow", "tensorboard").

        Raises:
            ValueError: a name that is not one of EXPORT_TARGETS.
        """
        names = tuple(dict.fromkeys(t.strip().lower() for t in self.export.split(",") if t.strip()))
        bad = [t for t in names if t not in EXPORT_TARGETS]
        if bad:
            raise ValueError(f"store.export: unknown export target(s) {', '.join(map(repr, bad))}; expected a "
                             f"comma-separated list of {', '.join(EXPORT_TARGETS)}, or \"\" for none")
        return names


@dataclass(frozen=True)
class AppConfig:
    num_server_rounds: int
    scenario: str
    faults: str  # JSON, as the run config holds it (the server stores it); parsed once: `injected`
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    dp: DPConfig
    server: ServerConfig
    simulation: SimulationConfig
    store: StoreConfig
    raw: RunConfig = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_run_config(cls, run_config: RunConfig, *, validate: bool = True) -> AppConfig:
        """Build and validate the tree from a flat Flower run config.

        Missing keys take the pyproject default (Flower's `run_simulation` passes an empty run config), so a
        ClientApp and a ServerApp always see the same complete tree. `validate=False` only for `from_stored`.

        Raises:
            ValueError: listing every problem at once, each naming the key, its value and what is allowed.
        """
        flat = resolve_run_config(dict(run_config))
        sections: dict[str, Any] = {}
        for name, sub in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig), ("dp", DPConfig),
                          ("server", ServerConfig), ("simulation", SimulationConfig), ("store", StoreConfig)):
            values = {}
            for f in dataclasses.fields(sub):
                key = f"{name}.{f.name.replace('_', '-')}"
                value = flat[key]
                if f.type == "tuple[str, ...]":
                    value = tuple(s.strip() for s in str(value).split(",") if s.strip())
                values[f.name] = value
            sections[name] = values
        if not sections["data"]["labels"]:  # "": the embedded workload's own label set
            sections["data"]["labels"] = SOURCE_LABELS.get(sections["data"]["source"], ())
        cfg = cls(
            num_server_rounds=flat["num-server-rounds"],
            scenario=flat["scenario"],
            faults=flat["faults"],
            data=DataConfig(**sections["data"]),
            model=ModelConfig(**sections["model"]),
            train=TrainConfig(**sections["train"]),
            dp=DPConfig(**sections["dp"]),
            server=ServerConfig(**sections["server"]),
            simulation=SimulationConfig(**sections["simulation"]),
            store=StoreConfig(**sections["store"]),
            raw=flat,
        )
        problems = cfg.problems() if validate else []
        if problems:
            raise ValueError("invalid fedlens config:\n  - " + "\n  - ".join(problems))
        return cfg

    @classmethod
    def from_stored(cls, stored: RunConfig) -> AppConfig:
        """The tree of a stored run's config (validated when its run started), for readers of the store.

        Keys this version does not know (an older or newer version's) are dropped and missing ones take today's
        defaults; values are not checked again: a model folder may be missing on the reading machine, or a value an
        older version allowed may be refused today, and neither should stop a report.
        """
        known = default_run_config()
        return cls.from_run_config({k: v for k, v in stored.items() if k in known}, validate=False)

    @cached_property
    def injected(self) -> tuple[Fault, ...]:
        """The run's injected faults, parsed once (validation parses them first; a bad list is a config problem).

        Raises:
            ValueError: as `parse_faults`.
        """
        return tuple(parse_faults(self.faults))

    def on_features(self, server_round: int) -> bool:
        """Whether round `server_round` trains the head alone on frozen features (head mode, or LP-FT's probe)."""
        return self.model.mode == "head" or (self.model.mode == "head-then-lora"
                                             and server_round <= self.model.probe_rounds)

    def train_at(self, server_round: int) -> TrainConfig:
        """The training settings of round `server_round` (LP-FT's adaptation rounds have their own)."""
        if self.model.mode == "head-then-lora" and server_round > self.model.probe_rounds:
            return self.train.adapting()
        return self.train

    def faults_at(self, site: str) -> dict[str, Fault]:
        """The faults injected at `site`, by kind (a site applies them only if its policy allows it)."""
        return at_site(list(self.injected), site)

    def explicit_prior(self) -> list[float]:
        """train.class-prior given as K weights ("1,1,2"), normalised.

        Raises:
            ValueError: not one positive number per label.
        """
        try:
            w = [float(x) for x in self.train.class_prior.split(",")]
        except ValueError:
            w = []
        if len(w) != len(self.data.labels) or min(w, default=0.0) <= 0:
            raise ValueError(f"train.class-prior must be one of {', '.join(PRIOR_SOURCES)} or {len(self.data.labels)} "
                             f"positive comma-separated weights (one per label), got {self.train.class_prior!r}")
        return [x / sum(w) for x in w]

    def problems(self) -> list[str]:
        """Every problem with this config, each naming key, value and the allowed range."""
        p: list[str] = []

        def check(ok: bool, key: str, value: Any, allowed: str) -> None:
            if not ok:
                p.append(f"{key} must be {allowed}, got {value!r}")

        def typed(key: str, value: Any, kind: type | tuple[type, ...]) -> bool:
            if isinstance(value, bool) and kind is not bool:
                p.append(f"{key} must be a number, got {value!r}")
                return False
            if not isinstance(value, kind):
                p.append(f"{key} must be of type {getattr(kind, '__name__', kind)}, got {value!r}")
                return False
            return True

        def num(key: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, integer: bool = False) -> None:
            if not typed(key, value, int if integer else (int, float)):
                return
            ok = (value > lo if lo_open else value >= lo) and value <= hi
            bracket = "(" if lo_open else "["
            check(ok, key, value, f"in {bracket}{lo}, {hi}]")

        num("num-server-rounds", self.num_server_rounds, 1, 10_000, integer=True)
        try:
            _ = self.injected  # parsed here first, then kept
        except ValueError as e:
            p.append(str(e))
        d, m, t, dp, s = self.data, self.model, self.train, self.dp, self.server
        check(d.source in SOURCES, "data.source", d.source, "one of " + ", ".join(f'"{x}"' for x in SOURCES))
        check(d.partitioner in ("natural", "iid", "dirichlet"), "data.partitioner", d.partitioner,
              'one of "natural", "iid", "dirichlet"')
        try:
            d.files.format(site="s", partition=0)
        except (KeyError, IndexError, ValueError):
            p.append(f"data.files must be a path template using only {{site}} and {{partition}}, got {d.files!r}")
        num("data.dirichlet-alpha", d.dirichlet_alpha, 0.0, 1e6, lo_open=True)
        num("data.val-fraction", d.val_fraction, 0.0, 0.9, lo_open=True)
        num("data.seed", d.seed, 0, 2**31, integer=True)
        check(len(d.labels) >= 2 and len(set(d.labels)) == len(d.labels), "data.labels", ",".join(d.labels),
              "at least two distinct comma-separated names (your files' label set"
              + (")" if d.source == "files" else f"; \"\" = {','.join(SOURCE_LABELS.get(d.source, ()))})"))
        if d.source in SOURCE_LABELS and len(d.labels) >= 2:
            # The embedded workloads know their own labels: a set they cannot produce would train a class that
            # never occurs (ratings map onto exactly 3 labels, the snippets are rotten or fresh).
            if d.source in ("movies", "debates"):
                own = SOURCE_LABELS[d.source]
                check(set(d.labels) == set(own), "data.labels", ",".join(d.labels),
                      f'"{",".join(own)}" (in any order) or "" with data.source = "{d.source}"')
            else:
                check(len(d.labels) == 3, "data.labels", ",".join(d.labels),
                      'three names (negative < 5 ≤ neutral ≤ 6 < positive on the 1-10 ratings) or "" with '
                      'data.source = "drugreview"')
        num("data.max-length", d.max_length, 8, 512, integer=True)
        check(m.mode in MODES, "model.mode", m.mode, "one of " + ", ".join(f'"{x}"' for x in MODES))
        check(m.pooling in ("mean", "cls"), "model.pooling", m.pooling, 'one of "mean", "cls"')
        if m.path:
            check(Path(m.path).is_dir(), "model.path", m.path, "a local model folder (config.json + weights)")
        num("model.lora-r", m.lora_r, 1, 1024, integer=True)
        num("model.lora-alpha", m.lora_alpha, 1, 4096, integer=True)
        check(len(m.lora_targets) > 0, "model.lora-targets", ",".join(m.lora_targets), "at least one module name")
        typed("model.lora-freeze-a", m.lora_freeze_a, bool)
        num("model.probe-rounds", m.probe_rounds, 0, 10_000, integer=True)
        num("train.adapt-epochs", t.adapt_epochs, 1, 1000, integer=True)
        num("train.adapt-batch-size", t.adapt_batch_size, 1, 65536, integer=True)
        check(t.adapt_optimizer in ("adamw", "sgd"), "train.adapt-optimizer", t.adapt_optimizer, 'one of "adamw", "sgd"')
        num("train.adapt-lr", t.adapt_lr, 0.0, 10.0, lo_open=True)
        num("train.adapt-head-lr", t.adapt_head_lr, 0.0, 10.0, lo_open=True)
        num("train.local-epochs", t.local_epochs, 1, 1000, integer=True)
        num("train.batch-size", t.batch_size, 1, 65536, integer=True)
        num("train.max-physical-batch", t.max_physical_batch, 1, 65536, integer=True)
        check(t.class_balance in ("logit-adjust", "weights", "none"), "train.class-balance", t.class_balance,
              'one of "logit-adjust", "weights", "none"')
        check(t.optimizer in ("adamw", "sgd"), "train.optimizer", t.optimizer, 'one of "adamw", "sgd"')
        if t.class_prior not in PRIOR_SOURCES:
            try:
                self.explicit_prior()
            except ValueError as e:
                p.append(str(e))
        num("train.lr", t.lr, 0.0, 10.0, lo_open=True)
        num("train.head-lr", t.head_lr, 0.0, 10.0, lo_open=True)
        num("dp.target-epsilon", dp.target_epsilon, 0.0, 1e4, lo_open=True)
        num("dp.target-delta", dp.target_delta, 0.0, 0.1, lo_open=True)
        num("dp.max-grad-norm", dp.max_grad_norm, 0.0, 1e6, lo_open=True)
        num("dp.noise-multiplier", dp.noise_multiplier, 0.0, 1e4)
        num("dp.release-noise-multiplier", dp.release_noise_multiplier, 0.0, 1e6)
        num("dp.diagnostics-share", dp.diagnostics_share, 0.0, 0.9)
        num("dp.census-noise-multiplier", dp.census_noise_multiplier, 0.0, 1e6, lo_open=True)
        num("dp.loss-clip", dp.loss_clip, 0.0, 1e4, lo_open=True)
        check(dp.grad_sample_mode in ("hooks", "functorch"), "dp.grad-sample-mode", dp.grad_sample_mode,
              'one of "hooks", "functorch"')
        num("server.fraction-train", s.fraction_train, 0.0, 1.0, lo_open=True)
        num("server.min-sites", s.min_sites, 1, 100_000, integer=True)
        num("server.round-timeout", s.round_timeout, 0.0, 1e7, lo_open=True)
        num("server.keep-rounds", s.keep_rounds, 0, 1_000_000, integer=True)
        num("server.max-update-norm", s.max_update_norm, 0.0, 1e30)
        num("server.update-norm-outlier", s.update_norm_outlier, 0.0, 1e30)
        check(s.update_norm_outlier == 0 or s.update_norm_outlier >= 1, "server.update-norm-outlier",
              s.update_norm_outlier, "0 (off) or at least 1 (× the round's median update norm; 20 by default)")
        num("server.max-weight-ratio", s.max_weight_ratio, 0.0, 1e30)
        check(s.max_weight_ratio == 0 or s.max_weight_ratio >= 1, "server.max-weight-ratio", s.max_weight_ratio,
              "0 (off) or at least 1")
        typed("server.quarantine", s.quarantine, bool)
        typed("server.site-registry", s.site_registry, str)
        num("server.wait-for-sites", s.wait_for_sites, 0.0, 1e7, lo_open=True)
        check(s.aggregation in ("fedavg", "median", "trimmed-mean", "krum"), "server.aggregation", s.aggregation,
              'one of "fedavg", "median", "trimmed-mean", "krum"')
        num("server.trim-fraction", s.trim_fraction, 0.0, 0.49)
        num("server.byzantine", s.byzantine, 0, 10_000, integer=True)
        num("server.probe-inputs", s.probe_inputs, 0, 100_000, integer=True)
        try:
            s.site_weights()
        except ValueError as e:
            p.append(str(e))
        num("store.replay-round", self.store.replay_round, 0, 10_000, integer=True)
        if self.store.replay_from and self.store.replay_round >= self.num_server_rounds:
            p.append(f"store.replay-round must be below num-server-rounds ({self.num_server_rounds}) to train at all, "
                     f"got {self.store.replay_round}")
        check(s.central_eval in ("", "auto", *EMBEDDED_TEST_SETS) or s.central_eval.lower().endswith(TABLE_SUFFIXES),
              "server.central-eval", s.central_eval,
              '"auto", "", ' + ", ".join(f'"{x}"' for x in EMBEDDED_TEST_SETS)
              + ", or the path of the server's own labelled file (" + ", ".join(TABLE_SUFFIXES) + ")")
        embedded = EMBEDDED_TEST_SETS.get(s.central_eval)
        if embedded and set(d.labels) != set(SOURCE_LABELS[embedded]):
            # Refused before the run: the embedded set's labels could not be read as this label set.
            p.append(f"server.central-eval = {s.central_eval!r} holds labels {','.join(SOURCE_LABELS[embedded])}, "
                     f"but data.labels = {','.join(d.labels)!r}; set server.central-eval to the path of the server's own "
                     "labelled file with those labels, or to \"auto\" (the sites' workload's own held-out set; none "
                     "for own files) or \"\" (no server-side evaluation)")
        num("server.val-fraction", s.val_fraction, 0.0, 0.9)
        if t.class_prior == "server-data" and (not s.central_eval or (s.central_eval == "auto"
                                                                      and d.source not in SOURCE_LABELS)):
            p.append(f"train.class-prior = server-data needs the server's own labelled data, but server.central-eval = "
                     f"{s.central_eval!r} gives it none with data.source = {d.source!r}; set server.central-eval to "
                     "its labelled file, or train.class-prior to released")
        num("simulation.num-sites", self.simulation.num_sites, 1, 100_000, integer=True)
        num("simulation.client-cpus", self.simulation.client_cpus, 0.0, 1024, lo_open=True)
        num("simulation.client-gpus", self.simulation.client_gpus, 0.0, 64)
        check(bool(self.store.path), "store.path", self.store.path, "a file path")
        check(not self.store.run_id or RUN_ID.fullmatch(self.store.run_id) is not None, "store.run-id",
              self.store.run_id, "empty (a new id) or up to 128 letters, digits, '.', '_' and '-', starting with a "
              "letter or digit")
        try:
            targets = self.store.export_targets()
        except ValueError as e:
            p.append(str(e))
        else:
            check("://" not in self.store.export_dir or targets == ("mlflow",), "store.export-dir",
                  self.store.export_dir, "a folder (an MLflow tracking URI only when store.export = \"mlflow\" alone)")
        return p
