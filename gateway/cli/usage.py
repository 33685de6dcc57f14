"""The `neogate usage` and `neogate keys` commands (parsers and runners; gateway/cli/__init__.py mounts them).

Both find the database the same way `neogate serve` does: ``--ledger``/``--db``
(a SQLite file), else the ``ledger`` section of ``--config``, else the default
``neogate-data/ledger.db`` that `neogate serve` without a config writes.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import csv
import io
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from gateway.metering.ledger import DEFAULT_LEDGER_PATH, make_store
from gateway.metering.ledger.provisioning import gpu_terms, provisioning
from gateway.metering.ledger.reports import GROUP_KEYS, pricing_sheet, usage_report

if TYPE_CHECKING:
    from gateway.config import RedisSpec
    from gateway.metering.ledger.rows import LedgerStore

# The lead's gateway.state.secretfile keeps the server secret beside the ledger under this name.
SECRET_FILE_NAME = "server.secret"


class CliError(Exception):
    """A problem worth one line on stderr and exit status 1."""


@dataclass(frozen=True, slots=True)
class LedgerLocation:
    """Where the ledger (and the key table) lives, and the server secret configured for it."""

    kind: str  # "sqlite" | "postgres"
    path: Path
    dsn: str | None
    configured_secret: str | None
    schema: str = "neogate"  # PostgreSQL schema (ledger.schema_name)
    redis: RedisSpec | None = None  # replicas to tell about key changes at once

    @property
    def secret_file(self) -> Path:
        """Where `neogate serve` keeps the server secret when none is configured."""
        return self.path.parent / SECRET_FILE_NAME


def locate_ledger(config_path: str | None, sqlite_path: str | None) -> LedgerLocation:
    """Resolve --config / --ledger / the default into a LedgerLocation."""
    from gateway.config import AuthSpec, load_config, resolve_secret

    if config_path is None:
        secret = resolve_secret(AuthSpec().server_secret)
        return LedgerLocation("sqlite", Path(sqlite_path or DEFAULT_LEDGER_PATH), None, secret)
    config = load_config(config_path)
    ledger = config.ledger
    secret = resolve_secret(config.auth.server_secret)
    if sqlite_path is not None:
        return LedgerLocation("sqlite", Path(sqlite_path), None, secret)
    dsn = resolve_secret(ledger.dsn) if ledger.kind == "postgres" else None
    if ledger.kind == "postgres" and not dsn:
        raise CliError(f"{config_path}: ledger.dsn is not set (or its env variable is unset)")
    return LedgerLocation(
        ledger.kind, Path(ledger.path), dsn, secret, ledger.schema_name, config.redis
    )


def _require_sqlite_file(loc: LedgerLocation) -> None:
    if loc.kind == "sqlite" and not loc.path.is_file():
        raise CliError(
            f"no ledger at {loc.path}: run `neogate serve` from this directory first, "
            "or pass --config / --ledger"
        )


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


# --- output ------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.9f}".rstrip("0").rstrip(".") if value else "0"
    return str(value)


def render(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str, out: TextIO) -> None:
    """Write rows as an aligned table, CSV or a JSON array."""
    if fmt == "json":
        json.dump(list(rows), out, indent=2)
        out.write("\n")
        return
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
        out.write(buf.getvalue())
        return
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    numeric = [
        all(_is_number(row[i]) for row in cells) and cells != [] for i in range(len(columns))
    ]
    for line in [list(columns), *cells]:
        parts = [
            cell.rjust(w) if num else cell.ljust(w)
            for cell, w, num in zip(line, widths, numeric, strict=True)
        ]
        out.write("  ".join(parts).rstrip() + "\n")


def _is_number(text: str) -> bool:
    return text == "-" or re.fullmatch(r"-?[\d.]+(e-?\d+)?", text) is not None


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
        "local GPU: does it pay, and above what load",
    )
    p.add_argument(
        "--idle",
        action="store_true",
        help="idle GPU time per local GPU over the window, by ledger.idle_cost (needs --config)",
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
    "backend", "mode", "hours_held", "gpu_cost_usd", "prompt_tokens", "completion_tokens",
    "mean_batch", "slo_batch", "utilisation", "attributed_usd_per_m", "held_usd_per_m",
    "counterfactual_usd", "counterfactual_usd_per_m", "net_saving_usd",
    "break_even_tokens_per_s",
]  # fmt: skip


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
        out.write("\n")
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
    if since is None:
        first = await store.fetch("SELECT MIN(ts) FROM ledger")
        since = float(first[0][0]) if first and first[0][0] is not None else now
    end = now if until is None else until
    lines = await idle_report(store, gpus, since, end, config.ledger.idle_cost)
    columns = ["backend", "tenant", "hours", "held_usd", "attributed_usd", "idle_usd"]
    render([line.as_dict() for line in lines], columns, args.format, out)


def run_usage(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run `neogate usage`; returns the exit status."""
    stream = sys.stdout if out is None else out
    try:
        loc = locate_ledger(args.config, args.ledger)
        _require_sqlite_file(loc)
        asyncio.run(_usage(args, loc, stream))
    except CliError as exc:
        print(f"neogate usage: {exc}", file=sys.stderr)
        return 1
    return 0


