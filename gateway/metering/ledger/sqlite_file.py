"""The ledger's SQLite file: its schema and in-place migrations, the page size of a new file,
and the switch to WAL mode. The store that writes it is `gateway.metering.ledger.sqlite`."""

from __future__ import annotations

import sqlite3
import time
from typing import Final

from gateway.metering.ledger.rows import COLUMNS, NULLABLE, LedgerUnavailable

_INT_COLUMNS = {
    "attempt",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "counted_prompt_tokens",
    "counted_completion_tokens",
    "divergent",
    "price_in_nusd_per_m",
    "price_out_nusd_per_m",
    "price_cached_nusd_per_m",
    "cost_nusd",
    "stream",
    "batch_size",
    "is_local",
    "marginal_cost_nusd",
    "counterfactual_cost_nusd",
}
_REAL_COLUMNS = {"ts", "ttft_s", "total_s"}


def column_sql(name: str) -> str:
    kind = "INTEGER" if name in _INT_COLUMNS else "REAL" if name in _REAL_COLUMNS else "TEXT"
    return f"{name} {kind}" + ("" if name in NULLABLE else " NOT NULL")


SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ledger ("
    + ", ".join(column_sql(c) for c in COLUMNS)
    + ", PRIMARY KEY (request_id, attempt))",
    "CREATE INDEX IF NOT EXISTS ledger_ts ON ledger (ts)",
    "CREATE INDEX IF NOT EXISTS ledger_tenant_ts ON ledger (tenant, ts)",
    # Only rows whose client sent an id: most rows have none, and an entry per NULL was one
    # b-tree of five written per row (~0.6 us and ~240 bytes of WAL a row). A lookup by id
    # (`client_request_id = ?`) implies NOT NULL, so SQLite uses it. Files made before
    # keep their full index (same name).
    "CREATE INDEX IF NOT EXISTS ledger_client_request_id ON ledger (client_request_id) "
    "WHERE client_request_id IS NOT NULL",
    # Up intervals of local workers (gateway/metering/ledger/gpu_uptime.py). WITHOUT ROWID:
    # the key is the table, so extending an interval writes one b-tree, not two. A file
    # from before it gains it here.
    "CREATE TABLE IF NOT EXISTS gpu_uptime (backend TEXT NOT NULL, observer TEXT NOT NULL, "
    "up_from REAL NOT NULL, up_to REAL NOT NULL, PRIMARY KEY (backend, observer, up_from)) "
    "WITHOUT ROWID",
)


def add_missing_columns(conn: sqlite3.Connection) -> None:
    """Ledgers created before a nullable column existed gain it in place."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(ledger)")}
    if not have:
        return  # a new file: CREATE TABLE makes every column
    for name in COLUMNS:
        if name not in have and name in NULLABLE:
            conn.execute(f"ALTER TABLE ledger ADD COLUMN {column_sql(name)}")


# Rows per INSERT statement. One statement with several rows of VALUES binds and steps
# once for all of them where executemany steps once per row: at the ~13 rows a commit
# holds at c=32, ~1.3 of ~10 us of CPU less per row (measured in-process, 2026-12-06).
# 16 x 31 columns stays under SQLite's oldest bound-variable limit (999).
ROWS_PER_INSERT: Final = 16


def insert_sql(rows: int) -> str:
    """An INSERT of `rows` rows; a row already there (request_id, attempt) is skipped."""
    one = "(" + ", ".join("?" for _ in COLUMNS) + ")"
    return (
        f"INSERT INTO ledger ({', '.join(COLUMNS)}) VALUES {', '.join([one] * rows)} "
        "ON CONFLICT (request_id, attempt) DO NOTHING"
    )


# INSERTS[n - 1] inserts n rows (SQLite keeps each prepared: a connection caches 128).
INSERTS: Final = tuple(insert_sql(n) for n in range(1, ROWS_PER_INSERT + 1))


# The page size of a new ledger file. A one-row commit writes one WAL frame (a page) per
# b-tree it touches: the table and its four indexes. At SQLite's default of 4096 that is
# ~22 KB of WAL per request; at 1024, ~6.8 KB for the same ~210-byte row (measured:
# 20,000 one-row commits, 445 MB of WAL at 4096). Less WAL per request means a
# checkpoint (copy + fsync, beside the commits) 3.3x less often for the same traffic.
# The price: full scans of 200,000 rows 17-21% slower (130 -> 158 ms by tenant), the file
# 10% larger; indexed lookups alike. A file keeps the page size it was created with.
PAGE_SIZE: Final = 1024


def is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def ensure_wal(conn: sqlite3.Connection, wait_s: float) -> None:
    """Put the file in WAL mode (it stays so); blocking, so call it off the event loop.

    Switching the journal mode needs the file to itself, and SQLite reports "database is
    locked" for that at once rather than through the busy handler: two processes opening
    a new file together (`serve --workers N`: one worker's ledger, the other's key store)
    would fail. The mode is read first (already WAL: nothing to do), then the switch is
    retried until `wait_s` has passed. A new file gets `PAGE_SIZE` first; an existing
    one keeps its own.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() == "wal":
                return
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # no effect once the file has pages
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() == "wal":
                return
            if time.monotonic() >= deadline:  # the switch was refused without an error
                raise LedgerUnavailable(f"could not put the file in WAL mode (still {mode})")
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.01)
