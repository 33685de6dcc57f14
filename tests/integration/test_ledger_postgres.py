"""The PostgreSQL ledger on the real server: writes, idempotency, outage and exactly-once replay."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from gateway.metering.ledger import LedgerRow, LedgerWriter, Spool
from gateway.metering.ledger.postgres import PostgresLedger, to_dollar_params
from gateway.metering.money import UnitPrices
from gateway.metering.usage import Usage
from tests.integration.test_ledger_sqlite import check_reports, dataset_rows

PG_HOST, PG_PORT = "127.0.0.1", 5432
DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"


def make_row(i: int, *, attempt: int = 0) -> LedgerRow:
    return LedgerRow.from_usage(
        request_id=f"req-{i}",
        attempt=attempt,
        ts=1_750_000_000.0 + i,
        tenant="acme",
        model="llama-8b",
        backend="local-h100",
        backend_model="meta-llama/Llama-3.1-8B-Instruct",
        usage=Usage(300, 100, source="counted", counted_completion_tokens=100),
        prices=UnitPrices.of("0.02", "0.10", version="gpu@b32"),
        ttft_s=0.05,
        total_s=1.5,
        stream=True,
        outcome="client_disconnect",
        batch_size=32,
        is_local=True,
    )


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        await conn.close()


async def ids_in(schema: str) -> list[str]:
    conn = await asyncpg.connect(DSN)
    try:
        rows = await conn.fetch(f"SELECT request_id FROM {schema}.ledger ORDER BY request_id")
    finally:
        await conn.close()
    return [r[0] for r in rows]


class TcpProxy:
    """A loopback TCP relay to PostgreSQL that can be taken down and brought back (the outage)."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        for w in list(self._writers):
            w.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(PG_HOST, PG_PORT)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()


async def test_rows_round_trip_and_idempotency(schema: str) -> None:
    writer = LedgerWriter(PostgresLedger(DSN, schema=schema))
    await writer.start()
    await asyncio.gather(*(writer.record(make_row(i)) for i in range(500)))
    await asyncio.gather(*(writer.record(make_row(i)) for i in range(250)))  # duplicates
    await writer.record(make_row(0, attempt=1))
    got = await writer.store.fetch(
        "SELECT count(*), sum(cost_nusd), bool_and(is_local), max(batch_size) FROM ledger "
        "WHERE outcome = ?",
        ["client_disconnect"],
    )
    stats = writer.stats()
    await writer.close()
    # 300 x 0.02 + 100 x 0.10 = 16 $/M-units -> 16e-6 USD = 16_000 nano-USD per row.
    assert got == [(501, 501 * 16_000, True, 32)]
    assert stats.batches < 200


async def test_outage_spools_then_replays_exactly_once(schema: str, tmp_path: Path) -> None:
    proxy = TcpProxy()
    await proxy.up()
    dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/test"
    spool_path = tmp_path / "ledger.spool"
    store = PostgresLedger(dsn, schema=schema, connect_timeout_s=2)
    writer = LedgerWriter(store, Spool(spool_path), retry_interval_s=3600)
    await writer.start()
    await writer.record(make_row(0))
    await proxy.down()
    await asyncio.gather(*(writer.record(make_row(i)) for i in range(1, 201)))
    assert not writer.db_up
    assert writer.stats().spool_rows == 200
    assert await writer.replay_now() == 0
    await proxy.up()
    assert await writer.replay_now() == 200
    assert writer.stats().spool_rows == 0
    await writer.record(make_row(201))
    await writer.close()
    await proxy.down()
    assert await ids_in(schema) == sorted(f"req-{i}" for i in range(202))


async def test_restart_with_database_down_then_back(schema: str, tmp_path: Path) -> None:
    proxy = TcpProxy()
    await proxy.up()
    await proxy.down()  # the database is unreachable when the gateway starts
    dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/test"
    spool_path = tmp_path / "ledger.spool"
    first = LedgerWriter(PostgresLedger(dsn, schema=schema), Spool(spool_path))
    await first.start()
    await asyncio.gather(*(first.record(make_row(i)) for i in range(30)))
    await first.close()
    await proxy.up()
    second = LedgerWriter(PostgresLedger(dsn, schema=schema), Spool(spool_path))
    await second.start()  # creates the schema and replays the spool
    assert second.stats().spool_rows == 0
    await second.close()
    await proxy.down()
    assert await ids_in(schema) == sorted(f"req-{i}" for i in range(30))


def test_placeholders_are_rewritten_in_order() -> None:
    assert to_dollar_params("a = ? AND b IN (?, ?)") == "a = $1 AND b IN ($2, $3)"
    with pytest.raises(ValueError, match="identifier"):
        PostgresLedger(DSN, schema="x; DROP TABLE y")


async def test_reports_on_postgres(schema: str) -> None:
    writer = LedgerWriter(PostgresLedger(DSN, schema=schema))
    await writer.start()
    await asyncio.gather(*(writer.record(r) for r in dataset_rows()))
    await writer.close()
    store = PostgresLedger(DSN, schema=schema, create=False)
    try:
        await check_reports(store)
    finally:
        await store.close()
