"""The PostgreSQL ledger store over an asyncpg pool; the schema is created if absent."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

from gateway.metering.ledger.rows import COLUMNS, NULLABLE, LedgerRow, LedgerUnavailable

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_BIGINT = {
    "price_in_nusd_per_m",
    "price_out_nusd_per_m",
    "price_cached_nusd_per_m",
    "cost_nusd",
    "marginal_cost_nusd",
    "counterfactual_cost_nusd",
}
_INT = {
    "attempt",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "counted_prompt_tokens",
    "counted_completion_tokens",
    "batch_size",
}
_FLOAT = {"ts", "ttft_s", "total_s"}
_BOOL = {"divergent", "stream", "is_local"}


def _column_sql(name: str) -> str:
    if name in _BIGINT:
        kind = "BIGINT"
    elif name in _INT:
        kind = "INTEGER"
    elif name in _FLOAT:
        kind = "DOUBLE PRECISION"
    elif name in _BOOL:
        kind = "BOOLEAN"
    else:
        kind = "TEXT"
    return f"{name} {kind}" + ("" if name in NULLABLE else " NOT NULL")


def check_identifier(name: str) -> str:
    """A schema name we splice into SQL must be a plain lower-case identifier."""
    if not _IDENT.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


def to_dollar_params(sql: str) -> str:
    """Rewrite ``?`` placeholders as ``$1, $2, ...`` (our SQL never has a literal '?')."""
    out: list[str] = []
    n = 0
    for part in sql.split("?"):
        if out:
            n += 1
            out.append(f"${n}")
        out.append(part)
    return "".join(out)


# Errors that mean "the database cannot take this write now": connection refused or
# lost, server shutting down, missing table, no privilege. Anything else is a bug.
def _unavailable_errors() -> tuple[type[BaseException], ...]:
    import asyncpg

    return (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class PostgresLedger:
    """LedgerStore over PostgreSQL: ``<schema>.ledger``, executemany in one transaction."""

    dialect = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "neogate",
        min_size: int = 1,
        max_size: int = 4,
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 30.0,
        create: bool = True,
    ) -> None:
        self.dsn = dsn
        self.schema = check_identifier(schema)
        self._min = min_size
        self._max = max_size
        self._connect_timeout = connect_timeout_s
        self._command_timeout = command_timeout_s
        self._create = create
        self._pool: Any = None
        self._opening = asyncio.Lock()  # concurrent first calls must not build two pools
        self._insert = (
            f"INSERT INTO {self.schema}.ledger ({', '.join(COLUMNS)}) VALUES "
            f"({', '.join(f'${i + 1}' for i in range(len(COLUMNS)))}) "
            "ON CONFLICT (request_id, attempt) DO NOTHING"
        )

    def schema_sql(self) -> list[str]:
        s = self.schema
        return [
            f"CREATE SCHEMA IF NOT EXISTS {s}",
            f"CREATE TABLE IF NOT EXISTS {s}.ledger ("
            + ", ".join(_column_sql(c) for c in COLUMNS)
            + ", PRIMARY KEY (request_id, attempt))",
            f"CREATE INDEX IF NOT EXISTS ledger_ts ON {s}.ledger (ts)",
            f"CREATE INDEX IF NOT EXISTS ledger_tenant_ts ON {s}.ledger (tenant, ts)",
            # Ledgers created before a nullable column existed gain it in place.
            *(
                f"ALTER TABLE {s}.ledger ADD COLUMN IF NOT EXISTS {_column_sql(c)}"
                for c in COLUMNS
                if c in NULLABLE
            ),
            f"CREATE INDEX IF NOT EXISTS ledger_client_request_id ON {s}.ledger (client_request_id)",
            # Up intervals of local workers (gateway/metering/ledger/gpu_uptime.py).
            f"CREATE TABLE IF NOT EXISTS {s}.gpu_uptime (backend TEXT NOT NULL, "
            "observer TEXT NOT NULL, up_from DOUBLE PRECISION NOT NULL, "
            "up_to DOUBLE PRECISION NOT NULL, PRIMARY KEY (backend, observer, up_from))",
        ]

    async def open(self) -> None:
        """Create the pool and the schema; LedgerUnavailable when the server can't be reached."""
        if self._pool is not None:
            return
        async with self._opening:
            if self._pool is None:
                await self._open()

    async def _open(self) -> None:
        import asyncpg

        try:
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._min,
                max_size=self._max,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                # Reports name the table unqualified; the search path finds our schema.
                server_settings={"search_path": self.schema},
            )
        except _unavailable_errors() as exc:
            raise LedgerUnavailable(f"postgres ledger: {type(exc).__name__}: {exc}") from exc
        try:
            if self._create:
                # Two processes creating the schema at once race on the catalog;
                # an advisory lock serialises them.
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(7263001)")
                    for stmt in self.schema_sql():
                        await conn.execute(stmt)
        except _unavailable_errors() as exc:
            await pool.close()
            raise LedgerUnavailable(f"postgres ledger: {type(exc).__name__}: {exc}") from exc
        self._pool = pool

    def write_now(self, rows: Sequence[LedgerRow]) -> bool:
        """A PostgreSQL commit is a network round trip: never done without awaiting it."""
        return False

    async def write(self, rows: Sequence[LedgerRow]) -> None:
        """Insert `rows` in one transaction; duplicates of (request_id, attempt) are skipped."""
        await self.open()
        values = [r.as_tuple() for r in rows]
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.executemany(self._insert, values)
        except _unavailable_errors() as exc:
            raise LedgerUnavailable(f"postgres ledger: {type(exc).__name__}: {exc}") from exc

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query written with ``?`` placeholders and unqualified table names."""
        await self.open()
        query = to_dollar_params(sql)
        try:
            async with self._pool.acquire() as conn:
                records = await conn.fetch(query, *params)
        except _unavailable_errors() as exc:
            raise LedgerUnavailable(f"postgres ledger: {type(exc).__name__}: {exc}") from exc
        return [tuple(r) for r in records]

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
