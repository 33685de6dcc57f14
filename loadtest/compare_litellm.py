"""neogate side by side with the LiteLLM proxy: the same load, the same upstream, one run.

    python -m loadtest.compare_litellm [--duration 10] [--levels 1,8,32,128] [--repeats 3]

Installs `litellm[proxy]` from PyPI into its own virtual environment (never a dependency of
neogate; default /tmp/neogate-litellm-venv), starts one process each of: the static simulated
upstream (`neogate sim static`), neogate (`neogate serve --config <generated>`) and the LiteLLM
proxy (one worker), all logging at the same level, then runs closed-loop load at every
concurrency level, buffered and streamed, through neogate, through LiteLLM and straight to the
upstream. Maximum throughput is also measured with wrk (a C client: the Python load
generator would saturate this 2-core machine before neogate does) at `--wrk-levels`.
Prints throughput and latency with ratios and writes a Markdown report.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from loadtest.compare_procs import Proc, ensure_litellm, free_port, wait_quiet, wait_ready
from loadtest.compare_render import (
    MODES,
    WRK_MODE,
    Cell,
    fmt_ms,
    goals,
    plots,
    render_tables,
    write_markdown,
)
from loadtest.loadgen import LoadConfig, run_load
from loadtest.results import save_results, summarize
from loadtest.schedule import constant_schedule
from loadtest.wrk import have_wrk, post_script, run_wrk

TARGETS = ("direct", "neogate", "litellm")

# The neogate policy for the benchmark: one OpenAI-compatible backend (the upstream), one
# tenant, the SQLite ledger on. Format: gateway/config/schema.py and README.
NEOGATE_CONFIG = """\
listen:
  host: 127.0.0.1
  port: {port}
backends:
  - name: upstream
    kind: openai_compatible
    base_url: http://127.0.0.1:{upstream_port}/v1
    models:
      {model}: {model}
    price:
      input_per_million: 0.10
      output_per_million: 0.20
models:
  - name: {model}
    backends: [upstream]
tenants:
  - name: bench
    api_keys: [env:NEOGATE_BENCH_KEY]
ledger:
  kind: {ledger}
  path: {data}/ledger.db
  spool_path: {data}/ledger.spool
"""

# LiteLLM's equivalent: the upstream as an OpenAI-compatible model, a master key for auth.
LITELLM_CONFIG = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: http://127.0.0.1:{upstream_port}/v1
      api_key: sk-upstream-unused
litellm_settings:
  drop_params: true
  set_verbose: false
general_settings:
  master_key: {master_key}
"""


def uvicorn_log_config(level: str) -> dict[str, Any]:
    """A logging config for LiteLLM's uvicorn: every logger at `level` (no per-request lines)."""
    handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"default": handler},
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            n: {"handlers": ["default"], "level": level, "propagate": False}
            for n in ("uvicorn", "uvicorn.error", "uvicorn.access", "LiteLLM", "LiteLLM Proxy")
        },
    }


@dataclass
class Target:
    name: str
    url: str
    key: str
    proc: Proc | None
    usage_key: str | None = None
    version: str | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.compare_litellm", description=__doc__)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--levels", default="1,8,32,128", help="concurrency levels")
    p.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is reported")
    p.add_argument("--targets", default=",".join(TARGETS), help="subset of direct,neogate,litellm")
    p.add_argument("--modes", default=",".join(MODES), help="buffered,streamed")
    p.add_argument(
        "--wrk-levels",
        default="32,128",
        help="concurrency levels of the maximum-throughput runs with wrk ('' to skip them)",
    )
    p.add_argument("--model", default="bench-model")
    p.add_argument(
        "--neogate-ledger",
        choices=("sqlite", "none"),
        default="sqlite",
        help="neogate's ledger: none matches LiteLLM run without a database (no spend rows)",
    )
    p.add_argument("--prompt-tokens", default="const:64")
    p.add_argument("--max-tokens", default="const:16")
    p.add_argument("--completion-tokens", type=int, default=16, help="upstream answer length")
    p.add_argument("--log-level", default="WARNING", help="both gateways log at this level")
    p.add_argument("--venv", default="/tmp/neogate-litellm-venv", help="LiteLLM's own venv")
    p.add_argument("--out", default=None, help="directory (default loadtest/results/compare-*)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per target")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument(
        "--client",
        choices=("raw", "aiohttp"),
        default="raw",
        help="load generator HTTP client (aiohttp to cross-check the raw one)",
    )
    p.add_argument(
        "--upstream-cmd",
        default=None,
        help="command for the upstream, {port} substituted (default: neogate sim static)",
    )
    return p.parse_args(argv)


def _neogate_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


