"""The deployment tests' fixture: a real loopback deployment (fedlens/loopback.py), stopped after each test."""

from __future__ import annotations

import pytest

from fedlens.loopback import BIN, LABELS, ROOT, RUN_CONFIG, Deployment, free_port, write_site_csv  # noqa: F401


@pytest.fixture
def deployment(tmp_path_factory):
    # A short root: Flower and Ray keep sockets and paths under it.
    d = Deployment(tmp_path_factory.mktemp("dep"))
    yield d
    d.stop()
