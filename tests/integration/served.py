"""`neogate serve` as a real process on a free loopback port, for tests of the command line."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = ("--host", "127.0.0.1", "--port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def secrets_env(path: Path) -> dict[str, str]:
    refs = re.findall(r"env:([A-Z0-9_]+)", path.read_text())
    return os.environ | {ref: f"test-value-of-{ref.lower()}" for ref in refs}


def wait_until_up(proc: subprocess.Popen[str], url: str, within_s: float = 60.0) -> None:
    until = time.monotonic() + within_s
    while time.monotonic() < until:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"serve exited {proc.returncode}:\n{out}\n{err}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("serve did not answer /healthz in time")


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then the exit status (0: drained and stopped cleanly)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, f"{out}\n{err}"


def serve(
    path: Path, cwd: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """`neogate serve --config PATH` on a free loopback port, up and answering."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), *HOST, str(port)],
        cwd=cwd,
        env=secrets_env(path) | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, url)
    return proc, url
