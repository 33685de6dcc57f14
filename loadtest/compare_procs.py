"""Processes of the side-by-side benchmark: start/stop, CPU accounting, readiness, LiteLLM's venv."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import orjson


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def git_commit() -> str:
    """Short commit of the working tree, or '-'."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "-"
    return out.stdout.strip() or "-"


@dataclass
class Proc:
    """A server process this benchmark started (in its own process group), logging to a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(
        cls, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> Proc:
        """Spawn `cmd` with extra `env`, stdout and stderr to `log_path`."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        popen = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
        return cls(name, popen, log_path, log, {"cmd": cmd})

    def pids(self) -> list[int]:
        """This process and its descendants (Linux /proc)."""
        todo, seen = [self.popen.pid], []
        while todo:
            pid = todo.pop()
            seen.append(pid)
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            todo.extend(int(k) for k in kids)
        return seen

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the process tree so far (0 where /proc is missing)."""
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        total = 0
        for pid in self.pids():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / tick

    def alive(self) -> bool:
        """Still running?"""
        return self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        """The last lines of the process's log."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return ""
        return f"--- {self.name} ({self.log_path}) ---\n" + "\n".join(lines)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group we created, then SIGKILL it after `grace` seconds."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        self.log.close()


def wait_quiet(
    procs: list[Proc], *, share: float = 0.03, window_s: float = 1.0, timeout_s: float = 20.0
) -> float | None:
    """Wait until every process uses under `share` of a core over `window_s`.

    A gateway measured while another still works off the backlog of the previous run (a
    slow proxy keeps answering queued requests after the load generator stopped) would be
    charged for that CPU. Returns the seconds waited, or None when `timeout_s` passed first.
    """
    start = time.monotonic()
    before = [p.cpu_seconds() for p in procs]
    while True:
        time.sleep(window_s)
        after = [p.cpu_seconds() for p in procs]
        if all(a - b < share * window_s for a, b in zip(after, before, strict=True)):
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            return None
        before = after


def _post_chat(url: str, key: str, model: str) -> int:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    body = orjson.dumps(
        {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "ready?"}]}
    )
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body,
            {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        return conn.getresponse().status
    finally:
        conn.close()


def wait_ready(proc: Proc | None, url: str, key: str, model: str, timeout: float) -> None:
    """Until a chat completion through `url` answers 200; RuntimeError if it dies or times out."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}")
        try:
            status = _post_chat(url, key, model)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = exc
        time.sleep(0.25)
    name = proc.name if proc else url
    raise RuntimeError(f"{name} not ready after {timeout:.0f} s (last: {last})")


def litellm_version(python: Path) -> str | None:
    """Installed litellm version in the venv of `python`, or None."""
    try:
        out = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def litellm_http_stack(python: Path) -> str:
    """Which HTTP parser and event loop LiteLLM's uvicorn gets in that venv (it picks the
    C ones, httptools and uvloop, only when they are installed)."""
    probe = (
        "import importlib.util as u; "
        "print('httptools' if u.find_spec('httptools') else 'h11', "
        "'uvloop' if u.find_spec('uvloop') else 'asyncio')"
    )
    try:
        out = subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    parser, _, loop = out.stdout.strip().partition(" ")
    return f"uvicorn http={parser}, loop={loop}" if out.returncode == 0 else "unknown"


def ensure_litellm(venv: Path) -> tuple[Path, str, bool]:
    """(litellm executable, version, whether it was installed now); installs on first use.

    LiteLLM is never a dependency of neogate: it lives in its own venv, from PyPI,
    installed the way LiteLLM's own installer (scripts/install.sh) and docs do it:
    `pip install 'litellm[proxy]'`, nothing added. That extra brings uvicorn without its
    `[standard]` extras, so uvicorn parses HTTP with h11 unless httptools happens to be
    present; the version string says which parser and loop it got.
    """
    exe, python = venv / "bin" / "litellm", venv / "bin" / "python"
    version = litellm_version(python) if exe.exists() else None
    if version is not None:
        return exe, f"{version} ({litellm_http_stack(python)})", False
    print(
        f"installing litellm[proxy] into {venv} (one time; large) ...", file=sys.stderr, flush=True
    )
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "litellm[proxy]"], check=True)
    version = litellm_version(python)
    if version is None or not exe.exists():
        raise RuntimeError(f"litellm did not install into {venv}")
    return exe, f"{version} ({litellm_http_stack(python)})", True