# --- neogate keys ------------------------------------------------------------------------


def add_keys_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `keys create|list|revoke` to the CLI's subparsers; run with `run_keys(args)`."""
    p: argparse.ArgumentParser = subparsers.add_parser("keys", help="tenant API keys")
    sub = p.add_subparsers(dest="keys_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        where = q.add_mutually_exclusive_group()
        where.add_argument("--config", help="policy file (its ledger database and secret)")
        where.add_argument(
            "--db", help=f"SQLite file holding the keys (default {DEFAULT_LEDGER_PATH})"
        )

    create = sub.add_parser("create", help="create a key (shown once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--label", default="")
    common(create)
    listing = sub.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--tenant")
    listing.add_argument("--format", choices=["table", "csv", "json"], default="table")
    common(listing)
    revoke = sub.add_parser("revoke", help="revoke a key; refused from the next request on")
    revoke.add_argument("key_id")
    common(revoke)
    return p


async def _keys(args: argparse.Namespace, loc: LedgerLocation, out: TextIO) -> int:
    from gateway.state import secretfile
    from gateway.state.keys import KeyStore, PostgresKeyBackend, SqliteKeyBackend

    # The same secret `neogate serve` uses, or the keys created here would not match.
    secret = (loc.configured_secret or secretfile.load_or_create(loc.secret_file)).encode()
    backend: SqliteKeyBackend | PostgresKeyBackend
    if loc.kind == "postgres":
        assert loc.dsn is not None
        backend = PostgresKeyBackend(loc.dsn, schema=loc.schema)
    else:
        backend = SqliteKeyBackend(loc.path)
    store = KeyStore(backend, secret)
    await store.open()
    try:
        if args.keys_command == "create":
            key_id, key = await store.create(args.tenant, args.label)
            await _tell_replicas(loc)
            out.write(f"key_id: {key_id}\ntenant: {args.tenant}\nkey:    {key}\n")
            out.write("Store the key now: it is not kept and cannot be shown again.\n")
            return 0
        if args.keys_command == "revoke":
            if not await store.revoke(args.key_id):
                raise CliError(f"no active key {args.key_id!r}")
            await _tell_replicas(loc)
            out.write(f"revoked {args.key_id}\n")
            return 0
        records = await store.list(args.tenant)
        rows = [
            {
                "key_id": r.key_id,
                "tenant": r.tenant,
                "label": r.label,
                "created": _iso(r.created),
                "revoked": _iso(r.revoked_at) if r.revoked_at is not None else None,
            }
            for r in records
        ]
        render(rows, ["key_id", "tenant", "label", "created", "revoked"], args.format, out)
        return 0
    finally:
        await store.close()


async def _tell_replicas(loc: LedgerLocation) -> None:
    """With Redis configured, running replicas refresh their keys now instead of at their next poll."""
    if loc.redis is None:
        return
    from gateway.state.shared import publish_keys_changed

    try:
        await publish_keys_changed(loc.redis)
    except Exception as exc:  # the key change itself is stored; only the nudge failed
        print(
            f"neogate keys: could not notify replicas through Redis ({type(exc).__name__}); "
            "they pick the change up at their next key refresh",
            file=sys.stderr,
        )


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def run_keys(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run `neogate keys ...`; returns the exit status."""
    stream = sys.stdout if out is None else out
    try:
        loc = locate_ledger(args.config, args.db)
        return asyncio.run(_keys(args, loc, stream))
    except CliError as exc:
        print(f"neogate keys: {exc}", file=sys.stderr)
        return 1
