"""Head mode's frozen features, computed once where the texts are and kept on that machine's own disk.

A site keeps its features in its own state folder (client/state.site_folder), the server those of its held-out set
next to the run store; neither ever travels. The encoder does not change during a head-mode run, so a split's
features are a function of its token tensors and the encoder's weights alone: that is the cache key, and a cached
file is reused by later runs, replays and benchmarks on the same data and model. A missing or unreadable file is
recomputed, never an error.
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
FORMAT = 1  # bump when what `features` computes changes: older files are then never read


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


def key(identity: str, data: Encoded) -> str:
    h = hashlib.sha256(identity.encode())
    for t in (data.input_ids, data.attention_mask):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def cached_features(model: nn.Module, data: Encoded, *, identity: str, folder: Path | None) -> Features:
    """`features(model, data)`, read from `folder` if a run computed them before, else computed and kept there
    (`folder` None: computed, not kept)."""
    if folder is None or len(data) == 0:
        return features(model, data)
    path = folder / FOLDER / f"{key(identity, data)}.pt"
    width = getattr(head(model), "in_features", None)
    if path.is_file():
        try:
            x = torch.load(path, weights_only=True)
            # A file of another shape or type (another model's, a torn write) must never reach the head: its
            # error would name the site's exact sizes.
            if (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.ndim == 2 and x.shape[0] == len(data)
                    and width in (None, x.shape[1])
                    and bool(torch.isfinite(x).all())):
                return Features(x, data.labels.clone())
        except Exception:  # noqa: BLE001 (a torn or foreign file, whatever torch.load says: recompute it)
            pass
        get_logger().warning("cached features %s unusable; computing them again", path)
    out = features(model, data)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save(out.x, tmp)
        os.replace(tmp, path)  # atomic: a reader sees the whole file or none
    except Exception:  # noqa: BLE001 (a full disk raises RuntimeError from torch.save: the run goes on without)
        get_logger().exception("features could not be kept in %s; they will be computed again next run", path.parent)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return out


def model_split(cfg: ModelConfig, seed: int, model: nn.Module, data: Encoded | None,
                folder: Path | None) -> Encoded | Features | None:
    """A split as the model of `cfg` consumes it: its features in head mode (cached in `folder`), else the tokens."""
    if data is None or cfg.mode != "head":
        return data
    return cached_features(model, data, identity=encoder_identity(cfg, seed), folder=folder)
