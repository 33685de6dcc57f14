"""The durable ledger: one row per attempt, SQLite (WAL) or PostgreSQL, group commit and spool.

`neogate serve` without a config and `neogate usage` without a config meet at
`DEFAULT_LEDGER_PATH` (relative to the working directory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.metering.ledger.rows import LedgerRow, LedgerStore, LedgerUnavailable
from gateway.metering.ledger.spool import Spool
from gateway.metering.ledger.writer import LedgerStats, LedgerWriteFailed, LedgerWriter

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

DEFAULT_DATA_DIR = Path("neogate-data")
DEFAULT_LEDGER_PATH = DEFAULT_DATA_DIR / "ledger.db"
DEFAULT_SPOOL_PATH = DEFAULT_DATA_DIR / "ledger.spool"

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_LEDGER_PATH",
    "DEFAULT_SPOOL_PATH",
    "LedgerRow",
    "LedgerStats",
    "LedgerStore",
    "LedgerUnavailable",
    "LedgerWriteFailed",
    "LedgerWriter",
    "Spool",
    "build_writer",
    "make_store",
]


def make_store(
    kind: str,
    *,
    path: str | Path = DEFAULT_LEDGER_PATH,
    dsn: str | None = None,
    schema: str = "neogate",
    create: bool = True,
) -> LedgerStore:
    """A SQLite store at `path` (kind "sqlite") or a PostgreSQL store at `dsn` ("postgres")."""
    if kind == "sqlite":
        from gateway.metering.ledger.sqlite import SqliteLedger

        return SqliteLedger(path, create=create)
    if kind == "postgres":
        if not dsn:
            raise ValueError("a postgres ledger needs a dsn")
        from gateway.metering.ledger.postgres import PostgresLedger

        return PostgresLedger(dsn, schema=schema, create=create)
    raise ValueError(f"unknown ledger kind {kind!r}")


def build_writer(
    kind: str,
    *,
    path: str | Path = DEFAULT_LEDGER_PATH,
    dsn: str | None = None,
    spool_path: str | Path = DEFAULT_SPOOL_PATH,
    registry: CollectorRegistry | None = None,
    schema: str = "neogate",
    adopt: Sequence[Path] = (),
    alone: Callable[[], bool] | None = None,
) -> LedgerWriter:
    """A writer over `make_store(...)` with its spool; call `await writer.start()` next.

    `adopt`: spools of worker indices no longer run, moved into this one at start.
    `alone`: whether the recording request is the only one in flight (`LedgerWriter`).
    """
    store = make_store(kind, path=path, dsn=dsn, schema=schema)
    return LedgerWriter(store, Spool(spool_path), adopt=adopt, registry=registry, alone=alone)
