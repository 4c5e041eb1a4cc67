"""Step 5, beside the store: per-round weights next to the run store: the global model after each round and every site's accepted update.

Layout: <store dir>/<run id>/rounds/<r>/global.safetensors, <r>/sites/<site>.safetensors, <r>/manifest.json
(round 0 holds the initial global model). The what-if re-aggregation reads them; only the last `keep` rounds are
kept (LoRA: ~0.3 MB per site and round; full fine-tuning: ~90 MB, so keep few or none there).
"""

from __future__ import annotations

import json
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

Arrays = OrderedDict[str, np.ndarray]


def run_dir(store: str | Path, run_id: str) -> Path:
    return Path(store).parent / run_id


def _safe(site: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", site)


class Checkpoints:
    def __init__(self, store: str | Path, run_id: str, *, keep: int) -> None:
        self.root = run_dir(store, run_id) / "rounds"
        self.keep = keep

    def _dir(self, round_: int) -> Path:
        return self.root / str(round_)

    def save(self, round_: int, global_arrays: Arrays, updates: dict[str, tuple[Arrays, int]],
             state: dict | None = None) -> None:
        """The global model after `round_`, the updates it averaged (site -> (weights, examples)) and the server
        state a resumed run needs to continue exactly (JSON)."""
        if self.keep <= 0:
            return
        d = self._dir(round_)
        shutil.rmtree(d, ignore_errors=True)  # a resumed run redoes the round an interruption left half-written
        (d / "sites").mkdir(parents=True, exist_ok=True)
        for site, (arrays, _) in updates.items():
            save_file(dict(arrays), str(d / "sites" / f"{_safe(site)}.safetensors"))
        save_file(dict(global_arrays), str(d / "global.safetensors"))
        # Written last: a round directory with a manifest is complete.
        (d / "manifest.json").write_text(json.dumps({"round": round_, "state": state or {}, "sites": {
            s: {"examples": n, "file": f"sites/{_safe(s)}.safetensors"} for s, (_, n) in updates.items()}}))

    def prune(self, round_: int) -> None:
        """Drop rounds older than the last `keep`; called once round_ is committed to the store, so that the last
        committed round (the one a resumed run starts from) is always on disk."""
        for old in self.rounds():
            if old > 0 and old <= round_ - self.keep:
                shutil.rmtree(self._dir(old), ignore_errors=True)

    def rounds(self) -> list[int]:
        """Rounds whose checkpoint is complete, in order."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.parent.name) for p in self.root.glob("*/manifest.json") if p.parent.name.isdigit())

    def state(self, round_: int) -> dict:
        """The server state saved with round_ ({} when none was)."""
        self.load(round_)  # the same LookupError when the round was not kept
        return json.loads((self._dir(round_) / "manifest.json").read_text()).get("state", {})

    def load(self, round_: int) -> tuple[Arrays, dict[str, tuple[Arrays, int]]]:
        """(global after round_, site -> (update, examples)).

        Raises:
            LookupError: the round was not kept (names the rounds that are).
        """
        d = self._dir(round_)
        if not (d / "manifest.json").is_file():
            raise LookupError(f"round {round_} has no checkpoint in {self.root} (kept: {self.rounds() or 'none'}; "
                              "server.keep-rounds sets how many are kept)")
        manifest = json.loads((d / "manifest.json").read_text())
        updates = {s: (OrderedDict(load_file(str(d / m["file"]))), int(m["examples"]))
                   for s, m in manifest["sites"].items()}
        return OrderedDict(load_file(str(d / "global.safetensors"))), updates
