"""Tenant keys' tables in the ledger's database: ``api_keys`` and its change counter ``api_keys_version``,
on SQLite (the ledger's file) or PostgreSQL (the ledger's schema); the `KeyBackend`s of `gateway.state.keys`."""

from __future__ import annotations

import asyncio
import builtins
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.metering.ledger.sqlite_file import ensure_wal
from gateway.state.keys import KeyRecord

_SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS api_keys (key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
    "hash TEXT NOT NULL UNIQUE, created REAL NOT NULL, revoked_at REAL, label TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS api_keys_version (id INTEGER PRIMARY KEY CHECK (id = 1), "
    "version INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO api_keys_version (id, version) VALUES (1, 0)",
)
_BUMP = "UPDATE api_keys_version SET version = version + 1 WHERE id = 1"
_SELECT = "SELECT key_id, tenant, label, created, revoked_at, hash FROM api_keys"


def _record(row: Sequence[Any]) -> tuple[KeyRecord, str]:
    return KeyRecord(row[0], row[1], row[2], float(row[3]), row[4]), str(row[5])


class SqliteKeyBackend:
    """Keys in the ledger's SQLite file; each call opens a short connection on a thread."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._timeout = busy_timeout_s

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
        try:
            ensure_wal(conn, self._timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _call(self, fn: Callable[[sqlite3.Connection], Any], *, write: bool = True) -> Any:
        """Run `fn` in one transaction on a thread: a write one (BEGIN IMMEDIATE) or a read.

        Reads never take the write lock: the refresh asks for the version every 0.5 s,
        and a write lock held by a thread that waits for the GIL turned the ledger's
        quick commits on the loop away for milliseconds (busy: queued on its thread).
        In WAL mode a read runs beside the writer and sees the last commit.
        """

        def go() -> Any:
            conn = self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")
                try:
                    result = fn(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                return result
            finally:
                conn.close()

        return await asyncio.to_thread(go)

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def create(conn: sqlite3.Connection) -> None:
            for stmt in _SQLITE_SCHEMA:
                conn.execute(stmt)

        await self._call(create)

    async def insert(self, record: KeyRecord, key_hash: str) -> None:
        def go(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO api_keys (key_id, tenant, hash, created, revoked_at, label) "
                "VALUES (?, ?, ?, ?, NULL, ?)",
                (record.key_id, record.tenant, key_hash, record.created, record.label),
            )
            conn.execute(_BUMP)

        await self._call(go)

    async def revoke(self, key_id: str, at: float) -> bool:
        def go(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (at, key_id),
            )
            conn.execute(_BUMP)
            return cur.rowcount > 0

        return bool(await self._call(go))

    async def rows(self) -> builtins.list[tuple[KeyRecord, str]]:
        rows = await self._call(lambda conn: conn.execute(_SELECT).fetchall(), write=False)
        return [_record(r) for r in rows]

    async def version(self) -> int:
        rows = await self._call(
            lambda conn: conn.execute("SELECT version FROM api_keys_version").fetchall(),
            write=False,
        )
        return int(rows[0][0]) if rows else 0

    async def close(self) -> None:
        return None


class PostgresKeyBackend:
    """Keys in ``<schema>.api_keys`` on PostgreSQL (the ledger's schema)."""

    def __init__(self, dsn: str, *, schema: str = "neogate") -> None:
        from gateway.metering.ledger.postgres import check_identifier

        self.dsn = dsn
        self.schema = check_identifier(schema)
        self._pool: Any = None

    async def open(self) -> None:
        import asyncpg

        if self._pool is None:
            self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2)
        s = self.schema
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7263002)")
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {s}.api_keys (key_id TEXT PRIMARY KEY, "
                "tenant TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, created DOUBLE PRECISION "
                "NOT NULL, revoked_at DOUBLE PRECISION, label TEXT NOT NULL)"
            )
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {s}.api_keys_version (id INTEGER PRIMARY KEY "
                "CHECK (id = 1), version BIGINT NOT NULL)"
            )
            await conn.execute(
                f"INSERT INTO {s}.api_keys_version VALUES (1, 0) ON CONFLICT (id) DO NOTHING"
            )

    def _bump(self) -> str:
        return f"UPDATE {self.schema}.api_keys_version SET version = version + 1 WHERE id = 1"

    async def insert(self, record: KeyRecord, key_hash: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO {self.schema}.api_keys (key_id, tenant, hash, created, "
                "revoked_at, label) VALUES ($1, $2, $3, $4, NULL, $5)",
                record.key_id,
                record.tenant,
                key_hash,
                record.created,
                record.label,
            )
            await conn.execute(self._bump())

    async def revoke(self, key_id: str, at: float) -> bool:
        async with self._pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                f"UPDATE {self.schema}.api_keys SET revoked_at = $1 "
                "WHERE key_id = $2 AND revoked_at IS NULL",
                at,
                key_id,
            )
            await conn.execute(self._bump())
        return bool(str(status).endswith(" 1"))

    async def rows(self) -> builtins.list[tuple[KeyRecord, str]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_SELECT.replace("api_keys", f"{self.schema}.api_keys"))
        return [_record(tuple(r)) for r in rows]

    async def version(self) -> int:
        async with self._pool.acquire() as conn:
            value = await conn.fetchval(f"SELECT version FROM {self.schema}.api_keys_version")
        return int(value or 0)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
