"""The ledger writer over a real SQLite file and a real spool: group commit, the outage, the
retry clock, replay in rounds and chunks, and what it counts (issue 17's mutation survivors).

The clock is passed in (`Clock`), so "a retry is due" is decided by the test, not by time.
An outage is another connection holding the file's write lock (busy timeout 50 ms), a
ledger file that is not there (`create=False`), or a row SQLite refuses (a NULL tenant).
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway.metering.ledger import LedgerRow, LedgerWriteFailed, LedgerWriter, Spool
from gateway.metering.ledger.rows import LedgerUnavailable
from gateway.metering.ledger.sqlite import SqliteLedger
from gateway.metering.money import UnitPrices
from gateway.metering.usage import Usage
from tests.watchdog import watchdog_after


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def row(i: int, **changes: object) -> LedgerRow:
    base = LedgerRow.from_usage(
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
    return base._replace(**changes)


def poison(i: int) -> LedgerRow:
    """A row the database refuses (NOT NULL tenant) but the spool keeps."""
    return row(i, tenant=None)


def ids_in(db: Path) -> list[str]:
    """Request ids in the order they were inserted (rowid)."""
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT request_id FROM ledger ORDER BY rowid")]


def spooled_ids(path: Path) -> list[str]:
    return [LedgerRow.from_json(line).request_id for line in path.read_bytes().splitlines()]


# Each test here takes well under a second: a writer that stops answering fails in 20 s.
watchdog = watchdog_after(20)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
    return path


@pytest.fixture
def lock(db: Path) -> Iterator[sqlite3.Connection]:
    """Another connection that can hold the file's write lock: an outage for the writer."""
    conn = sqlite3.connect(db, isolation_level=None)
    yield conn
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.close()


def store(db: Path) -> SqliteLedger:
    return SqliteLedger(db, busy_timeout_s=0.05)


async def settled(writer: LedgerWriter) -> None:
    """Wait (at most 5 s) until the writer has moved its spool, which it does after the
    caller whose row was spooled has been answered."""
    async with asyncio.timeout(5):
        while writer.stats().spool_rows:
            await asyncio.sleep(0.002)


def sample(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name)


# --- group commit and what is counted --------------------------------------------------------


async def test_rows_queued_together_go_in_batches_of_4096_by_default(db: Path) -> None:
    registry = CollectorRegistry()
    writer = LedgerWriter(store(db), registry=registry, clock=Clock())
    await writer.start()
    # In one turn of the loop: the first row finds the writer idle and is committed by
    # record() itself; the other 4097 queue before the writer task runs: one full batch
    # of 4096, then the last row.
    await asyncio.gather(*(writer.record(row(i)) for i in range(4098)))
    stats = writer.stats()
    assert (stats.batches, stats.last_batch_rows, stats.rows_written) == (3, 1, 4098)
    assert (stats.rows_spooled, stats.rows_replayed, stats.write_errors) == (0, 0, 0)
    assert stats.backlog_rows == 0 and stats.db_up and writer.db_up
    assert (stats.spool_rows, stats.spool_bytes) == (0, 0)  # no spool at all
    assert sample(registry, "neogate_ledger_rows_written_total") == 4098
    assert sample(registry, "neogate_ledger_batch_rows_count") == 3
    assert sample(registry, "neogate_ledger_batch_rows_sum") == 4098
    # Its own buckets, up to 8192 rows (the default ones stop at 10).
    batch = "neogate_ledger_batch_rows_bucket"
    assert registry.get_sample_value(batch, {"le": "1.0"}) == 2
    assert registry.get_sample_value(batch, {"le": "2048.0"}) == 2
    assert registry.get_sample_value(batch, {"le": "4096.0"}) == 3
    # The clock stood still: every commit took 0 s by it.
    assert sample(registry, "neogate_ledger_write_seconds_count") == 3
    assert sample(registry, "neogate_ledger_write_seconds_sum") == 0
    assert sample(registry, "neogate_ledger_rows_spooled_total") == 0
    assert sample(registry, "neogate_ledger_spool_rows") == 0
    assert sample(registry, "neogate_ledger_spool_bytes") == 0
    assert sample(registry, "neogate_ledger_backlog_rows") == 0
    assert sample(registry, "neogate_ledger_up") == 1
    await writer.close()
    assert len(ids_in(db)) == 4098


