"""common/checkpoints.py: the weights kept beside the store, and which rounds stay."""

from collections import OrderedDict

import numpy as np

from common.checkpoints import Checkpoints


def test_only_the_last_rounds_are_kept(tmp_path):
    ckpt = Checkpoints(tmp_path / "s.db", "r", keep=2)
    w = OrderedDict(x=np.zeros(2, np.float32))
    for r in range(5):
        ckpt.save(r, w, {"a": (w, 1), "b": (w, 1)}, {"thresholds": [0.5, 0.25]})
        ckpt.prune(r)
    assert ckpt.rounds() == [0, 3, 4]  # round 0 (the initial model) stays
    assert ckpt.state(4) == {"thresholds": [0.5, 0.25]}
    # Round 5 written but not yet committed: pruning waits, so the last committed round (4) is still there.
    ckpt.save(5, w, {"a": (w, 1)})
    assert ckpt.rounds() == [0, 3, 4, 5]
    ckpt.save(5, w, {"b": (w, 1)})  # redone after a resume: only the new attempt's updates remain
    assert list(ckpt.load(5)[1]) == ["b"]
    assert Checkpoints(tmp_path / "s.db", "r2", keep=0).rounds() == []
