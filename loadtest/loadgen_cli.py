"""`neogate loadtest`: command-line front of the load generator (arguments, progress line, summary).

Also runs on its own: `python -m loadtest.loadgen_cli --url http://127.0.0.1:8080 ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TextIO

import orjson

from loadtest.loadgen import LoadConfig, Progress, RunOutput, UrlError, parse_target, run_load
from loadtest.results import format_summary, save_results, summarize
from loadtest.schedule import (
    Schedule,
    ScheduleError,
    Step,
    constant_schedule,
    parse_distribution,
    parse_schedule,
)
from loadtest.usage_api import describe_usage

# Without a time bound, a count-bounded run still stops after this long.
_COUNT_ONLY_CAP_S = 600.0
_DEFAULT_DURATION_S = 10.0


def add_loadtest_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `loadtest` on a subparsers object."""
    p = subparsers.add_parser(
        "loadtest",
        help="send load to an OpenAI-compatible URL and summarise latency and throughput",
        description="Closed loop (--concurrency) or open loop (--rate, Poisson arrivals, latency "
        "from the scheduled start). Loopback targets only unless --allow-remote.",
    )
    configure_parser(p)


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add the load-test options to `p`."""
    p.add_argument("--url", required=True, help="base URL (http://127.0.0.1:8080) or full endpoint")
    p.add_argument("--duration", type=float, help="seconds (default 10, or the schedule's length)")
    p.add_argument("--requests", type=int, help="stop after this many requests")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop: requests in flight (default 8)")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    p.add_argument(
        "--schedule",
        help='steps "LEVEL:DUR,A-B:DUR,burst:N" e.g. "1:10s,32:20s,1:10s" or "burst:400" '
        "(levels are concurrency, whole numbers, or req/s with --mode open; a burst fires "
        "N requests at once at that point)",
    )
    p.add_argument("--mode", choices=("closed", "open"), help="default: open with --rate")
    p.add_argument("--stream-ratio", type=float, default=0.0, help="share streamed, 0..1")
    p.add_argument(
        "--prompt-tokens", default="const:128", help="const:N | uniform:A-B | lognormal:MEAN,SIGMA"
    )
    p.add_argument("--max-tokens", default="const:64", help="distribution of max_tokens")
    p.add_argument(
        "--model", help="model name in every request (default: the first of GET /v1/models)"
    )
    p.add_argument("--keys", default="", help="tenant API keys, comma-separated, used round-robin")
    p.add_argument("--usage-key", help="key for GET /v1/usage (default: the first tenant key)")
    p.add_argument("--no-usage", action="store_true", help="do not query GET /v1/usage")
    p.add_argument(
        "--pricing", help="gateway policy YAML whose prices go into the results metadata"
    )
    p.add_argument("--out", help="save per-request results (.jsonl or .csv)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback URL")
    p.add_argument("--seed", type=int, default=0, help="seed for lengths, mix and arrivals")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument(
        "--client",
        choices=("auto", "raw", "aiohttp"),
        default="auto",
        help="raw HTTP/1.1 (fastest, http only) or aiohttp (default: raw for http)",
    )
    p.add_argument("--max-connections", type=int, default=1024, help="open-loop connection cap")
    p.add_argument("--extra-body", default="{}", help="JSON merged into every request body")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """Build the LoadConfig; raises ScheduleError/ValueError on bad values."""
    mode: Literal["closed", "open"] = "open" if args.rate is not None else "closed"
    if args.mode is not None:
        mode = "open" if args.mode == "open" else "closed"
    if args.schedule:
        if args.rate is not None or args.concurrency is not None:
            raise ScheduleError("--schedule sets the levels; drop --rate/--concurrency")
        schedule = parse_schedule(args.schedule)
        if args.duration is not None:
            schedule = _truncate(schedule, args.duration)
        check_schedule(schedule, mode)
    else:
        if args.duration is not None:
            duration = args.duration
        else:
            duration = _COUNT_ONLY_CAP_S if args.requests else _DEFAULT_DURATION_S
        if mode == "open":
            if args.rate is None or args.rate <= 0:
                raise ScheduleError("open loop needs --rate > 0 (or a --schedule of rates)")
            schedule = constant_schedule(args.rate, duration)
        else:
            conc = args.concurrency if args.concurrency is not None else 8
            if conc < 1:
                raise ScheduleError("--concurrency must be >= 1")
            schedule = constant_schedule(conc, duration)
    if not 0.0 <= args.stream_ratio <= 1.0:
        raise ScheduleError("--stream-ratio must be within 0..1")
    if args.requests is not None and args.requests < 1:
        raise ScheduleError("--requests must be >= 1")
    extra = orjson.loads(args.extra_body)
    if not isinstance(extra, dict):
        raise ScheduleError("--extra-body must be a JSON object")
    keys = tuple(k.strip() for k in args.keys.split(",") if k.strip())
    return LoadConfig(
        url=args.url,
        schedule=schedule,
        mode=mode,
        max_requests=args.requests,
        stream_ratio=args.stream_ratio,
        prompt_tokens=parse_distribution(args.prompt_tokens),
        max_tokens=parse_distribution(args.max_tokens),
        model=args.model or "",
        keys=keys,
        seed=args.seed,
        timeout=args.timeout,
        client=args.client,
        max_connections=args.max_connections,
        extra_body=extra,
        allow_remote=args.allow_remote,
        usage_key=args.usage_key,
    )


def check_schedule(schedule: Schedule, mode: Literal["closed", "open"]) -> None:
    """Refuse a schedule that would run differently from how it reads, or send nothing."""
    for s in schedule.steps:
        if s.burst or mode == "open":
            continue
        for level in (s.start_level, s.end_level):
            if level != int(level):
                raise ScheduleError(
                    f"level {level:g}: closed-loop levels are concurrency, a whole number of "
                    "requests in flight; for a rate in req/s add --mode open"
                )
    if not schedule.burst_total and schedule.max_level <= 0:
        raise ScheduleError("the schedule sends nothing: every level is 0 and it has no burst")
    if not schedule.burst_total and schedule.duration <= 0:
        raise ScheduleError("the schedule lasts 0 s and has no burst")


def default_model(url: str, keys: tuple[str, ...], timeout_s: float = 10.0) -> str:
    """The first model of the target's `GET /v1/models` (a ScheduleError says why not)."""
    import httpx

    target = parse_target(url, allow_remote=True)
    models_url = target.origin + target.path.removesuffix("/chat/completions") + "/models"
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    try:
        resp = httpx.get(models_url, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ScheduleError(f"no --model given and GET {models_url} failed: {exc}") from exc
    try:
        data = resp.json().get("data") if resp.status_code == 200 else None
    except ValueError:
        data = None
    ids: list[str] = [
        m["id"] for m in data or [] if isinstance(m, dict) and isinstance(m.get("id"), str)
    ]
    if not ids:
        raise ScheduleError(
            f"no --model given and GET {models_url} listed none "
            f"(HTTP {resp.status_code}: {resp.text[:200]}); pass --model"
        )
    return ids[0]


def _truncate(schedule: Schedule, limit: float) -> Schedule:
    """The schedule cut at `limit` seconds."""
    steps: list[Step] = []
    t = 0.0
    for s in schedule.steps:
        if t >= limit:
            break
        if s.duration and t + s.duration > limit:
            cut = limit - t
            steps.append(Step(s.start_level, s.level_at(cut), cut))
        else:
            steps.append(s)
        t += s.duration
    return Schedule(tuple(steps))


async def _progress_loop(p: Progress, out: TextIO, tty: bool) -> None:
    last_done, period = 0, 0.25 if tty else 5.0
    loop = asyncio.get_running_loop()
    t_start = loop.time()
    while True:
        await asyncio.sleep(period)
        elapsed = loop.time() - t_start
        rate = (p.done - last_done) / period
        last_done = p.done
        line = (
            f"{elapsed:6.1f}/{p.total:g}s  sent {p.started}  done {p.done}  errors {p.errors}"
            f"  in flight {p.inflight}  {rate:8.0f} req/s"
        )
        out.write(("\r" + line + "   ") if tty else (line + "\n"))
        out.flush()


async def run_with_progress(cfg: LoadConfig, show: bool, usage: bool = True) -> RunOutput:
    """Run the load with a progress line on stderr and Ctrl-C stopping it cleanly."""
    progress = Progress()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    ticker: asyncio.Task[None] | None = None
    stop = asyncio.Event()

    def start_ticker() -> None:
        nonlocal ticker
        if show:
            ticker = loop.create_task(_progress_loop(progress, sys.stderr, sys.stderr.isatty()))

    def on_sigint() -> None:
        # First Ctrl-C: stop sending and keep what was measured; second: give up.
        if stop.is_set() and task is not None:
            task.cancel()
        stop.set()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await run_load(cfg, progress, usage=usage, on_start=start_ticker, stop=stop)
    finally:
        if ticker is not None:
            ticker.cancel()
            if sys.stderr.isatty():
                sys.stderr.write("\n")
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)