async def test_a_smaller_max_batch_splits_the_queue(db: Path) -> None:
    writer = LedgerWriter(store(db), max_batch=3)
    await writer.start()
    await asyncio.gather(*(writer.record(row(i)) for i in range(8)))  # 1 at once, 3, 3, 1
    stats = writer.stats()
    assert (stats.batches, stats.last_batch_rows, stats.rows_written) == (4, 1, 8)
    await writer.close()
    assert ids_in(db) == [f"req-{i}" for i in range(8)]


async def test_the_write_time_is_measured_by_the_clock_given(db: Path, tmp_path: Path) -> None:
    registry = CollectorRegistry()

    class Ticking(Clock):
        def __call__(self) -> float:
            self.now += 0.25
            return self.now

    writer = LedgerWriter(store(db), Spool(tmp_path / "spool"), registry=registry, clock=Ticking())
    await writer.start()
    await writer.record(row(1))
    # One read when the commit starts, one when it is done: 0.25 s apart.
    assert sample(registry, "neogate_ledger_write_seconds_sum") == 0.25
    assert registry.get_sample_value("neogate_ledger_write_seconds_bucket", {"le": "0.0005"}) == 0
    assert registry.get_sample_value("neogate_ledger_write_seconds_bucket", {"le": "0.1"}) == 0
    assert registry.get_sample_value("neogate_ledger_write_seconds_bucket", {"le": "0.25"}) == 1
    await writer.close()


