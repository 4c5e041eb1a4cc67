"""Shared fixtures: a tiny config, a tiny model and one site's data, all offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# The tiny model with LoRA, the mode most of the suite's privacy and fault tests were written for (tokens through
# the whole model); head-mode tests set model.mode = "head" themselves.
TINY = {"model.tiny": True, "data.max-length": 32, "simulation.num-sites": 3, "num-server-rounds": 2,
        "model.mode": "lora", "train.optimizer": "adamw", "train.head-lr": 0.1,
        "train.batch-size": 32, "train.local-epochs": 1}  # several Poisson batches per epoch


@pytest.fixture(autouse=True)
def site_state(tmp_path_factory, monkeypatch):
    """Every test's sites keep their lifetime ledgers in a fresh folder, with the simulated sites' policy (as
    `fedlens simulate` prepares it): no test inherits another's spent ε."""
    from client.state import STATE_ENV
    from fedlens.simulate import prepare_site_state

    root = prepare_site_state(tmp_path_factory.mktemp("sites"))
    monkeypatch.setenv(STATE_ENV, str(root))
    return root


@pytest.fixture(scope="session")
def tiny_cfg():
    from common.config import AppConfig

    return AppConfig.from_run_config(TINY)


@pytest.fixture(scope="session")
def tokenizer(tiny_cfg):
    from common.model import load_tokenizer

    return load_tokenizer(tiny_cfg.model)


@pytest.fixture(scope="session")
def site_data(tiny_cfg, tokenizer):
    from client.data import SiteIdentity, load_site_data

    return load_site_data(tiny_cfg, SiteIdentity("site-0", 0, 3, ""), tokenizer)
