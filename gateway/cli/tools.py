"""Subcommands beside `serve`: simulated backends, the policy simulator, routing, usage, keys, load tests."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TypeAlias

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_tool_parsers(sub: SubParsers) -> None:
    """Register every tool subcommand; each sets `func` on its namespace."""
    from gateway.cli.keys import add_keys_parser, run_keys
    from gateway.cli.usage import add_usage_parser, run_usage
    from loadtest.loadgen_cli import add_loadtest_parser, run_loadtest
    from loadtest.report import add_report_parser, run_report
    from loadtest.sim.cli import add_sim_parser, run_sim
    from loadtest.simulate.cli import add_simulate_parser, run_simulate

    _hook(sub, add_sim_parser, run_sim, "sim")
    _hook(sub, add_simulate_parser, run_simulate, "simulate")
    _hook(sub, add_usage_parser, run_usage, "usage")
    _hook(sub, add_keys_parser, run_keys, "keys")
    _hook(sub, add_loadtest_parser, run_loadtest, "loadtest")
    _hook(sub, add_report_parser, run_report, "report")
    _add_route_parser(sub)


def _hook(sub: SubParsers, add: Any, run: Any, name: str) -> None:
    before = set(sub.choices)
    add(sub)
    for added in set(sub.choices) - before:
        sub.choices[added].set_defaults(func=run)
    if name not in sub.choices:
        raise RuntimeError(f"subcommand {name} was not registered")


def _add_route_parser(sub: SubParsers) -> None:
    p = sub.add_parser(
        "route",
        help="show what the router would pick now and why",
        description="Without --url: the decision from the config's prices and cost model "
        "(no live traffic). With --url: ask a running gateway (admin key from "
        "--admin-key or NEOGATE_ADMIN_KEY) for its live decision.",
    )
    p.add_argument("--config", help="policy YAML (default: the embedded default)")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--slo-class", default="interactive")
    p.add_argument("--url", help="a running gateway, e.g. http://127.0.0.1:8080")
    p.add_argument("--admin-key")
    p.set_defaults(func=_run_route)


def _run_route(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load_config, parse_config

    if args.url:
        return _route_remote(args)
    try:
        if args.config:
            config = load_config(args.config)
        else:
            from gateway.cli.launch import default_policy_text

            config = parse_config(default_policy_text(), source="<embedded default>")
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    model = next((m for m in config.models if m.name == args.model), None)
    if model is None:
        print(
            f"unknown model {args.model!r}; known: {[m.name for m in config.models]}",
            file=sys.stderr,
        )
        return 2
    from gateway.flow.routing import Router
    from gateway.http.admin import route_explanation
    from gateway.state.live import LiveState

    specs = {b.name: b for b in config.backends}
    router = Router(config, {}, LiveState(specs, time.time()))
    out = route_explanation(router, model, args.prompt_tokens, args.max_tokens, args.slo_class)
    print(json.dumps(out, indent=2))
    return 0


def _route_remote(args: argparse.Namespace) -> int:
    import os

    import httpx

    key = args.admin_key or os.environ.get("NEOGATE_ADMIN_KEY", "")
    params = {
        "model": args.model,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "slo_class": args.slo_class,
    }
    url = f"{args.url.rstrip('/')}/admin/route"
    try:
        resp = httpx.get(
            url, params=params, headers={"Authorization": f"Bearer {key}"}, timeout=10.0
        )
    except httpx.HTTPError as exc:
        print(f"route: {url}: {exc}", file=sys.stderr)
        return 1
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code != 200:
        err = body.get("error") if isinstance(body, dict) else None
        message = err.get("message") if isinstance(err, dict) else resp.text[:300]
        print(f"route: HTTP {resp.status_code}: {message}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2))
    return 0
