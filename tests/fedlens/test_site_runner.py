"""The site's runner checks an app bundle's code digest before anything of it is installed or imported."""

import hashlib
import io
import zipfile
from types import SimpleNamespace

import pytest

from fedlens.site_runner import Runner, UntrustedApp, code_digest, code_files, unpack


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


def test_an_unpinned_or_altered_bundle_is_refused_before_it_is_installed(monkeypatch, tmp_path):
    installed = []
    monkeypatch.setattr("flwr.cli.install.install_from_fab", lambda *a, **k: installed.append(a))
    content = bundle(APP)
    fab = SimpleNamespace(content=content, hash_str=hashlib.sha256(content).hexdigest())
    run = SimpleNamespace(fab_id="fedlens", fab_version="0.1.0")
    runner = Runner("127.0.0.1:1", digests={"0" * 64}, secret=None, apps=tmp_path)
    with pytest.raises(UntrustedApp, match=f"code digest {code_digest(content)} is not one this site pinned "
                                           f"\\({'0' * 64}\\)"):
        runner._app(run, fab)
    altered = SimpleNamespace(content=bundle({**APP, "client/client_app.py": b"evil\n"}), hash_str=fab.hash_str)
    runner.digests = {code_digest(content)}
    with pytest.raises(UntrustedApp, match="does not match its hash"):
        runner._app(run, altered)
    assert installed == [] and list(tmp_path.iterdir()) == []


def test_only_the_pinned_code_files_are_unpacked(tmp_path):
    # Found by review: Flower's install extracts every member, so a `.pyc` in __pycache__ (loaded without looking at
    # the pinned .py beside it) or an `.so` ran code the digest did not cover.
    import marshal

    pyc = b"\x00" * 16 + marshal.dumps(compile("open('/tmp/pwned', 'w')", "x", "exec"))
    hostile = bundle({**APP, "client/__pycache__/client_app.cpython-311.pyc": pyc, "client/train.so": b"\x7fELF",
                      "torch.pyc": pyc})
    assert code_digest(hostile) == code_digest(bundle(APP))  # the same pinned code...
    folder = unpack(hostile, code_digest(hostile), tmp_path)
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert written == ["client/client_app.py", "pyproject.toml"]  # ...and nothing else of the bundle on disk
    for name in ("../evil.py", "client/.hidden.py", "client/__pycache__/x.py", "/abs.py", "a\\b.py"):
        with pytest.raises(UntrustedApp, match="holds a code file named"):
            code_files(bundle({**APP, name: b"x = 1\n"}))
    with pytest.raises(UntrustedApp, match="twice \\(ignoring case\\)"):
        code_files(bundle({**APP, "client/Client_App.py": b"x = 1\n"}))


def test_the_projects_own_bundle_holds_the_apps_and_they_load_from_it_alone(tmp_path):
    # What `flwr run .` ships (fab-include: client/, common/, server/ and the pyproject): both apps import from the
    # unpacked bundle, every module of theirs from it, none from this checkout (a module left out of the bundle
    # would be loaded from the site's own install, or be missing at a site without one).
    import subprocess
    import sys

    from flwr.cli.build import build_fab_from_disk

    from common.config import PROJECT_ROOT

    content = build_fab_from_disk(PROJECT_ROOT)
    folder = unpack(content, code_digest(content), tmp_path)
    assert {name.split("/")[0] for name in code_files(content)} == {"client", "common", "server", "pyproject.toml"}
    probe = ("import sys, client.client_app, server.server_app\n"
             "mods = [m for n, m in sys.modules.items() if n.split('.')[0] in ('client', 'common', 'server')]\n"
             "print('\\n'.join(sorted(getattr(m, '__file__', None) or '?' for m in mods)))\n"
             "assert not [n for n in sys.modules if n.split('.')[0] in ('fedlens', 'dashboard', 'tests')], 'outside'\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=folder, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    files = out.stdout.split()
    assert len(files) > 20 and all(f.startswith(str(folder)) for f in files), [f for f in files
                                                                                 if not f.startswith(str(folder))]
