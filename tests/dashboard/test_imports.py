"""The dashboard imports neither Flower nor torch: every page is rendered in a fresh interpreter, which is then asked
what it imported. Heavy work (the What-if re-aggregation) runs behind an explicit call, never at page import."""

import json
import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest

from common.checkpoints import Checkpoints
from common.config import PROJECT_ROOT
from dashboard.bench import make_store

HEAVY = ("flwr", "torch")  # top-level package names: flwr*, torch* (torchvision, ...)

# Runs in the child: every module of dashboard/ imported, the real app run under AppTest and each page rendered in
# the same process (page modules run Streamlit code at import, so AppTest is how they are imported).
RENDER = """
import json, sys
from streamlit.testing.v1 import AppTest
import dashboard.bench, dashboard.data, dashboard.ui
from dashboard.bench import PAGES
at = AppTest.from_file("dashboard/streamlit_app.py", default_timeout=60).run()
assert not at.exception, at.exception
for page in PAGES:
    at.switch_page(page).run()
    assert not at.exception, (page, at.exception)
    if page == "views/whatif.py":  # its body ran as far as the site picker, short of re-aggregating
        assert any("pick the ones to leave out" in c.value for c in at.caption), [c.value for c in at.caption]
print(json.dumps(sorted(sys.modules)))
"""


def _imported(code: str, env: dict[str, str] | None = None) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if m.split(".")[0].startswith(HEAVY)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # Prepare: a full run with a failing site, and round 2's updates kept, so the What-if page renders its pickers.
    path = make_store(tmp_path_factory.mktemp("imports") / "s.db", sites=3, rounds=2, failing=("site-002",))
    arrays = OrderedDict(w=np.zeros(4, dtype=np.float32))
    Checkpoints(path, "synthetic", keep=5).save(2, arrays, {"site-000": (arrays, 120), "site-001": (arrays, 120)})
    return path


def test_every_dashboard_page_renders_without_flower_or_torch(store):
    # Execute
    modules = _imported(RENDER, env={**os.environ, "FEDLENS_STORE": str(store)})

    # Assert
    assert "server.findings" in modules  # the Overview page's collapse threshold comes from the findings engine
    assert _heavy(modules) == []


def test_the_what_if_engine_imports_without_flower_or_torch():
    # The What-if page imports server.whatif only when asked to re-aggregate; even then Flower has no business in
    # the dashboard's process, and torch is built only once an evaluation is asked for (server/whatif.py).
    assert _heavy(_imported("import json, sys, server.whatif; print(json.dumps(sorted(sys.modules)))")) == []
