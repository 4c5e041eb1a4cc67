"""Steps 2 and 4 (head mode): the frozen features, computed once where the texts are and kept on that machine's own
disk.

A site keeps its features in its own state folder (client/state.site_folder), the server those of its held-out set
next to the run store; neither ever travels. The encoder does not change during a head-mode run, so a split's
row's features are a function of its tokens and the encoder's weights alone: that is the cache key, one file per
encoder holds every row computed so far, and later runs, replays and benchmarks on the same texts (in any partition
or split) reuse them. A missing or unreadable file is recomputed, never an error.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from common.config import ModelConfig
from common.log import get_logger
from common.model import Encoded, Features, embedded_minilm_path, features, head

FOLDER = "features"
FORMAT = 2  # bump when what `features` computes changes: older files are then never read


def encoder_identity(cfg: ModelConfig, seed: int) -> str:
    """What the frozen encoder's weights depend on: a tiny model's seed, or the model folder's files."""
    import transformers

    versions = f"v{FORMAT}:torch {torch.__version__}:transformers {transformers.__version__}"
    if cfg.tiny:
        return f"{versions}:tiny:{seed}:{cfg.pooling}"
    folder = Path(cfg.path or embedded_minilm_path()).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
    stats = ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return f"{versions}:{folder}:{cfg.pooling}:{stats}"


def row_keys(identity: str, data: Encoded) -> list[bytes]:
    """Each row's cache key: the encoder's identity and the row's tokens up to its length (its padding is not
    part of it: a row's features do not depend on it, test_features)."""
    base = hashlib.sha256(identity.encode()).digest()
    ids = data.input_ids.contiguous().numpy()
    lengths = data.attention_mask.sum(dim=1).tolist()
    return [hashlib.sha256(base + ids[i, :n].tobytes()).digest()[:16] for i, n in enumerate(lengths)]


def store_path(folder: Path, identity: str) -> Path:
    return folder / FOLDER / f"rows-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.pt"


def _read(path: Path, width: int | None) -> tuple[list[bytes], torch.Tensor | None]:
    """The rows kept in `path` (keys, features), or none when it is missing, torn or another model's."""
    if not path.is_file():
        return [], None
    try:
        kept = torch.load(path, weights_only=True)
        keys, x = kept["keys"], kept["x"]
        # A file of another shape or type (another model's, a torn write) must never reach the head: its error
        # would name the site's exact sizes.
        if (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.ndim == 2 and width in (None, x.shape[1])
                and isinstance(keys, torch.Tensor) and keys.dtype == torch.uint8 and tuple(keys.shape) == (len(x), 16)
                and bool(torch.isfinite(x).all())):
            return [bytes(k) for k in keys.numpy()], x
    except Exception:  # noqa: BLE001 (a torn or foreign file, whatever torch.load says: recompute it)
        pass
    get_logger().warning("cached features %s unusable; computing them again", path)
    return [], None


def cached_features(model: nn.Module, data: Encoded, *, identity: str, folder: Path | None) -> Features:
    """`features(model, data)`, each row read from `folder` if a run computed it before, the others computed and
    kept there (`folder` None: computed, not kept). Rows, not splits, are kept: another partition, split or
    fault of the same texts computes only the rows it has not seen."""
    if folder is None or len(data) == 0:
        return features(model, data)
    path = store_path(folder, identity)
    width = getattr(head(model), "in_features", None)
    keys = row_keys(identity, data)
    known, x = _read(path, width)
    index = {k: i for i, k in enumerate(known)}
    missing = sorted({i for i, k in enumerate(keys) if k not in index})
    if missing:
        idx = torch.tensor(missing)
        new = features(model, Encoded(data.input_ids[idx], data.attention_mask[idx], data.labels[idx])).x
        fresh = {}
        for row, i in enumerate(missing):
            fresh.setdefault(keys[i], row)  # identical rows: one entry
        order = list(fresh)
        added = new[torch.tensor([fresh[k] for k in order])]
        x = added if x is None else torch.cat([x, added])
        for k in order:
            index[k] = len(index)
        _write(path, list(index), x)
    return Features(x[torch.tensor([index[k] for k in keys])].clone(), data.labels.clone())


def _write(path: Path, keys: list[bytes], x: torch.Tensor) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save({"keys": torch.tensor(list(b"".join(keys)), dtype=torch.uint8).reshape(len(keys), 16), "x": x}, tmp)
        os.replace(tmp, path)  # atomic: a reader sees the whole file or none
    except Exception:  # noqa: BLE001 (a full disk raises RuntimeError from torch.save: the run goes on without)
        get_logger().exception("features could not be kept in %s; they will be computed again next run", path.parent)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def model_split(cfg: ModelConfig, seed: int, model: nn.Module, data: Encoded | None,
                folder: Path | None) -> Encoded | Features | None:
    """A split as the model of `cfg` consumes it: its features in head mode (cached in `folder`), else the tokens."""
    if data is None or cfg.mode != "head":
        return data
    return cached_features(model, data, identity=encoder_identity(cfg, seed), folder=folder)
