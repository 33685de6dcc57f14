"""The `neogate keys` command: create, list and revoke tenant API keys in the ledger database.

It finds the database the way `neogate serve` does (`gateway.cli.ledger_location`) and
uses the same server secret, so the keys it creates are the ones the gateway accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, TextIO

from gateway.cli.ledger_location import CliError, LedgerLocation, locate_ledger
from gateway.cli.output import render
from gateway.metering.ledger import DEFAULT_LEDGER_PATH


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
    from gateway.metering.ledger.key_tables import PostgresKeyBackend, SqliteKeyBackend
    from gateway.state import secretfile
    from gateway.state.keys import KeyStore

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
