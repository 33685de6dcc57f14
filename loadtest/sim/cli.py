"""The `neogate sim worker|provider|static` commands: run one simulated backend until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from gateway.profiles import load_profile
from loadtest.sim.common import start_site
from loadtest.sim.faults import FAULTS
from loadtest.sim.provider import ProviderOptions, create_provider_app
from loadtest.sim.static import create_static_app
from loadtest.sim.static_raw import StaticAnswers, start_static_raw
from loadtest.sim.worker import WorkerOptions, create_worker_app
from policies.spec import ThroughputProfileSpec


def _measured_profile(ref: str) -> ThroughputProfileSpec:
    try:
        return load_profile(ref)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _profile(text: str) -> dict[int, float]:
    """`1:215,50:8018` -> {1: 215.0, 50: 8018.0}."""
    try:
        pairs = (item.split(":") for item in text.split(",") if item.strip())
        profile = {int(c): float(t) for c, t in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'batch:tokens_per_s,...', got {text!r}"
        ) from None
    if not profile or any(c < 1 or t <= 0 for c, t in profile.items()):
        raise argparse.ArgumentTypeError("every point needs batch >= 1 and tokens_per_s > 0")
    return profile


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")


def _generating(p: argparse.ArgumentParser, defaults: Any) -> None:
    _common(p)
    p.add_argument(
        "--model", dest="model_ids", action="append", help="served model id (repeatable)"
    )
    p.add_argument(
        "--time-scale", type=float, default=defaults.time_scale, help="0.01 = 100x faster"
    )
    p.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--fault", choices=sorted(FAULTS), default=None, help="fault for every request")


def add_sim_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add `sim worker|provider|static` to the neogate command line."""
    sim = subparsers.add_parser("sim", help="run a simulated backend (OpenAI wire format)")
    kinds = sim.add_subparsers(dest="sim_kind", required=True)
    sim.set_defaults(func=run_sim)

    w = WorkerOptions()
    worker = kinds.add_parser(
        "worker", help="a vLLM/SGLang-like GPU worker with continuous batching"
    )
    _generating(worker, w)
    worker.add_argument("--decode-profile", type=_profile, default=None, help="e.g. 1:215,50:8018")
    worker.add_argument(
        "--profile",
        type=_measured_profile,
        default=None,
        help="a shipped profile name or a profile YAML file (overrides --decode-profile, "
        "--prefill-tokens-per-s and the default --max-batch)",
    )
    worker.add_argument("--prefill-tokens-per-s", type=float, default=w.prefill_tokens_per_s)
    worker.add_argument("--max-batch", type=int, default=w.max_batch)
    worker.add_argument("--kv-capacity-tokens", type=int, default=w.kv_capacity_tokens)
    worker.add_argument("--max-model-len", type=int, default=w.max_model_len)
    worker.add_argument("--flavor", choices=("vllm", "sglang"), default=w.flavor)

    pr = ProviderOptions()
    provider = kinds.add_parser("provider", help="a Groq-like external provider")
    _generating(provider, pr)
    provider.add_argument("--ttft-s-mean", type=float, default=pr.ttft_s_mean)
    provider.add_argument("--ttft-s-jitter", type=float, default=pr.ttft_s_jitter)
    provider.add_argument("--tokens-per-s", type=float, default=pr.tokens_per_s)
    provider.add_argument("--prefill-tokens-per-s", type=float, default=pr.prefill_tokens_per_s)
    provider.add_argument("--rpm-limit", type=int, default=None)
    provider.add_argument(
        "--rpd-limit",
        type=int,
        default=None,
        help="requests per day; with Groq timings (the default) the x-ratelimit-*-requests "
        "headers report this budget, as Groq does, and never the per-minute one",
    )
    provider.add_argument("--tpm-limit", type=int, default=None)
    provider.add_argument("--no-groq-timings", dest="groq_timings", action="store_false")
    provider.add_argument("--prompt-cache", action="store_true")
    provider.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")

    static = kinds.add_parser("static", help="fixed precomputed answers (benchmark baseline)")
    _common(static)
    static.add_argument("--model", default="static-model")
    static.add_argument("--completion-tokens", type=int, default=16)
    static.add_argument("--prompt-tokens", type=int, default=10)
    static.add_argument(
        "--aiohttp",
        action="store_true",
        help="serve through aiohttp instead of the bare protocol server (more CPU per request)",
    )


def build_app(args: argparse.Namespace) -> web.Application:
    """The application the parsed `sim` arguments describe."""
    if args.sim_kind == "static":
        return create_static_app(args.model, args.completion_tokens, args.prompt_tokens)
    common: dict[str, Any] = {
        "time_scale": args.time_scale,
        "default_max_tokens": args.default_max_tokens,
        "seed": args.seed,
        "fault": args.fault,
    }
    if args.model_ids:
        common["model_ids"] = tuple(args.model_ids)
    if args.sim_kind == "worker":
        worker: dict[str, Any] = {
            "prefill_tokens_per_s": args.prefill_tokens_per_s,
            "max_batch": args.max_batch,
            "kv_capacity_tokens": args.kv_capacity_tokens,
            "max_model_len": args.max_model_len,
            "flavor": args.flavor,
        }
        if args.decode_profile:
            worker["decode_tokens_per_s"] = args.decode_profile
        if args.profile is not None:
            worker["profile"] = args.profile
            if args.max_batch == WorkerOptions().max_batch:
                worker["max_batch"] = args.profile.max_batch
        return create_worker_app(WorkerOptions(**common, **worker))
    return create_provider_app(
        ProviderOptions(
            **common,
            ttft_s_mean=args.ttft_s_mean,
            ttft_s_jitter=args.ttft_s_jitter,
            tokens_per_s=args.tokens_per_s,
            prefill_tokens_per_s=args.prefill_tokens_per_s,
            rpm_limit=args.rpm_limit,
            tpm_limit=args.tpm_limit,
            rpd_limit=args.rpd_limit,
            groq_timings=args.groq_timings,
            prompt_cache=args.prompt_cache,
            api_key=args.api_key,
        )
    )


async def _serve(app: web.Application, host: str, port: int, kind: str) -> None:
    runner, bound = await start_site(app, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(sig, stop.set)
    print(f"neogate sim {kind} listening on http://{host}:{bound}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def run_sim(args: argparse.Namespace) -> int:
    """Run the simulated backend described by `args` until SIGINT/SIGTERM; 0 on a clean stop."""
    if args.sim_kind == "static" and not args.aiohttp:
        answers = StaticAnswers(args.model, args.completion_tokens, args.prompt_tokens)
        _run(_serve_raw(answers, args.host, args.port))
        return 0
    try:
        app = build_app(args)
    except (ValueError, TypeError) as exc:
        print(f"neogate sim: {exc}", file=sys.stderr)
        return 2
    _run(_serve(app, args.host, args.port, args.sim_kind))
    return 0


async def _serve_raw(answers: StaticAnswers, host: str, port: int) -> None:
    server, bound = await start_static_raw(host, port, answers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    print(f"neogate sim static listening on http://{host}:{bound}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
