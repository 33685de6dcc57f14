"""Throughput of `neogate serve --workers 1` vs `--workers 2` against the static upstream, measured with wrk.

    python -m loadtest.bench_workers [--rounds 2] [--duration 8] [--connections 64]
        [--ledger sqlite|none] [--redis redis://127.0.0.1:6379/0] [--json out.json]

Starts `neogate sim static` (precomputed answers: the upstream costs as little as
possible) and, round by round, the gateway with 1 and with 2 worker processes on
the same port, and drives each with wrk (one thread, closed loop, the same
buffered chat request, a tenant key). Each measurement records requests/s, wrk's
own CPU (user+system seconds from its rusage), and the CPU of the gateway tree and
of the upstream, so the split of this machine's cores is visible. Medians over
rounds are printed with the 2-worker / 1-worker ratio.

With `--redis` the tenant's limits (large, never binding) live in Redis, so every
request pays the shared reserve and settle round trips. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loadtest.compare_procs import Proc, free_port, wait_ready
from loadtest.wrk import have_wrk, post_script, run_wrk

PATH = "/v1/chat/completions"

TENANT_KEY = "ng-bench-workers-key-0001"
BODY = (
    '{"model":"m","messages":[{"role":"user","content":"Hello there, how are you today?"}],'
    '"max_tokens":16}'
)


def policy_yaml(upstream: int, port: int, data: Path, ledger: str, redis_url: str | None) -> str:
    redis = f"redis: {{url: '{redis_url}', key_prefix: bench-{os.getpid()}}}" if redis_url else ""
    return f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{api_key: null}}
backends:
  - name: static
    kind: openai_compatible
    base_url: http://127.0.0.1:{upstream}/v1
    models: {{m: static-model}}
    price: {{input_per_million: 0.1, output_per_million: 0.2}}
    max_concurrency: 4096
models:
  - name: m
    backends: [static]
tenants:
  - name: bench
    api_keys: [env:NEOGATE_BENCH_KEY]
    budgets: {{usd_total: 1000000}}
    rate_limits: {{requests_per_minute: 100000000}}
ledger: {{kind: {ledger}, path: {data}/ledger.db, spool_path: {data}/ledger.spool}}
tokenizer: {{source: bpe-openai}}
{redis}
"""


@dataclass
class Measurement:
    workers: int
    round: int
    rps: float
    errors: int
    wrk_cpu_s: float
    gateway_cpu_s: float
    upstream_cpu_s: float
    seconds: float
    machine_cpu_s: float  # every process on the machine: shows other load during the run


