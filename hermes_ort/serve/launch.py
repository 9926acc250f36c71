"""`hermes serve` as a child process on a free loopback port, returned once /health answers 200: what the
serving bench and the tests start (stdlib only)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from ..errors import HermesError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir: str, *args: str, env: dict | None = None, timeout_s: float = 300) -> tuple[subprocess.Popen, int]:
    """The server process (its stderr piped) and its port; the process is killed if it is not healthy in time."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hermes_ort", "serve", str(model_dir), "--port", str(port), *args],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return proc, port
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None:
            raise HermesError(f"hermes serve exited: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise HermesError(f"hermes serve did not answer /health in {timeout_s:.0f} s")
