"""Database outage: rows go to the spool and are replayed exactly once, also across restarts."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.metering.ledger import LedgerRow, LedgerWriteFailed, LedgerWriter, Spool
from gateway.metering.ledger.sqlite import SqliteLedger
from gateway.metering.money import UnitPrices
from gateway.metering.usage import Usage
from gateway.process import orphan_spools
from tests.watchdog import watchdog_after


def make_row(i: int) -> LedgerRow:
    return LedgerRow.from_usage(
        request_id=f"req-{i}",
        attempt=0,
        ts=1_750_000_000.0 + i,
        tenant="acme",
        model="m",
        backend="b",
        backend_model="bm",
        usage=Usage(10, 5),
        prices=UnitPrices.of(1, 2, version="v1"),
        ttft_s=None,
        total_s=0.2,
        stream=False,
        outcome="ok",
    )


def ids_in(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return sorted(r[0] for r in conn.execute("SELECT request_id FROM ledger"))


# Each test here takes well under a second: a writer that stops answering fails in 30 s.
watchdog = watchdog_after(30)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    with sqlite3.connect(path) as conn:  # create the schema the writer expects
        conn.execute("PRAGMA journal_mode = WAL")
    return path


@pytest.fixture
def lock(db: Path) -> Iterator[sqlite3.Connection]:
    """Another connection that can take the database's write lock (an outage for writers)."""
    conn = sqlite3.connect(db, isolation_level=None)
    yield conn
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.close()


def writer_for(db: Path, spool: Path, **kw: float) -> LedgerWriter:
    return LedgerWriter(
        SqliteLedger(db, busy_timeout_s=0.05), Spool(spool), retry_interval_s=3600, **kw
    )


async def test_outage_spools_and_replays_exactly_once(
    db: Path, tmp_path: Path, lock: sqlite3.Connection
) -> None:
    spool = tmp_path / "ledger.spool"
    writer = writer_for(db, spool)
    await writer.start()
    await writer.record(make_row(0))
    lock.execute("BEGIN EXCLUSIVE")
    await asyncio.gather(*(writer.record(make_row(i)) for i in range(1, 101)))
    stats = writer.stats()
    assert not stats.db_up
    assert stats.spool_rows == 100 and stats.rows_spooled == 100
    assert await writer.replay_now() == 0  # still locked: nothing moves, nothing lost
    assert writer.stats().spool_rows == 100
    lock.execute("ROLLBACK")
    assert await writer.replay_now() == 100
    assert writer.db_up
    assert writer.stats().spool_rows == 0 and spool.stat().st_size == 0
    assert await writer.replay_now() == 0
    await writer.record(make_row(101))
    await writer.close()
    assert ids_in(db) == sorted(f"req-{i}" for i in range(102))


async def test_restart_replays_the_spool(
    db: Path, tmp_path: Path, lock: sqlite3.Connection
) -> None:
    spool = tmp_path / "ledger.spool"
    first = writer_for(db, spool)
    await first.start()
    lock.execute("BEGIN EXCLUSIVE")
    await asyncio.gather(*(first.record(make_row(i)) for i in range(50)))
    await first.close()
    assert ids_in_spool(spool) == 50
    lock.execute("ROLLBACK")
    second = writer_for(db, spool)
    await second.start()
    assert second.stats().spool_rows == 0
    await second.close()
    assert ids_in(db) == sorted(f"req-{i}" for i in range(50))


def ids_in_spool(spool: Path) -> int:
    return len(spool.read_bytes().splitlines())


async def test_crash_after_commit_before_truncate_does_not_double_count(
    db: Path, tmp_path: Path
) -> None:
    spool_path = tmp_path / "ledger.spool"
    writer = writer_for(db, spool_path)
    await writer.start()
    await asyncio.gather(*(writer.record(make_row(i)) for i in range(20)))
    await writer.close()
    # The spool still holds rows 10..19 (already committed) plus 20..29 (not yet):
    # what a crash between the replay commit and the truncate leaves behind.
    spool = Spool(spool_path)
    spool.open()
    spool.append([make_row(i) for i in range(10, 30)])
    writer = writer_for(db, spool_path)
    await writer.start()
    await writer.close()
    assert ids_in(db) == sorted(f"req-{i}" for i in range(30))
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT sum(cost_nusd) FROM ledger").fetchone()[0] == 30 * 20_000


