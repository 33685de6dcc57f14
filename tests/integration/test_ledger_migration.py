"""Ledgers written before the economics columns (or the uptime table) existed gain them in place
(SQLite and PostgreSQL)."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from gateway.metering.ledger import LedgerRow, LedgerUnavailable, LedgerWriter
from gateway.metering.ledger.gpu_uptime import record_uptime, uptime_spans
from gateway.metering.ledger.postgres import PostgresLedger
from gateway.metering.ledger.postgres import _column_sql as pg_column
from gateway.metering.ledger.rows import COLUMNS
from gateway.metering.ledger.sqlite import SqliteLedger
from gateway.metering.ledger.sqlite_file import column_sql as sqlite_column
from gateway.metering.money import UnitPrices
from gateway.metering.uptime import Span, UptimeRow
from gateway.metering.usage import Usage

NEW = ("marginal_cost_nusd", "counterfactual_cost_nusd", "counterfactual_backend")
OLD = [c for c in COLUMNS if c not in NEW]
DSN = "postgresql://postgres@127.0.0.1:5432/test"


def local_row(rid: str) -> LedgerRow:
    # 400 prompt tokens (100 of them prefix-cache hits, free) at $0.04/M prefill and 100 output
    # tokens at $0.50/M: 300 x 0.04 + 100 x 0.50 = 62 $/M-units = $0.000062 attributed.
    # Counterfactual on Groq ($0.05 in, $0.025 cached, $0.08 out):
    # 300 x 0.05 + 100 x 0.025 + 100 x 0.08 = 25.5 $/M-units = $0.0000255.
    return LedgerRow.from_usage(
        request_id=rid,
        attempt=0,
        ts=1_750_000_000.0,
        tenant="acme",
        model="llama-8b",
        backend="gpu-a",
        backend_model="meta-llama/Llama-3.1-8B-Instruct",
        usage=Usage(400, 100, cached_tokens=100, source="reported"),
        prices=UnitPrices.of("0.04", "0.50", "0", version="1/gpu@b4c512"),
        ttft_s=0.05,
        total_s=1.0,
        stream=False,
        outcome="ok",
        batch_size=4,
        is_local=True,
        marginal_cost_usd=0.0,
        counterfactual=("groq", UnitPrices.of("0.05", "0.08", "0.025", version="1")),
    )


def test_a_row_carries_attributed_counterfactual_and_saved_by_hand() -> None:
    row = local_row("r")
    assert row.cost_usd == Decimal("0.000062")
    assert row.counterfactual_cost_nusd == 25_500
    assert row.saved_usd == Decimal("-0.0000365")  # this GPU cost more than Groq would have
    assert row.marginal_cost_nusd == 0 and row.counterfactual_backend == "groq"


async def test_sqlite_ledger_gains_the_columns_in_place(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE ledger ("
            + ", ".join(sqlite_column(c) for c in OLD)
            + ", PRIMARY KEY (request_id, attempt))"
        )
        old = local_row("old").as_tuple()[: len(OLD)]
        conn.execute(f"INSERT INTO ledger VALUES ({', '.join('?' for _ in OLD)})", old)
    writer = LedgerWriter(SqliteLedger(db))
    await writer.start()
    await writer.record(local_row("new"))
    got = await writer.store.fetch(
        "SELECT request_id, cost_nusd, marginal_cost_nusd, counterfactual_cost_nusd, "
        "counterfactual_backend FROM ledger ORDER BY request_id"
    )
    await writer.close()
    assert got == [("new", 62_000, 0, 25_500, "groq"), ("old", 62_000, None, None, None)]


async def test_sqlite_ledger_gains_the_uptime_table_in_place(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE ledger ("
            + ", ".join(sqlite_column(c) for c in COLUMNS)
            + ", PRIMARY KEY (request_id, attempt))"
        )
    # Read without creating (`neogate usage`): a file from before the table has no uptime.
    reader = SqliteLedger(db, create=False)
    try:
        assert await uptime_spans(reader, None, 2e9) == {}
        with pytest.raises(LedgerUnavailable):  # and nothing can be written there
            await record_uptime(reader, "p", [UptimeRow("gpu-a", 1.0, 2.0)])
    finally:
        await reader.close()
    # A gateway's store (create) adds it; rows then round-trip, an open one extended in place.
    store = SqliteLedger(db)
    try:
        await record_uptime(store, "p", [UptimeRow("gpu-a", 1.0, 2.0)])
        await record_uptime(store, "p", [UptimeRow("gpu-a", 1.0, 5.0)])
        assert await uptime_spans(store, 0.0, 10.0) == {"gpu-a": [Span(1.0, 5.0)]}
        assert await uptime_spans(store, 6.0, 10.0) == {}
    finally:
        await store.close()


async def test_postgres_ledger_gains_the_uptime_table_in_place(schema: str) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(
            f"CREATE TABLE {schema}.ledger ("
            + ", ".join(pg_column(c) for c in COLUMNS)
            + ", PRIMARY KEY (request_id, attempt))"
        )
    finally:
        await conn.close()
    reader = PostgresLedger(DSN, schema=schema, create=False)
    try:
        assert await uptime_spans(reader, None, 2e9) == {}
    finally:
        await reader.close()
    store = PostgresLedger(DSN, schema=schema)
    try:
        await record_uptime(store, "p", [UptimeRow("gpu-a", 1.0, 2.0)])
        await record_uptime(store, "q", [UptimeRow("gpu-a", 1.5, 3.0)])
        await record_uptime(store, "p", [UptimeRow("gpu-a", 1.0, 5.0)])
        got = await uptime_spans(store, 0.0, 10.0)
        assert sorted(got["gpu-a"], key=lambda s: s.start) == [Span(1.0, 5.0), Span(1.5, 3.0)]
    finally:
        await store.close()


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        await conn.close()


async def test_postgres_ledger_gains_the_columns_in_place(schema: str) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(
            f"CREATE TABLE {schema}.ledger ("
            + ", ".join(pg_column(c) for c in OLD)
            + ", PRIMARY KEY (request_id, attempt))"
        )
        old = local_row("old").as_tuple()[: len(OLD)]
        marks = ", ".join(f"${i + 1}" for i in range(len(OLD)))
        await conn.execute(f"INSERT INTO {schema}.ledger VALUES ({marks})", *old)
    finally:
        await conn.close()
    writer = LedgerWriter(PostgresLedger(DSN, schema=schema))
    await writer.start()
    await writer.record(local_row("new"))
    got = await writer.store.fetch(
        "SELECT request_id, cost_nusd, marginal_cost_nusd, counterfactual_cost_nusd, "
        "counterfactual_backend FROM ledger ORDER BY request_id"
    )
    await writer.close()
    assert [tuple(r) for r in got] == [
        ("new", 62_000, 0, 25_500, "groq"),
        ("old", 62_000, None, None, None),
    ]
