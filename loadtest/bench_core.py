"""Gateway core benchmark: added latency at concurrency 1, max non-streaming throughput at concurrency 32.

    python -m loadtest.bench_core [--rounds 3] [--duration 8] [--variants full,no-ledger,pinned]
    python -m loadtest.bench_core --variants full-3,pinned-3

Variants: full (cost policy, sqlite ledger), no-ledger, pinned, and no-ledger-aiohttp
(no-ledger with `listen.fast_edge: false`: every connection read by aiohttp). With one
backend the cost policy has one candidate to rank; `full-3` and `pinned-3` give the model
three backends at different prices (all on the same static upstream), so `cost` scores
three candidates per request: `--variants full-3,pinned-3` measures multi-candidate routing.

Starts a fast static upstream (`neogate sim static`) and one gateway process per
variant (`neogate serve --config ...`, auth with a tenant key, metrics on, an
upstream API key so every answer passes the key masker), then,
in the same run and interleaved round by round, measures each variant and the
upstream called directly:

- added latency: wrk at concurrency 1 (p50, p99) through the gateway minus direct;
- throughput: wrk at concurrency 32, requests/s, the ratio to direct, and the process's CPU
  time per request (/proc: all its threads, during that run);
- streaming: time to first byte at concurrency 1, through the gateway and direct.

Medians over rounds are printed. Needs `wrk` (Debian package `wrk`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.wrk import WrkResult, have_wrk, post_script, run_wrk

TENANT_KEY = "ng-bench-tenant-key-0001"
UPSTREAM_KEY = "sk-bench-upstream-key-0123456789abcdef"
BODY = (
    '{"model":"m","messages":[{"role":"user","content":"Hello there, how are you today?"}],'
    '"max_tokens":16}'
)
STREAM_BODY = BODY[:-1] + ',"stream":true}'

VARIANTS = {
    # name: (policy kind, ledger kind, neogate's own HTTP edge, backends of the model)
    "full": ("cost", "sqlite", True, 1),
    "no-ledger": ("cost", "none", True, 1),
    "pinned": ("pinned", "sqlite", True, 1),
    # every connection read by aiohttp (listen.fast_edge: false): what the edge saves
    "no-ledger-aiohttp": ("cost", "none", False, 1),
    # three candidates: the cost policy ranks them all on every request
    "full-3": ("cost", "sqlite", True, 3),
    "pinned-3": ("pinned", "sqlite", True, 3),
}
# (input, output) USD per million tokens of backends static, static-2, static-3
PRICES = ((0.1, 0.2), (0.12, 0.24), (0.15, 0.3))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def policy_yaml(
    upstream: int,
    port: int,
    data: Path,
    policy: str,
    ledger: str,
    fast_edge: bool = True,
    backends: int = 1,
) -> str:
    names = ["static", *(f"static-{i}" for i in range(2, backends + 1))]
    order = ", ".join(names)
    pol = "{kind: cost}" if policy == "cost" else f"{{kind: pinned, order: [{order}]}}"
    edge = "true" if fast_edge else "false"
    entries = "".join(
        f"""
  - name: {name}
    kind: openai_compatible
    base_url: http://127.0.0.1:{upstream}/v1
    api_key: env:NEOGATE_BENCH_UPSTREAM_KEY
    models: {{m: static-model}}
    price: {{input_per_million: {pin}, output_per_million: {pout}}}
    max_concurrency: 4096"""
        for name, (pin, pout) in zip(names, PRICES, strict=False)
    )
    return f"""
listen: {{host: 127.0.0.1, port: {port}, fast_edge: {edge}}}
backends:{entries}
models:
  - name: m
    backends: [{order}]
    policy: {pol}
tenants:
  - name: bench
    api_keys: [env:NEOGATE_BENCH_KEY]
