"""The SQLite ledger through LedgerWriter: group commit, idempotency, WAL, kill -9 durability."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.ledger import LedgerRow, LedgerWriter, Spool
from gateway.ledger.sqlite import SqliteLedger
from gateway.usage import UnitPrices, Usage

REPO = Path(__file__).resolve().parents[2]


def make_row(i: int, *, attempt: int = 0, tenant: str = "acme") -> LedgerRow:
    return LedgerRow.from_usage(
        request_id=f"req-{i}",
        attempt=attempt,
        ts=1_750_000_000.0 + i,
        tenant=tenant,
        model="llama-8b",
        backend="groq",
        backend_model="llama-3.1-8b-instant",
        usage=Usage(100, 20, cached_tokens=40, source="reported"),
        prices=UnitPrices.of(0.05, 0.08, cached_input_per_m=0.025, version="groq@1"),
        ttft_s=0.1,
        total_s=0.5,
        stream=True,
        outcome="ok",
    )


def count_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM ledger").fetchone()[0])


async def test_rows_round_trip_with_exact_cost(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    writer = LedgerWriter(SqliteLedger(db), Spool(tmp_path / "spool"))
    await writer.start()
    row = make_row(1)
    await writer.record(row)
    got = await writer.store.fetch(
        "SELECT request_id, attempt, day, cost_nusd, price_in_nusd_per_m, token_source, stream "
        "FROM ledger"
    )
    await writer.close()
    # 60 uncached x 0.05 + 40 cached x 0.025 + 20 x 0.08 = 5.6 $/M-units -> 5.6e-6 USD.
    assert row.cost_usd == Decimal("0.0000056")
    assert got == [("req-1", 0, "2025-06-15", 5600, 50_000_000, "reported", 1)]


async def test_same_request_and_attempt_is_recorded_once(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    writer = LedgerWriter(SqliteLedger(db))
    await writer.start()
    await asyncio.gather(writer.record(make_row(1)), writer.record(make_row(1)))
    await writer.record(make_row(1))
    await writer.record(make_row(1, attempt=1))
    await writer.close()
    assert count_rows(db) == 2


async def test_concurrent_records_are_group_committed(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    registry = CollectorRegistry()
    writer = LedgerWriter(SqliteLedger(db), registry=registry)
    await writer.start()
    await asyncio.gather(*(writer.record(make_row(i)) for i in range(3000)))
    stats = writer.stats()
    await writer.close()
    assert count_rows(db) == 3000
    assert stats.rows_written == 3000
    assert stats.batches < 100  # thousands of rows, a handful of transactions
    assert registry.get_sample_value("neogate_ledger_rows_written_total") == 3000
    assert registry.get_sample_value("neogate_ledger_batch_rows_count") == stats.batches
    assert registry.get_sample_value("neogate_ledger_up") == 1.0


async def test_wal_mode_and_synchronous_normal(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    store = SqliteLedger(db)
    await store.open()
    assert await store.fetch("PRAGMA journal_mode") == [("wal",)]
    assert await store.fetch("PRAGMA synchronous") == [(1,)]  # NORMAL
    await store.close()


async def test_cancelled_caller_still_gets_its_row_written(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    writer = LedgerWriter(SqliteLedger(db))
    await writer.start()
    task = asyncio.create_task(writer.record(make_row(7)))
    await asyncio.sleep(0)  # let it queue
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await writer.close()
    assert count_rows(db) == 1


async def test_record_after_close_is_refused(tmp_path: Path) -> None:
    writer = LedgerWriter(SqliteLedger(tmp_path / "ledger.db"))
    await writer.start()
    await writer.close()
    with pytest.raises(Exception, match="not running"):
        await writer.record(make_row(1))


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.ledger import LedgerRow, LedgerWriter, Spool
    from gateway.ledger.sqlite import SqliteLedger
    from gateway.usage import UnitPrices, Usage

    async def one(writer, i):
        row = LedgerRow.from_usage(
            request_id=f"req-{i}", attempt=0, ts=1.75e9, tenant="t", model="m",
            backend="b", backend_model="bm", usage=Usage(10, 5), prices=UnitPrices.of(1, 2),
            ttft_s=None, total_s=0.1, stream=False, outcome="ok")
        await writer.record(row)
        sys.stdout.write(f"{i}\\n")
        sys.stdout.flush()

    async def main():
        writer = LedgerWriter(SqliteLedger(sys.argv[1]), Spool(sys.argv[2]))
        await writer.start()
        i = 0
        while True:
            await asyncio.gather(*(one(writer, i + k) for k in range(50)))
            i += 50

    asyncio.run(main())
    """
)


def test_every_acknowledged_row_survives_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db), str(tmp_path / "spool")],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None
    acked: list[str] = []
    for line in child.stdout:
        acked.append(line.decode().strip())
        if len(acked) >= 2000:
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    acked += child.stdout.read().decode().split()
    child.stdout.close()
    with sqlite3.connect(db) as conn:
        stored = {r[0] for r in conn.execute("SELECT request_id FROM ledger")}
    missing = [i for i in acked if f"req-{i}" not in stored]
    assert len(acked) >= 2000
    assert missing == []
