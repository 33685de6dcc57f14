"""wrk, the C load generator, driven from the benchmarks: one POST, closed loop, loopback only.

A Python load generator on this 2-core machine spends more CPU per request than the
gateway it measures, so maximum throughput is measured with wrk (Debian package `wrk`);
latency percentiles come from wrk's `--latency` histogram.
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b")
_LAT = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_SCALE = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class WrkResult:
    """One wrk run. `rps` counts 2xx/3xx answers only: an error is not throughput."""

    rps: float
    requests: int
    p50_ms: float | None
    p99_ms: float | None
    non2xx: int
    socket_errors: int
    cpu_s: float  # wrk's own CPU time (it shares the machine with what it measures)

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def post_script(path: Path, body: str, headers: Mapping[str, str]) -> Path:
    """A wrk Lua script sending `body` with `headers` (JSON content type added)."""

    def lua(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    lines = ['wrk.method = "POST"', f"wrk.body = {lua(body)}"]
    lines.append('wrk.headers["Content-Type"] = "application/json"')
    lines += [f"wrk.headers[{lua(k)}] = {lua(v)}" for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_wrk(
    url: str, script: Path, connections: int, seconds: float, *, timeout_s: float = 30.0
) -> WrkResult:
    """Run wrk once against `url` (loopback only) and parse what it printed."""
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK and not host.startswith("127."):
        raise ValueError(f"wrk runs against loopback only, not {host!r}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            f"{timeout_s:g}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + timeout_s + 30,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return parse_wrk(out.stdout, cpu_s, out.stderr)


def parse_wrk(text: str, cpu_s: float, stderr: str = "") -> WrkResult:
    """What wrk printed (with --latency), as a WrkResult."""
    rps = _RPS.search(text)
    total = _REQUESTS.search(text)
    if rps is None or total is None:
        raise RuntimeError(f"wrk printed no rate:\n{text}\n{stderr}")
    lat = {m.group(1): float(m.group(2)) * _SCALE[m.group(3)] for m in _LAT.finditer(text)}
    non2xx_match = _NON2XX.search(text)
    non2xx = int(non2xx_match.group(1)) if non2xx_match else 0
    sock = _SOCKET.search(text)
    # wrk's own Requests/sec counts every answer, errors too; throughput here is the rate
    # of good answers (socket errors are not in wrk's request count at all).
    requests = int(total.group(1))
    elapsed_s = float(total.group(2)) * _SCALE[total.group(3)] / 1000.0
    ok = max(0, requests - non2xx)
    return WrkResult(
        rps=ok / elapsed_s if elapsed_s > 0 else 0.0,
        requests=requests,
        p50_ms=lat.get("50"),
        p99_ms=lat.get("99"),
        non2xx=non2xx,
        socket_errors=sum(int(x) for x in sock.groups()) if sock else 0,
        cpu_s=cpu_s,
    )