ledger: {{kind: {ledger}, path: {data}/ledger.db, spool_path: {data}/ledger.spool}}
tokenizer: {{source: bpe-openai}}
"""


@dataclass
class Proc:
    name: str
    port: int
    popen: subprocess.Popen[bytes]


@dataclass
class Samples:
    rps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # process CPU per request at c=32


def cpu_s(pid: int) -> float:
    """User + system CPU time of process `pid` so far (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def start(cmd: list[str], port: int, name: str, env: dict[str, str]) -> Proc:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_port(port)
    return Proc(name, port, p)


def wrk(port: int, conns: int, seconds: float, script: Path) -> WrkResult:
    res = run_wrk(f"http://127.0.0.1:{port}/v1/chat/completions", script, conns, seconds)
    if res.errors:
        raise RuntimeError(f"wrk saw {res.errors} errors from port {port}")
    return res


async def ttfb_ms(port: int, key: bool, n: int = 200) -> float:
    """Median time to the first streamed event at concurrency 1 (one keep-alive connection)."""
    body = STREAM_BODY.encode()
    auth = f"Authorization: Bearer {TENANT_KEY}\r\n" if key else ""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            writer.write(head + body)
            buf = b""
            while b"data:" not in buf:
                buf += await reader.read(65536)
            out.append((time.perf_counter() - t0) * 1000)
            while b"data: [DONE]" not in buf:
                buf += await reader.read(65536)
            if b"Transfer-Encoding: chunked" in buf:
                while not buf.endswith(b"0\r\n\r\n"):  # the chunked terminator
                    buf += await reader.read(65536)
    finally:
        writer.close()
    return statistics.median(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    ap.add_argument("--variants", default="full,no-ledger,pinned")
    args = ap.parse_args(argv)
    if not have_wrk():
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    names = [v for v in args.variants.split(",") if v]
    neogate = [sys.executable, "-m", "gateway.cli"]
    env = dict(
        os.environ,
        NEOGATE_BENCH_KEY=TENANT_KEY,
        NEOGATE_SECRET="bench-secret",
        # A provider has a key: every answer passes the key masker, as in production.
        NEOGATE_BENCH_UPSTREAM_KEY=UPSTREAM_KEY,
    )
    procs: list[Proc] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        keyed = post_script(
            Path(tmp) / "keyed.lua", BODY, {"Authorization": f"Bearer {TENANT_KEY}"}
        )
        plain = post_script(Path(tmp) / "plain.lua", BODY, {})
        try:
            up = free_port()
            procs.append(start([*neogate, "sim", "static", "--port", str(up)], up, "direct", env))
            for name in names:
                policy, ledger, fast_edge, backends = VARIANTS[name]
                data = Path(tmp) / name
                data.mkdir()
                port = free_port()
                cfg = Path(tmp) / f"{name}.yaml"
                cfg.write_text(policy_yaml(up, port, data, policy, ledger, fast_edge, backends))
                procs.append(
                    start(
                        [*neogate, "--log-level", "WARNING", "serve", "--config", str(cfg)],
                        port,
                        name,
                        env,
                    )
                )
            results = {p.name: Samples() for p in procs}
            for p in procs:  # warm-up
                wrk(p.port, 8, 1.0, plain if p.name == "direct" else keyed)
            for r in range(args.rounds):
                for p in procs:
                    key = p.name != "direct"
                    script = keyed if key else plain
                    cpu0 = cpu_s(p.popen.pid)
                    hi = wrk(p.port, 32, args.duration, script)
                    s = results[p.name]
                    s.cpu_us.append((cpu_s(p.popen.pid) - cpu0) / max(hi.requests, 1) * 1e6)
                    rps = hi.rps
                    lat = wrk(p.port, 1, args.duration / 2, script)
                    s.rps.append(rps)
                    s.p50_ms.append(lat.p50_ms if lat.p50_ms is not None else float("nan"))
                    s.p99_ms.append(lat.p99_ms if lat.p99_ms is not None else float("nan"))
                    s.ttfb_ms.append(asyncio.run(ttfb_ms(p.port, key)))
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            for p in procs:
                p.popen.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.popen.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.popen.kill()
    report(results, args, (load_before, os.getloadavg()[0]))
    return 0


def report(
    results: dict[str, Samples], args: argparse.Namespace, load: tuple[float, float]
) -> None:
    med = statistics.median
    d = results["direct"]
    print(
        f"\nneogate core benchmark: {args.rounds} rounds, medians; wrk -t1, {args.duration}s runs"
    )
    print(
        f"machine: {os.cpu_count()} cores; gateway, upstream and wrk share them; "
        f"load average (1 min) {load[0]:.1f} before, {load[1]:.1f} after\n"
    )
    print(
        "| path | req/s @c32 | CPU us/req @c32 | ratio to direct | p50 ms @c1 | p99 ms @c1 | added p50 ms | added p99 ms | stream TTFB ms @c1 | added TTFB ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in results.items():
        add50 = med(s.p50_ms) - med(d.p50_ms)
        add99 = med(s.p99_ms) - med(d.p99_ms)
        addt = med(s.ttfb_ms) - med(d.ttfb_ms)
        print(
            f"| {name} | {med(s.rps):,.0f} | {med(s.cpu_us):.0f} | {med(s.rps) / med(d.rps):.2f} | {med(s.p50_ms):.3f} | "
            f"{med(s.p99_ms):.3f} | {add50:.3f} | {add99:.3f} | {med(s.ttfb_ms):.3f} | {addt:.3f} |"
        )
    print("\nCPU us per request @c32 by round (the process, all threads; wrk's requests):")
    for name, s in results.items():
        print(f"  {name}: " + ", ".join(f"{v:.0f}" for v in s.cpu_us))
    print("\np99 ms @c1 by round (a loaded machine's pauses land in single rounds):")
    for name, s in results.items():
        print(f"  {name}: " + ", ".join(f"{v:.2f}" for v in s.p99_ms))
    if "full" in results and "no-ledger" in results:
        f, n = med(results["full"].rps), med(results["no-ledger"].rps)
        print(
            f"\nmetering+ledger on vs off: {f:,.0f} vs {n:,.0f} req/s ({(1 - f / n) * 100:.1f}% lower)"
        )
        ratios = [
            a / b for a, b in zip(results["full"].p99_ms, results["no-ledger"].p99_ms, strict=True)
        ]
        print(
            f"p99 @c1 full / no-ledger (issue 14's goal: <= 2x): {med(ratios):.2f}x median of the "
            "rounds' ratios (" + ", ".join(f"{r:.2f}" for r in ratios) + ")"
        )
    for full, pinned, what in (
        ("full", "pinned", "1 candidate"),
        ("full-3", "pinned-3", "3 candidates"),
    ):
        if full in results and pinned in results:
            f, p = med(results[full].rps), med(results[pinned].rps)
            print(
                f"cost routing vs pinned ({what}): {f:,.0f} vs {p:,.0f} req/s "
                f"({(1 - f / p) * 100:.1f}% lower)"
            )


if __name__ == "__main__":
    sys.exit(main())
