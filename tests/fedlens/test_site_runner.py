"""The site's runner checks an app bundle's code digest before anything of it is installed or imported."""

import hashlib
import io
import zipfile
from types import SimpleNamespace

import pytest

from fedlens.site_runner import Runner, UntrustedApp, code_digest


def bundle(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in files.items():
            z.writestr(name, content)
    return out.getvalue()


APP = {"pyproject.toml": b"[tool.flwr.app]\n", "client/client_app.py": b"app = 1\n", "README.md": b"read me\n",
       "docs/bench/x.json": b"{}"}


def test_the_code_digest_covers_code_and_config_and_nothing_else():
    base = code_digest(bundle(APP))
    assert code_digest(bundle({**APP, "README.md": b"other text"})) == base  # docs may differ between checkouts
    assert code_digest(bundle({**APP, "docs/bench/y.json": b"[]"})) == base
    assert code_digest(bundle({**APP, "client/client_app.py": b"app = 2\n"})) != base
    assert code_digest(bundle({**APP, "numpy.py": b"import os\n"})) != base  # a module that would shadow another
    assert code_digest(bundle({**APP, "pyproject.toml": b"[tool.flwr.app.config]\n"})) != base
    with pytest.raises(UntrustedApp, match="not a readable zip"):
        code_digest(b"not a zip")


def test_an_unpinned_or_altered_bundle_is_refused_before_it_is_installed(monkeypatch):
    installed = []
    monkeypatch.setattr("flwr.cli.install.install_from_fab", lambda *a, **k: installed.append(a))
    content = bundle(APP)
    fab = SimpleNamespace(content=content, hash_str=hashlib.sha256(content).hexdigest())
    run = SimpleNamespace(fab_id="fedlens", fab_version="0.1.0")
    runner = Runner("127.0.0.1:1", digests={"0" * 64}, secret=None)
    with pytest.raises(UntrustedApp, match=f"code digest {code_digest(content)} is not one this site pinned "
                                           f"\\({'0' * 64}\\)"):
        runner._app(run, fab)
    altered = SimpleNamespace(content=bundle({**APP, "client/client_app.py": b"evil\n"}), hash_str=fab.hash_str)
    runner.digests = {code_digest(content)}
    with pytest.raises(UntrustedApp, match="does not match its hash"):
        runner._app(run, altered)
    assert installed == []
