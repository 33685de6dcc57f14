"""Upstream client benchmark: CPU time per request of the backend on its two transports.

    python -m loadtest.bench_upstream_client [--requests 20000] [--concurrency 32] [--repeats 5]
                                              [--mode whole|stream] [--loop uvloop|asyncio]

Starts `neogate sim static` in a subprocess, then in this process drives the same requests
through `OpenAICompatBackend` over `AiohttpTransport` (the shared session, the https road)
and over `PooledTransport` (`adapters.fasthttp`, the plain-http road), closed loop at the given concurrency, interleaved repeat by repeat
(the order alternates). For each client it prints the median over repeats of this process's
CPU time (user + system) per request and of the requests per second. The upstream runs in
its own process, so the CPU figure is the client side alone: what the gateway pays per
upstream exchange.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from adapters.backend import OpenAICompatBackend
from adapters.base import AttemptTimeouts, Backend

BODY = (
    b'{"model":"static-model","messages":[{"role":"user","content":"Hello there, how are you'
    b' today?"}],"max_tokens":16}'
)
STREAM_BODY = BODY[:-1] + b',"stream":true,"stream_options":{"include_usage":true}}'
TIMEOUTS = AttemptTimeouts(connect_s=5.0, first_byte_s=30.0, idle_s=30.0, total_s=60.0)
HEADERS = {"X-Request-Id": "bench", "user-agent": "bench"}


@dataclass
class Samples:
    cpu_us: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    errors: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_upstream(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "sim", "static", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the static upstream did not start")


async def drive(backend: Backend, n: int, concurrency: int, stream: bool) -> tuple[float, int]:
    """Run `n` requests; return wall seconds and the number of failures."""
    body = STREAM_BODY if stream else BODY
    left = n
    errors = 0

    async def worker() -> None:
        nonlocal left, errors
        while left > 0:
            left -= 1
            try:
                resp = await backend.open("/chat/completions", body, HEADERS, TIMEOUTS)
                if stream:
                    async for _ in resp.events():
                        pass
                else:
                    await resp.read()
                resp.close()
            except Exception:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, errors


async def run(args: argparse.Namespace, base_url: str) -> dict[str, Samples]:
    connector = aiohttp.TCPConnector(limit=4096, limit_per_host=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
    ) as session:
        fast = OpenAICompatBackend(
            name="fast", base_url=base_url, api_key="sk-bench", session=session, is_local=True
        )
        slow = OpenAICompatBackend(
            name="aiohttp",
            base_url=base_url,
            api_key="sk-bench",
            session=session,
            is_local=True,
            road="aiohttp",
        )
        clients: dict[str, Backend] = {"aiohttp": slow, "fasthttp": fast}
        stream = args.mode == "stream"
        for backend in clients.values():  # warm up: connections, caches, code paths
            await drive(backend, min(1000, args.requests), args.concurrency, stream)
        out = {name: Samples() for name in clients}
        names = list(clients)
        for rep in range(args.repeats):
            for name in names if rep % 2 == 0 else names[::-1]:
                cpu0 = time.process_time()
                wall, errors = await drive(clients[name], args.requests, args.concurrency, stream)
                cpu = time.process_time() - cpu0
                out[name].cpu_us.append(cpu / args.requests * 1e6)
                out[name].rps.append((args.requests - errors) / wall)  # errors excluded
                out[name].errors += errors
        fast.close()
        return out


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mode", choices=("whole", "stream"), default="whole")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = ap.parse_args(argv)
    port = free_port()
    upstream = start_upstream(port)
    try:
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            results = runner.run(run(args, f"http://127.0.0.1:{port}/v1"))
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)
    print(
        f"mode={args.mode} loop={args.loop} requests={args.requests} "
        f"concurrency={args.concurrency} repeats={args.repeats}"
    )
    print(f"{'client':<10} {'cpu_us/req':>11} {'req/s':>9} {'errors':>7}   cpu_us per repeat")
    for name, s in results.items():
        reps = " ".join(f"{v:.0f}" for v in s.cpu_us)
        print(
            f"{name:<10} {statistics.median(s.cpu_us):>11.1f} "
            f"{statistics.median(s.rps):>9.0f} {s.errors:>7}   {reps}"
        )
    a, f = (statistics.median(results[k].cpu_us) for k in ("aiohttp", "fasthttp"))
    print(f"fasthttp / aiohttp CPU per request: {f / a:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
