"""The `neogate usage` command: usage, pricing sheet, provisioning and idle cost from the ledger.

It finds the database the same way `neogate serve` does: ``--ledger``/``--db``
(a SQLite file), else the ``ledger`` section of ``--config``, else the default
``neogate-data/ledger.db`` that `neogate serve` without a config writes.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import json
import re
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from gateway.cli.ledger_location import CliError, LedgerLocation, locate_ledger, require_sqlite_file
from gateway.cli.output import render
from gateway.metering.ledger import DEFAULT_LEDGER_PATH, make_store
from gateway.metering.ledger.provisioning import gpu_terms, provisioning
from gateway.metering.ledger.reports import GROUP_KEYS, pricing_sheet, usage_report

if TYPE_CHECKING:
    from gateway.metering.ledger.rows import LedgerStore

# --- time arguments ----------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+)([dh])$")


def parse_since(value: str, now: float) -> float:
    """``YYYY-MM-DD`` (start of that UTC day) or ``7d`` / ``12h`` before `now`."""
    m = _RELATIVE.match(value)
    if m:
        return now - int(m.group(1)) * (86_400 if m.group(2) == "d" else 3_600)
    try:
        t = time.strptime(value, "%Y-%m-%d")
    except ValueError as exc:
        raise CliError(f"bad date {value!r}: use YYYY-MM-DD, 7d or 12h") from exc
    return float(calendar.timegm(t))


def parse_until(value: str, now: float) -> float:
    """``YYYY-MM-DD`` includes that whole UTC day; ``7d``/``12h`` mean that long ago."""
    if _RELATIVE.match(value):
        return parse_since(value, now)
    return parse_since(value, now) + 86_400


# --- neogate usage -----------------------------------------------------------------------


def add_usage_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `usage` to the CLI's subparsers; run it with `run_usage(args)`."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "usage",
        help="usage and cost from the ledger, or the per-backend pricing sheet",
        description=f"Report tokens and cost from the ledger (default {DEFAULT_LEDGER_PATH}).",
    )
    p.add_argument("--config", help="policy file whose ledger section names the database")
    p.add_argument("--ledger", help="a SQLite ledger file (overrides the config's)")
    p.add_argument("--since", help="YYYY-MM-DD (UTC), or 7d / 12h ago")
    p.add_argument("--until", help="YYYY-MM-DD inclusive (UTC), or 7d / 12h ago")
    p.add_argument("--tenant", help="only this tenant")
    p.add_argument("--by", default="day,model", help=f"group by, from: {','.join(GROUP_KEYS)}")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument(
        "--pricing",
        action="store_true",
        help="the pricing sheet per backend, and (with --config) the provisioning truth per "
        "local GPU: does it pay, and above what load (hours held: a reserved GPU's are the "
        "window, an on_demand GPU's the uptime the gateway observed)",
    )
    p.add_argument(
        "--idle",
        action="store_true",
        help="idle GPU time per local GPU over the window, by ledger.idle_cost (needs --config; "
        "an on_demand GPU is held for its observed uptime)",
    )
    return p


async def _usage(args: argparse.Namespace, loc: LedgerLocation, out: TextIO) -> None:
    now = time.time()
    since = parse_since(args.since, now) if args.since else None
    until = parse_until(args.until, now) if args.until else None
    store = make_store(
        loc.kind, path=loc.path, dsn=loc.dsn, schema=loc.schema, create=loc.kind != "sqlite"
    )
    try:
        if getattr(args, "idle", False):
            await _idle(args, store, since, until, now, out)
            return
        if args.pricing:
            sheet = [
                r.as_dict()
                for r in await pricing_sheet(store, since=since, until=until, tenant=args.tenant)
            ]
            columns = [
                "backend", "is_local", "batch", "requests", "prompt_tokens", "completion_tokens",
                "cost_usd", "effective_usd_per_m", "charged_in_usd_per_m",
                "charged_out_usd_per_m", "list_in_usd_per_m", "list_out_usd_per_m",
            ]  # fmt: skip
            truth = await _provisioning(args, store, since, until, now)
            if args.format == "json":
                json.dump({"pricing": sheet, "provisioning": truth}, out, indent=2)
                out.write("\n")
                return
            render(sheet, columns, args.format, out)
            _render_provisioning(args, truth, out)
            return
        by = [k.strip() for k in args.by.split(",") if k.strip()]
        try:
            rows = await usage_report(store, by, since=since, until=until, tenant=args.tenant)
        except ValueError as exc:
            raise CliError(str(exc)) from exc
        dicts = [r.as_dict() for r in rows]
        columns = [
            *by, "requests", "attempts", "prompt_tokens", "completion_tokens",
            "cached_tokens", "reasoning_tokens", "cost_usd",
        ]  # fmt: skip
        if args.format == "table" and len(dicts) > 1:
            totals = {c: sum(d[c] for d in dicts) for c in columns[len(by) :]}
            first = by[0] if by else "requests"
            dicts = [*dicts, {**totals, first: "TOTAL"} if by else totals]
        render(dicts, columns, args.format, out)
    finally:
        await store.close()


PROVISIONING_COLUMNS = [
    "backend", "mode", "hours_held", "hours_from", "gpu_cost_usd", "prompt_tokens",
    "completion_tokens", "mean_batch", "slo_batch", "utilisation", "attributed_usd_per_m",
    "held_usd_per_m", "counterfactual_usd", "counterfactual_usd_per_m", "net_saving_usd",
    "break_even_tokens_per_s",
]  # fmt: skip


HOURS_HELD_NOTE = (
    "hours held: reserved GPUs the whole window; on_demand GPUs the uptime the gateway's "
    "scrapes of the worker observed (hours_from), none observed: unknown"
)


async def _provisioning(
    args: argparse.Namespace,
    store: LedgerStore,
    since: float | None,
    until: float | None,
    now: float,
) -> list[dict[str, Any]] | None:
    """Provisioning truth per local GPU; None without a policy file (no GPU prices known)."""
    if args.config is None:
        return None
    from gateway.config import load_config

    terms = gpu_terms(load_config(args.config))
    rows = await provisioning(store, terms, since=since, until=until, now=now)
    return [r.as_dict() for r in rows]


def _render_provisioning(
    args: argparse.Namespace, truth: list[dict[str, Any]] | None, out: TextIO
) -> None:
    out.write("\n")
    if truth is None:
        if args.format == "table":
            out.write("provisioning truth per local GPU: pass --config (GPU prices and profiles)\n")
        return
    if not truth:
        if args.format == "table":
            out.write("provisioning truth: the policy file has no local GPU\n")
        return
    render(truth, PROVISIONING_COLUMNS, args.format, out)
    if args.format == "table":
        out.write(f"\n{HOURS_HELD_NOTE}\n")
        for r in truth:
            out.write(f"{r['advice']}\n")


async def _idle(
    args: argparse.Namespace,
    store: Any,
    since: float | None,
    until: float | None,
    now: float,
    out: TextIO,
) -> None:
    """`neogate usage --idle`: held - attributed per local GPU, as its own lines."""
    from gateway.config import load_config
    from gateway.metering.ledger.idle import idle_report

    if not args.config:
        raise CliError("--idle needs --config (the GPUs' prices and ledger.idle_cost)")
    config = load_config(args.config)
    gpus = {b.name: b.gpu.price_per_hour for b in config.backends if b.gpu is not None}
    modes = {b.name: b.gpu.mode for b in config.backends if b.gpu is not None}
    if since is None:
        first = await store.fetch("SELECT MIN(ts) FROM ledger")
        since = float(first[0][0]) if first and first[0][0] is not None else now
    end = now if until is None else until
    lines = await idle_report(store, gpus, since, end, config.ledger.idle_cost, modes)
    columns = [
        "backend", "tenant", "hours", "hours_from", "held_usd", "attributed_usd", "idle_usd"
    ]  # fmt: skip
    render([line.as_dict() for line in lines], columns, args.format, out)


def run_usage(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run `neogate usage`; returns the exit status."""
    stream = sys.stdout if out is None else out
    try:
        loc = locate_ledger(args.config, args.ledger)
        require_sqlite_file(loc)
        asyncio.run(_usage(args, loc, stream))
    except CliError as exc:
        print(f"neogate usage: {exc}", file=sys.stderr)
        return 1
    return 0