def start_all(args: argparse.Namespace, out: Path, names: list[str]) -> dict[str, Target]:
    """Start the upstream and every gateway named; returns the targets (direct included)."""
    level = args.log_level.upper()
    up_port = free_port()
    if args.upstream_cmd:
        up_cmd = args.upstream_cmd.format(port=up_port).split()
    else:
        up_cmd = _neogate_cmd(
            "--log-level",
            level,
            "sim",
            "static",
            "--port",
            str(up_port),
            "--model",
            args.model,
            "--completion-tokens",
            str(args.completion_tokens),
        )
    upstream = Proc.start("upstream", up_cmd, out / "upstream.log")
    targets = {"direct": Target("direct", f"http://127.0.0.1:{up_port}", "sk-direct", upstream)}
    if "neogate" in names:
        port, data = free_port(), out / "neogate-data"
        data.mkdir(parents=True, exist_ok=True)
        cfg_path = out / "neogate.yaml"
        cfg_path.write_text(
            NEOGATE_CONFIG.format(
                port=port,
                upstream_port=up_port,
                model=args.model,
                data=data,
                ledger=args.neogate_ledger,
            )
        )
        key, admin = "sk-bench-" + secrets.token_hex(8), "sk-admin-" + secrets.token_hex(8)
        env = {
            "NEOGATE_BENCH_KEY": key,
            "NEOGATE_ADMIN_KEY": admin,
            "NEOGATE_SECRET": secrets.token_hex(16),
        }
        proc = Proc.start(
            "neogate",
            _neogate_cmd("--log-level", level, "serve", "--config", str(cfg_path)),
            out / "neogate.log",
            env,
        )
        targets["neogate"] = Target("neogate", f"http://127.0.0.1:{port}", key, proc, admin)
    if "litellm" in names:
        t0 = time.monotonic()
        litellm_bin, version, installed = ensure_litellm(Path(args.venv))
        print(
            f"litellm {version} in {args.venv}"
            + (f" (installed in {time.monotonic() - t0:.0f} s)" if installed else "")
        )
        port, master = free_port(), "sk-litellm-" + secrets.token_hex(8)
        cfg_path = out / "litellm.yaml"
        cfg_path.write_text(
            LITELLM_CONFIG.format(upstream_port=up_port, model=args.model, master_key=master)
        )
        log_cfg = out / "litellm-logging.json"
        log_cfg.write_bytes(orjson.dumps(uvicorn_log_config(level)))
        env = {
            "LITELLM_LOG": level,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
        }
        cmd = [
            str(litellm_bin),
            "--config",
            str(cfg_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
            "--log_config",
            str(log_cfg),
        ]
        proc = Proc.start("litellm", cmd, out / "litellm.log", env)
        targets["litellm"] = Target(
            "litellm", f"http://127.0.0.1:{port}", master, proc, version=version
        )
    return targets


def settle(targets: dict[str, Target]) -> bool:
    """Wait until every server is idle before a cell; False (and a note) when it never was."""
    procs = [t.proc for t in targets.values() if t.proc is not None]
    if wait_quiet(procs) is None:
        print("  (a server stayed busy for 20 s: this cell is measured anyway)", flush=True)
        return False
    return True


def _load_cfg(
    args: argparse.Namespace, t: Target, mode: str, level: int, seconds: float, seed: int
) -> LoadConfig:
    from loadtest.schedule import parse_distribution

    return LoadConfig(
        url=t.url,
        schedule=constant_schedule(level, seconds),
        model=args.model,
        keys=(t.key,),
        stream_ratio=1.0 if mode == "streamed" else 0.0,
        seed=seed,
        timeout=args.timeout,
        prompt_tokens=parse_distribution(args.prompt_tokens),
        max_tokens=parse_distribution(args.max_tokens),
        client=args.client,
        usage_key=t.usage_key,
    )


async def measure(
    args: argparse.Namespace,
    targets: dict[str, Target],
    out: Path,
    names: list[str],
    modes: list[str],
    levels: list[int],
) -> tuple[dict[tuple[str, int, str], Cell], list[str]]:
    cells: dict[tuple[str, int, str], Cell] = {}
    noisy: list[str] = []  # cells measured while a server was still busy
    for name in names:
        t = targets[name]
        await run_load(_load_cfg(args, t, "buffered", 8, args.warmup, 99), usage=False)
    scripts = _wrk_scripts(args, targets, out, names)
    for rep in range(args.repeats):
        for level in [int(x) for x in args.wrk_levels.split(",") if x] if scripts else []:
            for name in names:
                if not settle(targets):
                    noisy.append(f"{WRK_MODE} c={level} {name} r{rep}")
                _measure_wrk(args, targets[name], scripts[name], level, rep, cells)
        for mode in modes:
            for level in levels:
                # Targets take turns inside each cell so slow drift on the machine hits all alike.
                for name in names:
                    t = targets[name]
                    if not settle(targets):
                        noisy.append(f"{mode} c={level} {name} r{rep}")
                    cfg = _load_cfg(args, t, mode, level, args.duration, rep)
                    cpu0 = t.proc.cpu_seconds() if t.proc else 0.0
                    res = await run_load(cfg, usage=name == "neogate")
                    cpu = (t.proc.cpu_seconds() if t.proc else 0.0) - cpu0
                    res.meta["label"] = f"{name}-{mode}-c{level}-r{rep}"
                    save_results(out / "runs" / f"{res.meta['label']}.jsonl", res.meta, res.records)
                    s = summarize(res.records)
                    c = cells.setdefault((mode, level, name), Cell())
                    c.req_per_s.append(s.req_per_s)
                    if s.e2e is not None:
                        c.p50.append(s.e2e.p50)
                        c.p99.append(s.e2e.p99)
                    if s.ttft is not None:
                        c.ttft_p50.append(s.ttft.p50)
                    if s.ok:
                        c.cpu_ms_per_req.append(cpu / s.ok * 1e3)
                    c.errors += s.requests - s.ok
                    c.requests += s.requests
                    print(
                        f"  r{rep} {mode:8} c={level:<4} {name:8} {s.req_per_s:9.1f} req/s"
                        f"  p50 {fmt_ms(s.e2e.p50 if s.e2e else None)}"
                        f"  p99 {fmt_ms(s.e2e.p99 if s.e2e else None)} ms"
                        f"  errors {s.requests - s.ok}",
                        flush=True,
                    )
    return cells, noisy


def _wrk_scripts(
    args: argparse.Namespace, targets: dict[str, Target], out: Path, names: list[str]
) -> dict[str, Path]:
    """One wrk script per target: the loadgen's buffered request, with the target's key."""
    if not have_wrk():
        print("wrk not found (apt-get install wrk): no maximum-throughput runs", flush=True)
        return {}
    from loadtest.loadgen import make_prompt
    from loadtest.schedule import parse_distribution

    rng = random.Random(7)
    body = orjson.dumps(
        {
            "model": args.model,
            "messages": [
                {
                    "role": "user",
                    "content": make_prompt(parse_distribution(args.prompt_tokens).sample(rng), rng),
                }
            ],
            "max_tokens": parse_distribution(args.max_tokens).sample(rng),
        }
    ).decode()
    return {
        n: post_script(out / f"wrk-{n}.lua", body, {"Authorization": f"Bearer {targets[n].key}"})
        for n in names
    }


def _measure_wrk(
    args: argparse.Namespace,
    t: Target,
    script: Path,
    level: int,
    rep: int,
    cells: dict[tuple[str, int, str], Cell],
) -> None:
    """Maximum throughput with wrk (a C client): a Python client would saturate first."""
    cpu0 = t.proc.cpu_seconds() if t.proc else 0.0
    res = run_wrk(
        t.url + "/v1/chat/completions", script, level, args.duration, timeout_s=args.timeout
    )
    cpu = (t.proc.cpu_seconds() if t.proc else 0.0) - cpu0
    c = cells.setdefault((WRK_MODE, level, t.name), Cell())
    c.req_per_s.append(res.rps)
    if res.p50_ms is not None and res.p99_ms is not None:
        c.p50.append(res.p50_ms / 1e3)
        c.p99.append(res.p99_ms / 1e3)
    ok = res.requests - res.non2xx
    if ok > 0:
        c.cpu_ms_per_req.append(cpu / ok * 1e3)
    c.errors += res.errors
    c.requests += res.requests
    print(
        f"  r{rep} {WRK_MODE} c={level:<4} {t.name:8} {res.rps:9.1f} req/s"
        f"  p50 {res.p50_ms or 0:8.2f}  p99 {res.p99_ms or 0:8.2f} ms  errors {res.errors}"
        f"  (wrk CPU {res.cpu_s:.1f}s)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    names = [n for n in args.targets.split(",") if n]
    modes = [m for m in args.modes.split(",") if m]
    levels = [int(x) for x in args.levels.split(",") if x]
    bad = [n for n in names if n not in TARGETS] + [m for m in modes if m not in MODES]
    if bad or not levels:
        print(f"compare_litellm: unknown targets/modes {bad} or no levels", file=sys.stderr)
        return 2
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"loadtest/results/compare-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    targets: dict[str, Target] = {}
    try:
        targets = start_all(args, out, names)
        for t in targets.values():
            wait_ready(t.proc, t.url, t.key, args.model, timeout=120.0)
        cells, noisy = _run(measure(args, targets, out, names, modes, levels))
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"compare_litellm: {exc}", file=sys.stderr)
        for t in targets.values():
            if t.proc is not None:
                print(t.proc.tail(), file=sys.stderr)
        return 1
    finally:
        for t in targets.values():
            if t.proc is not None:
                t.proc.stop()
    wrk_levels = sorted({lv for (m, lv, _) in cells if m == WRK_MODE})
    body = render_tables(cells, names, modes, levels)
    if wrk_levels:
        body += render_tables(cells, names, [WRK_MODE], wrk_levels)
    body += ["## Goals (issue 6)", "", *goals(cells, levels), ""]
    body += [
        "Cells measured although a server stayed busy (see Settings, isolation): "
        + (", ".join(noisy) if noisy else "none"),
        "",
    ]
    body += plots(out, names, modes, max(levels))
    report = out / "compare.md"
    litellm = targets.get("litellm")
    write_markdown(report, args, litellm.version if litellm else None, body, argv)
    print("\n".join(body))
    print(f"report: {report}")
    return 0


def _run(coro: Any) -> Any:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        return runner.run(coro)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
