"""`fedlens dashboard` and its Streamlit server: a SIGTERM to the command stops the server with it."""

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import running_dashboard


def _children(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(proc.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_fedlens_dashboard_stops_its_streamlit_server(tmp_path, sig):
    with running_dashboard(tmp_path / "s.db") as (proc, _):
        (server,) = _children(proc.pid)
        try:
            assert _alive(server)
            proc.send_signal(sig)
            assert proc.wait(timeout=30) is not None
            deadline = time.time() + 20
            while _alive(server) and time.time() < deadline:
                time.sleep(0.2)
            assert not _alive(server), "the Streamlit server outlived fedlens dashboard"
        finally:
            if _alive(server):
                os.kill(server, signal.SIGKILL)