def run_async(coro: Any) -> Any:
    """Run on uvloop when it is installed."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        return runner.run(coro)


def summary_json(out: RunOutput) -> dict[str, Any]:
    """The summary as plain data (for --json and scripts)."""
    from dataclasses import asdict

    return asdict(summarize(out.records))


def run_loadtest(args: argparse.Namespace) -> int:
    """Entry point of `neogate loadtest`; returns the exit status."""
    try:
        cfg = config_from_args(args)
        if args.model is None:
            parse_target(cfg.url, cfg.allow_remote)  # the URL's own error comes first
            cfg = replace(cfg, model=default_model(cfg.url, cfg.keys))
            print(f"model         {cfg.model} (the first of GET /v1/models)", file=sys.stderr)
        pricing = None
        if args.pricing:
            from loadtest.report_cost import pricing_sheet_from_config

            pricing = pricing_sheet_from_config(Path(args.pricing))
        out = run_async(run_with_progress(cfg, not args.no_progress, usage=not args.no_usage))
    except (ScheduleError, UrlError, ValueError, orjson.JSONDecodeError) as exc:
        print(f"neogate loadtest: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("neogate loadtest: interrupted", file=sys.stderr)
        return 130
    if pricing is not None:
        out.meta["pricing"] = pricing
    if args.out:
        save_results(Path(args.out), out.meta, out.records)
    summary = summarize(out.records)
    if args.json:
        print(orjson.dumps(summary_json(out), option=orjson.OPT_INDENT_2).decode())
    else:
        print(f"target        {out.meta['url']}  ({cfg.mode} loop, schedule {cfg.schedule})")
        print(format_summary(summary))
        if not args.no_usage:
            print(describe_usage(out.meta))
        if args.out:
            print(f"results       {args.out}")
    if summary.mostly_failed:
        why = "no request was sent"
        if summary.dominant_error is not None:
            kind, count, detail = summary.dominant_error
            why = f"{summary.requests - summary.ok} of {summary.requests} requests failed; " + (
                f"most with {kind} ({count})" + (f": {detail}" if detail else "")
            )
        print(f"neogate loadtest: {why}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtest.loadgen_cli`."""
    p = argparse.ArgumentParser(prog="neogate loadtest")
    configure_parser(p)
    return run_loadtest(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