def wrk_script(path: Path) -> Path:
    return post_script(path / "post.lua", BODY, {"Authorization": f"Bearer {TENANT_KEY}"})


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (Linux /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measure(
    workers: int,
    rnd: int,
    upstream: Proc,
    upstream_port: int,
    args: argparse.Namespace,
    work: Path,
    lua: Path,
) -> Measurement:
    port = free_port()
    data = work / f"data-{workers}-{rnd}"
    cfg = work / f"gw-{workers}-{rnd}.yaml"
    cfg.write_text(policy_yaml(upstream_port, port, data, args.ledger, args.redis))
    env = {"NEOGATE_BENCH_KEY": TENANT_KEY, "NEOGATE_SECRET": "bench-secret"}
    cmd = [sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "serve"]
    cmd += ["--config", str(cfg), "--workers", str(workers)]
    gw = Proc.start(f"gateway-{workers}w", cmd, work / f"gw-{workers}-{rnd}.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(gw, url, TENANT_KEY, "m", 60)
        # Every worker gets connections: warm each one's tokenizer and upstream pool.
        run_wrk(url + PATH, lua, args.connections, args.warmup, timeout_s=10)
        gw0, up0, all0 = gw.cpu_seconds(), upstream.cpu_seconds(), machine_busy_s()
        t0 = time.monotonic()
        res = run_wrk(url + PATH, lua, args.connections, args.duration, timeout_s=10)
        rps, errors, wrk_cpu = res.rps, res.errors, res.cpu_s
        seconds = time.monotonic() - t0
        gw_cpu, up_cpu = gw.cpu_seconds() - gw0, upstream.cpu_seconds() - up0
        machine = machine_busy_s() - all0
    finally:
        gw.stop()
    return Measurement(workers, rnd, rps, errors, wrk_cpu, gw_cpu, up_cpu, seconds, machine)


def other_cores(m: Measurement) -> float:
    """Cores busy with processes outside this benchmark (noise from a shared machine)."""
    ours = m.wrk_cpu_s + m.gateway_cpu_s + m.upstream_cpu_s
    return max(0.0, (m.machine_cpu_s - ours) / m.seconds)


def summarize(results: list[Measurement]) -> dict[str, object]:
    out: dict[str, object] = {}
    for w in (1, 2):
        ms = [m for m in results if m.workers == w]
        out[f"{w}w"] = {
            "rps": statistics.median(m.rps for m in ms),
            "errors": sum(m.errors for m in ms),
            "wrk_cores": statistics.median(m.wrk_cpu_s / m.seconds for m in ms),
            "gateway_cores": statistics.median(m.gateway_cpu_s / m.seconds for m in ms),
            "upstream_cores": statistics.median(m.upstream_cpu_s / m.seconds for m in ms),
            "other_cores": statistics.median(other_cores(m) for m in ms),
        }
    one, two = out["1w"], out["2w"]
    assert isinstance(one, dict) and isinstance(two, dict)
    out["ratio"] = two["rps"] / one["rps"] if one["rps"] else float("nan")
    return out


def print_table(summary: dict[str, object], args: argparse.Namespace) -> None:
    print(
        f"\nneogate --workers 1 vs 2, static upstream, wrk -t1 -c{args.connections} "
        f"-d{args.duration:g}s, ledger={args.ledger}, redis={'on' if args.redis else 'off'}, "
        f"{os.cpu_count()} cores, median of {args.rounds} rounds"
    )
    print(
        f"{'workers':>8} {'req/s':>9} {'errors':>7} {'wrk CPU':>8} {'gw CPU':>7} "
        f"{'up CPU':>7} {'other':>7}"
    )
    for w in (1, 2):
        s = summary[f"{w}w"]
        assert isinstance(s, dict)
        print(
            f"{w:>8} {s['rps']:>9.0f} {s['errors']:>7} {s['wrk_cores']:>7.2f}c "
            f"{s['gateway_cores']:>6.2f}c {s['upstream_cores']:>6.2f}c {s['other_cores']:>6.2f}c"
        )
    ratio = summary["ratio"]
    assert isinstance(ratio, float)
    verdict = "meets" if ratio >= 1.5 else "misses"
    print(f"ratio 2w/1w: {ratio:.2f}x ({verdict} the 1.5x goal)")
    print(
        "CPU columns are cores busy on average during the measured run (user+system); "
        "'other' is the rest of the machine (other users' load, kernel work not charged "
        "to a process)."
    )


def drop_prefix(url: str, prefix: str) -> None:
    """Remove the keys this run left in Redis."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--ledger", choices=("sqlite", "none"), default="sqlite")
    p.add_argument("--redis", default=None, help="shared limits in this Redis (loopback)")
    p.add_argument("--json", type=Path, default=None, help="write raw results and summary here")
    args = p.parse_args(argv)
    if not have_wrk():
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    if args.redis and not re.match(r"redis://(127\.\d+\.\d+\.\d+|localhost)[:/]", args.redis):
        print("--redis must be a loopback URL", file=sys.stderr)
        return 2
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        work = Path(tmp)
        lua = wrk_script(work)
        up_port = free_port()
        upstream = Proc.start(
            "static",
            [sys.executable, "-m", "gateway.cli", "sim", "static", "--port", str(up_port)],
            work / "static.log",
        )
        try:
            time.sleep(1.0)
            if not upstream.alive():
                raise RuntimeError(upstream.tail())
            for rnd in range(args.rounds):
                for workers in (1, 2) if rnd % 2 == 0 else (2, 1):
                    m = measure(workers, rnd, upstream, up_port, args, work, lua)
                    print(
                        f"round {rnd} workers {workers}: {m.rps:.0f} req/s, errors {m.errors}, "
                        f"wrk {m.wrk_cpu_s / m.seconds:.2f} cores, "
                        f"gateway {m.gateway_cpu_s / m.seconds:.2f} cores, "
                        f"other {other_cores(m):.2f} cores",
                        flush=True,
                    )
                    results.append(m)
        finally:
            upstream.stop()
            if args.redis:
                drop_prefix(args.redis, f"bench-{os.getpid()}")
    summary = summarize(results)
    print_table(summary, args)
    if args.json is not None:
        args.json.write_text(
            json.dumps({"results": [asdict(m) for m in results], "summary": summary}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