async def test_the_metrics_are_named_and_explained(db: Path, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    writer = LedgerWriter(store(db), Spool(tmp_path / "spool"), registry=registry)
    text = generate_latest(registry).decode()
    helps = sorted(
        line
        for line in text.splitlines()
        if line.startswith("# HELP") and not line.split()[2].endswith("_created")
    )
    assert helps == [
        "# HELP neogate_ledger_backlog_rows Rows waiting for the next commit.",
        "# HELP neogate_ledger_batch_rows Rows per group commit.",
        "# HELP neogate_ledger_rows_replayed_total Spooled rows moved into the database.",
        "# HELP neogate_ledger_rows_spooled_total Rows written to the local spool because the "
        "database could not take them.",
        "# HELP neogate_ledger_rows_written_total Rows committed to the database.",
        "# HELP neogate_ledger_spool_bytes Size of the spool file.",
        "# HELP neogate_ledger_spool_rows Rows held in the spool.",
        "# HELP neogate_ledger_up 1 while the ledger database takes writes.",
        "# HELP neogate_ledger_write_errors_total Failed database writes.",
        "# HELP neogate_ledger_write_seconds Time to commit one batch to the database (or spool).",
    ]
    del writer


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_close_commits_what_is_queued(
    db: Path, synchronous: Literal["NORMAL", "FULL"]
) -> None:
    """Every caller has its answer when close() returns. With synchronous=FULL the store
    commits on its thread, behind its own close there: a close that did not wait for the
    writer task would return with the rows still on their way (seen with the wait removed)."""
    writer = LedgerWriter(SqliteLedger(db, busy_timeout_s=0.05, synchronous=synchronous))
    await writer.start()
    pending = [asyncio.create_task(writer.record(row(i))) for i in range(5)]
    await asyncio.sleep(0)  # queued, not yet committed
    await writer.close()
    assert all(t.done() and t.exception() is None for t in pending)
    assert ids_in(db) == [f"req-{i}" for i in range(5)]
    with pytest.raises(LedgerWriteFailed, match=r"^the ledger writer is not running$"):
        await writer.record(row(9))


async def test_record_before_start_is_refused(db: Path) -> None:
    writer = LedgerWriter(store(db))
    with pytest.raises(LedgerWriteFailed, match=r"^the ledger writer is not running$"):
        await writer.record(row(1))


# --- the outage --------------------------------------------------------------------------------


async def test_an_outage_spools_counts_one_error_and_later_batches_skip_the_database(
    db: Path, tmp_path: Path, lock: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    clock = Clock(100.0)
    spool_path = tmp_path / "spool"
    writer = LedgerWriter(
        store(db), Spool(spool_path), retry_interval_s=2.0, registry=registry, clock=clock
    )
    await writer.start()
    assert "neogate-ledger-writer" in {t.get_name() for t in asyncio.all_tasks()}
    lock.execute("BEGIN EXCLUSIVE")
    with caplog.at_level(logging.INFO, logger="gateway.metering.ledger.writer"):
        await writer.record(row(1))
    assert caplog.messages == [
        f"ledger database (rows go to the spool) failing: LedgerUnavailable: sqlite ledger {db}: "
        "database is locked (logged once until it recovers)"
    ]
    assert caplog.records[0].exc_info is None  # an outage of a known kind: no traceback
    # At ERROR, not the streak's default WARNING: rows now wait in the spool, not the ledger.
    assert caplog.records[0].levelno == logging.ERROR
    caplog.clear()
    stats = writer.stats()
    assert not stats.db_up and not writer.db_up
    assert (stats.write_errors, stats.rows_spooled, stats.rows_written) == (1, 1, 0)
    assert (stats.batches, stats.last_batch_rows) == (1, 1)
    assert stats.spool_rows == 1 and stats.spool_bytes == spool_path.stat().st_size > 0
    # While down (the retry is due at 102.0), rows go straight to the spool: no second error.
    await asyncio.gather(writer.record(row(2)), writer.record(row(3)))
    stats = writer.stats()
    assert (stats.write_errors, stats.rows_spooled, stats.batches, stats.last_batch_rows) == (
        1,
        3,
        2,
        2,
    )
    assert stats.spool_bytes == spool_path.stat().st_size
    assert sample(registry, "neogate_ledger_write_errors_total") == 1
    assert sample(registry, "neogate_ledger_rows_spooled_total") == 3
    assert sample(registry, "neogate_ledger_rows_written_total") == 0
    assert sample(registry, "neogate_ledger_batch_rows_sum") == 3
    assert sample(registry, "neogate_ledger_spool_rows") == 3
    assert sample(registry, "neogate_ledger_spool_bytes") == spool_path.stat().st_size
    assert sample(registry, "neogate_ledger_up") == 0
    assert spooled_ids(spool_path) == ["req-1", "req-2", "req-3"]
    lock.execute("ROLLBACK")
    with caplog.at_level(logging.INFO, logger="gateway.metering.ledger.writer"):
        assert await writer.replay_now() == 3
    assert "ledger database is back, replaying 3 spooled rows" in caplog.messages
    assert writer.db_up and sample(registry, "neogate_ledger_up") == 1
    assert sample(registry, "neogate_ledger_rows_replayed_total") == 3
    assert writer.stats().rows_replayed == 3
    assert sample(registry, "neogate_ledger_spool_rows") == 0
    await writer.close()
    assert ids_in(db) == ["req-1", "req-2", "req-3"]


async def test_the_retry_is_due_exactly_at_the_interval(
    db: Path, tmp_path: Path, lock: sqlite3.Connection
) -> None:
    clock = Clock(100.0)
    writer = LedgerWriter(store(db), Spool(tmp_path / "spool"), retry_interval_s=2.0, clock=clock)
    await writer.start()
    lock.execute("BEGIN EXCLUSIVE")
    await writer.record(row(1))  # fails at 100.0: the database is tried again from 102.0
    lock.execute("ROLLBACK")
    clock.now = 101.5
    await writer.record(row(2))  # not due: spooled, no replay
    # Had a replay started after row 2, it would have written row 3 between its chunks.
    await writer.record(row(3))
    assert (writer.stats().spool_rows, writer.stats().rows_written) == (3, 0)
    assert not writer.db_up
    clock.now = 102.0
    await writer.record(row(4))  # spooled (still down), then the due replay moves all four
    await settled(writer)
    stats = writer.stats()
    assert stats.spool_rows == 0 and writer.db_up
    assert (stats.rows_spooled, stats.rows_replayed, stats.rows_written) == (4, 4, 0)
    await writer.record(row(5))  # up again: straight to the database
    assert writer.stats().rows_written == 1
    await writer.close()
    assert ids_in(db) == [f"req-{i}" for i in range(1, 6)]


async def test_a_failed_replay_moves_the_next_retry_by_the_interval(
    db: Path, tmp_path: Path, lock: sqlite3.Connection
) -> None:
    clock = Clock(100.0)
    writer = LedgerWriter(store(db), Spool(tmp_path / "spool"), retry_interval_s=2.0, clock=clock)
    await writer.start()
    lock.execute("BEGIN EXCLUSIVE")
    await writer.record(row(1))
    clock.now = 103.0
    assert await writer.replay_now() == 0  # still locked: next try from 105.0
    assert writer.stats().write_errors == 2
    lock.execute("ROLLBACK")
    clock.now = 104.5
    await writer.record(row(2))
    await writer.record(row(3))  # would be written between a replay's chunks
    assert (writer.stats().spool_rows, writer.stats().rows_written) == (3, 0)
    clock.now = 105.0
    await writer.record(row(4))
    await settled(writer)
    assert writer.db_up
    await writer.close()
    assert ids_in(db) == ["req-1", "req-2", "req-3", "req-4"]


async def test_the_background_retry_wakes_the_idle_writer_by_itself(
    db: Path, tmp_path: Path, lock: sqlite3.Connection
) -> None:
    clock = Clock(100.0)
    writer = LedgerWriter(store(db), Spool(tmp_path / "spool"), retry_interval_s=0.0, clock=clock)
    await writer.start()
    lock.execute("BEGIN EXCLUSIVE")
    await writer.record(row(1))
    # Nothing else is recorded: the writer retries on its own, at once by its clock (each
    # try waits 50 ms for the lock). A writer that slept 1 s between tries needs 6 s.
    async with asyncio.timeout(3.0):
        while writer.stats().write_errors < 8:
            await asyncio.sleep(0.005)
    lock.execute("ROLLBACK")
    await settled(writer)
    assert writer.db_up
    await writer.close()
    assert ids_in(db) == ["req-1"]


async def test_without_a_spool_an_outage_fails_the_batch_and_the_next_one_tries_again(
    db: Path, lock: sqlite3.Connection
) -> None:
    registry = CollectorRegistry()
    writer = LedgerWriter(store(db), registry=registry)
    await writer.start()
    lock.execute("BEGIN EXCLUSIVE")
    results = await asyncio.gather(
        writer.record(row(1)), writer.record(row(2)), return_exceptions=True
    )
    assert all(isinstance(r, LedgerWriteFailed) for r in results)
    assert "ledger database unavailable: sqlite ledger" in str(results[0])
    assert writer.stats().write_errors == 1
    with pytest.raises(LedgerWriteFailed):
        await writer.record(row(3))  # down, but with no spool the database is tried again
    assert writer.stats().write_errors == 2
    assert sample(registry, "neogate_ledger_write_errors_total") == 2
    lock.execute("ROLLBACK")
    await writer.record(row(4))
    assert writer.stats().rows_written == 1 and writer.stats().rows_spooled == 0
    await writer.close()
    assert ids_in(db) == ["req-4"]


async def test_a_row_the_code_cannot_write_is_spooled_not_lost(
    db: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A timestamp that is not a number fails in Python (TypeError), not as an outage.
    spool_path = tmp_path / "spool"
    writer = LedgerWriter(store(db), Spool(spool_path), retry_interval_s=3600, clock=Clock())
    await writer.start()
    bad = row(1, ts="not a time")
    with caplog.at_level(logging.INFO, logger="gateway.metering.ledger.writer"):
        await writer.record(bad)
    assert caplog.messages[0] == "ledger write failed unexpectedly"
    assert caplog.records[0].exc_info is not None  # with its traceback
    assert caplog.messages[1].startswith(
        "ledger database (rows go to the spool) failing: TypeError: "
    )
    stats = writer.stats()
    assert (stats.write_errors, stats.rows_spooled, stats.db_up) == (1, 1, False)
    assert [LedgerRow.from_json(line) for line in spool_path.read_bytes().splitlines()] == [bad]
    await writer.close()


async def test_a_row_that_fails_in_records_own_commit_takes_the_writers_road(
    db: Path, tmp_path: Path
) -> None:
    spool_path = tmp_path / "spool"
    writer = LedgerWriter(store(db), Spool(spool_path), retry_interval_s=3600, clock=Clock())
    await writer.start()
    await asyncio.sleep(0)  # the writer task is now idle: the next row is committed by record()
    await writer.record(row(1))
    assert writer.stats().rows_written == 1
    await asyncio.sleep(0)
    bad = row(2, ts="not a time")
    await writer.record(bad)  # record()'s own commit fails: queued, and spooled by the writer
    stats = writer.stats()
    assert (stats.rows_written, stats.rows_spooled, stats.write_errors) == (1, 1, 1)
    assert [LedgerRow.from_json(line) for line in spool_path.read_bytes().splitlines()] == [bad]
    await writer.close()


async def test_without_a_spool_the_caller_is_told_what_failed(db: Path) -> None:
    writer = LedgerWriter(store(db), clock=Clock())
    await writer.start()
    with pytest.raises(LedgerWriteFailed) as info:
        await writer.record(row(1, ts="not a time"))
    # utc_day's floor division of "not a time" fails with this TypeError.
    assert str(info.value) == (
        "ledger database unavailable: unsupported operand type(s) for //: 'str' and 'int'"
    )
    await writer.close()


async def test_when_the_spool_fails_too_the_caller_is_told(
    db: Path, tmp_path: Path, lock: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    spool_path = tmp_path / "spool"
    writer = LedgerWriter(store(db), Spool(spool_path), retry_interval_s=3600, clock=Clock())
    await writer.start()
    spool_path.unlink()
    spool_path.mkdir()  # appending to it now fails (a directory)
    lock.execute("BEGIN EXCLUSIVE")
    with caplog.at_level(logging.INFO, logger="gateway.metering.ledger.writer"):
        results = await asyncio.gather(
            writer.record(row(1)), writer.record(row(2)), return_exceptions=True
        )
    assert all(isinstance(r, LedgerWriteFailed) for r in results)
    assert str(results[0]) == (
        f"ledger database and spool failed: [Errno 21] Is a directory: '{spool_path}'"
    )
    assert caplog.messages[-1] == (
        "ledger spool append failed, 2 rows not recorded: "
        f"[Errno 21] Is a directory: '{spool_path}'"
    )
    stats = writer.stats()
    assert (stats.rows_spooled, stats.batches, stats.write_errors) == (0, 0, 1)
    lock.execute("ROLLBACK")
    spool_path.rmdir()
    await writer.close()
    assert ids_in(db) == []


async def test_a_database_missing_at_start_needs_the_spool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(LedgerUnavailable):
        await LedgerWriter(SqliteLedger(missing, create=False)).start()
    spool_path = tmp_path / "spool"
    Spool(spool_path).append([row(0)])
    clock = Clock(50.0)
    writer = LedgerWriter(
        SqliteLedger(missing, create=False), Spool(spool_path), retry_interval_s=5.0, clock=clock
    )
    with caplog.at_level(logging.INFO, logger="gateway.metering.ledger.writer"):
        await writer.start()  # down: the spooled row stays, the new one joins it
    assert caplog.messages[0].startswith(
        "ledger database (rows go to the spool) failing: LedgerUnavailable: sqlite ledger "
    )
    assert not writer.db_up and writer.stats().spool_rows == 1
    await writer.record(row(1))
    stats = writer.stats()
    # Down since start: the batch went to the spool without a failed write of its own.
    assert (stats.spool_rows, stats.rows_spooled, stats.write_errors) == (2, 1, 0)
    await writer.close()
    assert spooled_ids(spool_path) == ["req-0", "req-1"]


# --- replay --------------------------------------------------------------------------------------


async def test_replay_goes_round_by_round_and_chunk_by_chunk(
    db: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool_path = tmp_path / "spool"
    # Rounds of 3 rows, chunks of 2: [0 1][2] | [3 4][5] | [6]; row 4 is refused.
    Spool(spool_path).append([poison(i) if i == 4 else row(i) for i in range(7)])
    clock = Clock(10.0)
    writer = LedgerWriter(
        store(db),
        Spool(spool_path),
        replay_round=3,
        replay_chunk=2,
        retry_interval_s=1.0,
        clock=clock,
    )
    with caplog.at_level(logging.INFO, logger="gateway.metering.ledger.writer"):
        await writer.start()  # replays: round 1 commits and is consumed, chunk [3 4] fails
    stats = writer.stats()
    # The refused chunk starts the outage's streak: logged once, with what failed.
    (failing,) = [r.getMessage() for r in caplog.records if "failing" in r.getMessage()]
    assert failing.startswith(
        "ledger database (rows go to the spool) failing: LedgerUnavailable: sqlite ledger "
    )
    assert "NOT NULL constraint failed: ledger.tenant" in failing
    assert ids_in(db) == ["req-0", "req-1", "req-2"]
    assert (stats.rows_replayed, stats.spool_rows, stats.write_errors) == (3, 4, 1)
    assert not stats.db_up
    assert spooled_ids(spool_path) == ["req-3", "req-4", "req-5", "req-6"]
    await writer.close()


async def test_replay_counts_the_rows_it_moved(db: Path, tmp_path: Path) -> None:
    spool_path = tmp_path / "spool"
    Spool(spool_path).append([row(i) for i in range(7)])
    spool = Spool(spool_path)
    spool.open()
    writer = LedgerWriter(store(db), spool, replay_round=3, replay_chunk=2, clock=Clock())
    # Not started: replay_now replays on the caller's task.
    assert await writer.replay_now() == 7
    assert writer.stats().rows_replayed == 7 and spool.rows == 0
    assert spool_path.read_bytes() == b""
    assert ids_in(db) == [f"req-{i}" for i in range(7)]
    assert await writer.replay_now() == 0
    await writer.store.close()


async def test_a_chunk_refused_after_others_reports_the_rows_moved(
    db: Path, tmp_path: Path
) -> None:
    spool_path = tmp_path / "spool"
    # One round of 5, chunks of 2: [0 1] [2 3] [4] with row 4 refused: 4 moved, none consumed.
    Spool(spool_path).append([poison(i) if i == 4 else row(i) for i in range(5)])
    spool = Spool(spool_path)
    spool.open()
    writer = LedgerWriter(store(db), spool, replay_chunk=2, clock=Clock())
    assert await writer.replay_now() == 4
    assert spool.rows == 5 and writer.stats().rows_replayed == 0
    assert ids_in(db) == ["req-0", "req-1", "req-2", "req-3"]
    await writer.store.close()


async def test_the_default_chunk_is_5000_rows(db: Path, tmp_path: Path) -> None:
    spool_path = tmp_path / "spool"
    Spool(spool_path).append([poison(i) if i == 5000 else row(i) for i in range(5001)])
    spool = Spool(spool_path)
    spool.open()
    writer = LedgerWriter(store(db), spool, clock=Clock())
    assert await writer.replay_now() == 5000
    assert spool.rows == 5001
    await writer.store.close()


async def test_the_default_round_is_100000_rows(db: Path, tmp_path: Path) -> None:
    """100,000 rows and then one the database refuses: the first round commits and is
    consumed, the second (the refused row alone) fails and leaves only that row spooled.
    In rounds of 100,001 the refusal would come in the first round: nothing consumed.
    The spool is written as bytes (one row's JSON, its request id changed): ~65 MB, read
    and committed in 2-7 s (load 1-6), so the watchdog gets 120 s here."""
    faulthandler.dump_traceback_later(120, exit=True)
    one = row(0).to_json()
    head, tail = one.split(b'"req-0"')
    spool_path = tmp_path / "spool"
    spool_path.write_bytes(
        b"".join(b'%s"req-%d"%s\n' % (head, i, tail) for i in range(100_000))
        + poison(100_000).to_json()
        + b"\n"
    )
    spool = Spool(spool_path)
    spool.open()
    writer = LedgerWriter(store(db), spool, replay_chunk=100_000, clock=Clock())
    assert await writer.replay_now() == 100_000
    assert spool.rows == 1
    assert spooled_ids(spool_path) == ["req-100000"]
    assert writer.stats().rows_replayed == 100_000
    await writer.store.close()
    spool_path.unlink()
    db.unlink()


async def test_live_rows_queued_during_a_replay_go_in_between_its_chunks(
    db: Path, tmp_path: Path, lock: sqlite3.Connection
) -> None:
    # One row per batch, two per replay chunk. Rows 0-2 are spooled during an outage; then,
    # in one go, row B is recorded, a replay asked for and row L recorded: B's batch goes
    # first (to the spool: still down), then the replay, and L, queued meanwhile, is
    # committed right after the first chunk instead of waiting for the whole spool.
    writer = LedgerWriter(
        store(db), Spool(tmp_path / "spool"), max_batch=1, replay_chunk=2, clock=Clock()
    )
    await writer.start()
    lock.execute("BEGIN EXCLUSIVE")
    for i in range(3):
        await writer.record(row(i))
    lock.execute("ROLLBACK")
    b = asyncio.create_task(writer.record(row(10)))
    replay = asyncio.create_task(writer.replay_now())
    live = asyncio.create_task(writer.record(row(11)))
    await asyncio.gather(b, live)
    assert await replay == 4
    stats = writer.stats()
    assert (stats.batches, stats.last_batch_rows) == (5, 1)  # 0, 1, 2, B spooled; L written
    assert (stats.rows_spooled, stats.rows_written, stats.rows_replayed) == (4, 1, 4)
    await writer.close()
    assert ids_in(db) == ["req-0", "req-1", "req-11", "req-2", "req-10"]


class PausingSpool(Spool):
    """A real spool whose read number `pause_at` waits, on the writer's thread, until the
    test lets it go: a replay held between its rounds."""

    def __init__(self, path: Path, pause_at: int) -> None:
        super().__init__(path)
        self.reads = 0
        self.pause_at = pause_at
        self.paused = threading.Event()
        self.resume = threading.Event()

    def read(self, max_rows: int | None = None) -> tuple[list[LedgerRow], int]:
        self.reads += 1
        if self.reads == self.pause_at:
            self.paused.set()
            self.resume.wait(10)
        return super().read(max_rows)


async def test_a_row_recorded_while_a_replay_reads_the_spool_waits_for_the_writer(
    db: Path, tmp_path: Path, lock: sqlite3.Connection
) -> None:
    """Rows 0-3 spooled in an outage, replayed in rounds of 2. Between the rounds (the
    database is back, the second read in progress) the writer is busy, not idle: row L
    waits for it and goes in after the round, not on its own caller's turn before it."""
    spool = PausingSpool(tmp_path / "spool", pause_at=2)
    writer = LedgerWriter(
        store(db), spool, replay_round=2, replay_chunk=2, retry_interval_s=3600, clock=Clock()
    )
    await writer.start()
    lock.execute("BEGIN EXCLUSIVE")
    for i in range(4):
        await writer.record(row(i))
    lock.execute("ROLLBACK")
    replay = asyncio.create_task(writer.replay_now())
    assert await asyncio.to_thread(spool.paused.wait, 5)
    assert writer.db_up and ids_in(db) == ["req-0", "req-1"]
    live = asyncio.create_task(writer.record(row(11)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not live.done() and ids_in(db) == ["req-0", "req-1"]
    spool.resume.set()
    await live
    assert await replay == 4
    await writer.close()
    assert ids_in(db) == ["req-0", "req-1", "req-2", "req-3", "req-11"]


async def test_a_replay_asked_after_close_is_answered(db: Path, tmp_path: Path) -> None:
    """No writer task any more: the replay runs on the caller's task (nothing spooled: 0),
    instead of waiting for a task that has ended."""
    writer = LedgerWriter(store(db), Spool(tmp_path / "spool"), clock=Clock())
    await writer.start()
    await writer.close()
    async with asyncio.timeout(5):
        assert await writer.replay_now() == 0


async def test_an_empty_spool_is_not_read(db: Path, tmp_path: Path) -> None:
    where = tmp_path / "spool"
    where.mkdir()  # reading it would fail: it is not read at all when it holds no rows
    writer = LedgerWriter(store(db), Spool(where), clock=Clock())
    assert await writer.replay_now() == 0
    await writer.store.close()


async def test_replay_without_a_spool_moves_nothing(db: Path) -> None:
    writer = LedgerWriter(store(db))
    assert await writer.replay_now() == 0
    await writer.start()
    assert await writer.replay_now() == 0
    await writer.close()


async def test_a_spool_emptied_behind_the_writers_back_ends_the_replay(
    db: Path, tmp_path: Path
) -> None:
    spool_path = tmp_path / "spool"
    spool = Spool(spool_path)
    spool.append([row(1)])  # counted as 1 row
    spool_path.unlink()  # ... but the file is gone: read finds nothing
    writer = LedgerWriter(store(db), spool, clock=Clock())
    async with asyncio.timeout(5):
        assert await writer.replay_now() == 0
    await writer.store.close()


async def test_a_spool_that_cannot_be_read_is_retried_after_the_interval(
    db: Path, tmp_path: Path, lock: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(100.0)
    spool_path = tmp_path / "spool"
    writer = LedgerWriter(store(db), Spool(spool_path), retry_interval_s=2.0, clock=clock)
    await writer.start()
    lock.execute("BEGIN EXCLUSIVE")
    await writer.record(row(1))
    lock.execute("ROLLBACK")
    content = spool_path.read_bytes()
    spool_path.unlink()
    spool_path.mkdir()  # reading it fails with an OSError other than "not found"
    clock.now = 103.0
    with caplog.at_level(logging.INFO, logger="gateway.metering.ledger.writer"):
        assert await writer.replay_now() == 0  # logged; next try from 105.0
    assert caplog.messages[-1] == (
        f"ledger spool replay failed: [Errno 21] Is a directory: '{spool_path}'"
    )
    spool_path.rmdir()
    spool_path.write_bytes(content)
    clock.now = 104.5
    await writer.record(row(2))  # down and not due: spooled
    await writer.record(row(3))
    assert (writer.stats().spool_rows, writer.stats().rows_written) == (3, 0)
    clock.now = 105.0
    await writer.record(row(4))
    await settled(writer)
    await writer.close()
    assert ids_in(db) == ["req-1", "req-2", "req-3", "req-4"]


async def test_a_cancelled_replay_caller_does_not_stop_the_writer(
    db: Path, tmp_path: Path, lock: sqlite3.Connection
) -> None:
    writer = LedgerWriter(store(db), Spool(tmp_path / "spool"), clock=Clock())
    await writer.start()
    lock.execute("BEGIN EXCLUSIVE")
    await writer.record(row(1))
    lock.execute("ROLLBACK")
    waiting = asyncio.create_task(writer.replay_now())
    await asyncio.sleep(0)  # queued
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await writer.replay_now() in (0, 1)  # the first request may have moved it
    assert writer.stats().spool_rows == 0
    await writer.record(row(2))
    await writer.close()
    assert ids_in(db) == ["req-1", "req-2"]


async def test_a_cancelled_caller_of_a_failed_batch_does_not_stop_the_writer(
    db: Path, lock: sqlite3.Connection
) -> None:
    writer = LedgerWriter(store(db))
    await writer.start()
    lock.execute("BEGIN EXCLUSIVE")
    gone = asyncio.create_task(writer.record(row(1)))
    stays = asyncio.create_task(writer.record(row(2)))
    await asyncio.sleep(0)  # both queued
    gone.cancel()
    with pytest.raises(LedgerWriteFailed):
        await stays
    lock.execute("ROLLBACK")
    await writer.record(row(3))
    await writer.close()
    assert ids_in(db) == ["req-3"]


# --- start: the spool and the spools of workers no longer run -----------------------------------


async def test_start_takes_over_orphans_and_skips_one_it_cannot_read(
    db: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unreadable = tmp_path / "ledger.spool.w2"
    unreadable.mkdir()
    orphan = tmp_path / "ledger.spool.w3"
    Spool(orphan).append([row(5), row(6)])
    spool_path = tmp_path / "ledger.spool"
    writer = LedgerWriter(store(db), Spool(spool_path), adopt=[unreadable, orphan], clock=Clock())
    with caplog.at_level(logging.INFO, logger="gateway.metering.ledger.writer"):
        await writer.start()
    assert caplog.messages == [
        f"ledger spool {unreadable} could not be taken over: "
        f"[Errno 21] Is a directory: '{unreadable}'",
        f"ledger spool {orphan} taken over: 2 rows to replay",
    ]
    assert unreadable.is_dir() and not orphan.exists()
    stats = writer.stats()
    assert (stats.spool_rows, stats.rows_replayed) == (0, 2)
    await writer.close()
    assert ids_in(db) == ["req-5", "req-6"]


async def test_start_with_nothing_spooled_replays_nothing(db: Path, tmp_path: Path) -> None:
    writer = LedgerWriter(store(db), Spool(tmp_path / "spool"), clock=Clock())
    await writer.start()
    assert writer.stats().rows_replayed == 0 and writer.db_up
    await writer.record(row(1))
    await writer.close()
    assert ids_in(db) == ["req-1"]


class Counting(Clock):
    """A clock that counts how often it is read."""

    def __init__(self, now: float = 100.0) -> None:
        super().__init__(now)
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


@pytest.mark.parametrize("spooled", [False, True])
async def test_an_idle_writer_with_nothing_spooled_does_not_poll(
    db: Path, tmp_path: Path, spooled: bool
) -> None:
    clock = Counting()
    spool = Spool(tmp_path / "spool") if spooled else None
    writer = LedgerWriter(store(db), spool, clock=clock)
    await writer.start()
    await writer.record(row(1))
    reads = clock.reads
    for _ in range(20):  # twenty turns of the loop with nothing to do
        await asyncio.sleep(0)
    await asyncio.sleep(0.02)
    assert clock.reads == reads
    await writer.close()


async def test_the_default_retry_interval_is_2_s(
    db: Path, tmp_path: Path, lock: sqlite3.Connection
) -> None:
    clock = Clock(100.0)
    writer = LedgerWriter(store(db), Spool(tmp_path / "spool"), clock=clock)
    await writer.start()
    lock.execute("BEGIN EXCLUSIVE")
    await writer.record(row(1))
    lock.execute("ROLLBACK")
    clock.now = 101.9
    await writer.record(row(2))
    await writer.record(row(3))  # a replay started after row 2 would write it between chunks
    assert (writer.stats().spool_rows, writer.stats().rows_written) == (3, 0)
    clock.now = 102.0
    await writer.record(row(4))
    await settled(writer)
    await writer.close()
    assert ids_in(db) == ["req-1", "req-2", "req-3", "req-4"]