async def test_database_down_at_start_spools_then_recovers(
    db: Path, tmp_path: Path, lock: sqlite3.Connection
) -> None:
    lock.execute("BEGIN EXCLUSIVE")
    writer = LedgerWriter(
        SqliteLedger(db, busy_timeout_s=0.05), Spool(tmp_path / "s"), retry_interval_s=0.05
    )
    await writer.start()
    await writer.record(make_row(1))
    assert writer.stats().spool_rows == 1
    lock.execute("ROLLBACK")

    async def replayed() -> None:
        while writer.stats().spool_rows:
            await asyncio.sleep(0.01)

    # The background retry (not replay_now) brings the row over.
    await asyncio.wait_for(replayed(), timeout=5)
    await writer.close()
    assert ids_in(db) == ["req-1"]


async def test_without_spool_an_outage_is_an_error(db: Path, lock: sqlite3.Connection) -> None:
    writer = LedgerWriter(SqliteLedger(db, busy_timeout_s=0.05))
    await writer.start()
    lock.execute("BEGIN EXCLUSIVE")
    with pytest.raises(LedgerWriteFailed):
        await writer.record(make_row(1))
    lock.execute("ROLLBACK")
    await writer.record(make_row(2))  # no spool: the next write tries the database again
    await writer.close()
    assert ids_in(db) == ["req-2"]


def test_spool_drops_a_torn_last_line_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = Spool(path)
    spool.open()
    spool.append([make_row(1), make_row(2)])
    with open(path, "ab") as f:
        f.write(make_row(3).to_json()[:40])  # a crash in the middle of an append
    again = Spool(path)
    again.open()
    assert again.rows == 2
    again.append([make_row(4)])
    rows, _ = again.read()
    assert [r.request_id for r in rows] == ["req-1", "req-2", "req-4"]


def test_consume_keeps_rows_appended_after_the_replayed_prefix(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    spool.append([make_row(1), make_row(2)])
    _rows, nbytes = spool.read()
    spool.append([make_row(3)])
    spool.consume(nbytes)
    left, _ = spool.read()
    assert [r.request_id for r in left] == ["req-3"]
    assert spool.rows == 1
    assert left[0] == make_row(3)


def test_unreadable_spool_line_is_skipped_not_blocking(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    path.write_bytes(b'{"not": "a row"}\n' + make_row(5).to_json() + b"\n")
    spool = Spool(path)
    spool.open()
    rows, nbytes = spool.read()
    assert [r.request_id for r in rows] == ["req-5"]
    spool.consume(nbytes)
    assert spool.rows == 0


def test_orphan_spools_are_those_of_worker_indices_no_longer_run(tmp_path: Path) -> None:
    for name in ("ledger.spool", "ledger.spool.w1", "ledger.spool.w2", "ledger.spool.w10"):
        (tmp_path / name).write_text("")
    for name in ("ledger.spool.w3.tmp", "other.spool.w4", "ledger.spool.wx"):
        (tmp_path / name).write_text("")
    spool = str(tmp_path / "ledger.spool")
    assert orphan_spools(spool, 2) == [tmp_path / "ledger.spool.w10", tmp_path / "ledger.spool.w2"]
    assert orphan_spools(spool, 1)[0] == tmp_path / "ledger.spool.w1"
    assert orphan_spools(str(tmp_path / "missing" / "ledger.spool"), 1) == []


async def test_a_spool_left_by_a_removed_worker_is_taken_over_and_replayed(
    db: Path, tmp_path: Path
) -> None:
    spool = tmp_path / "ledger.spool"
    orphan = tmp_path / "ledger.spool.w3"
    Spool(spool).append([make_row(i) for i in range(2)])
    with orphan.open("wb") as f:  # row 1 in both spools; a torn last line from a crash
        f.write(b"".join(make_row(i).to_json() + b"\n" for i in range(1, 7)) + b'{"torn')
    writer = LedgerWriter(
        SqliteLedger(db, busy_timeout_s=0.05), Spool(spool), adopt=[orphan], retry_interval_s=3600
    )
    await writer.start()
    assert not orphan.exists()
    assert writer.stats().spool_rows == 0
    await writer.close()
    assert ids_in(db) == sorted(f"req-{i}" for i in range(7))
