"""The ledger writer: group commit to the store, spool fallback, exactly-once replay.

One task owns the store and the spool. `record(row)` queues the row and returns
when it is committed to the database or fsynced to the spool; rows that arrive
while a commit runs go together in the next transaction (group commit), so the
request path never waits for one disk sync per request.

A row that finds the writer idle (nothing queued, the database up, no other row
committed at once in this turn of the event loop) is committed by `record` itself
when the store can do so without waiting (`write_now`, SQLite on the loop): the
same commit, without the two hops through the writer task (wake it, then wake the
caller), which at concurrency 1 were most of the ledger's time per request. Rows
that arrive together in one turn of the loop still go to the writer as one batch.

When a write fails the writer marks the database down: that batch and every
following one go to the spool until a replay succeeds. Replay (every
`retry_interval_s` while down, at start, or on `replay_now()`) reads the spool,
inserts its rows with ON CONFLICT DO NOTHING on (request_id, attempt), and only
after the commit removes exactly the replayed prefix: a crash at any point leaves
either rows still spooled (replayed again, duplicates ignored) or already in the
database, never lost and never counted twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.metering.ledger.rows import LedgerRow, LedgerStore, LedgerUnavailable
from gateway.metering.ledger.spool import Spool, adopt_spool
from gateway.state.failures import FailureStreak

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

_EXPECTED = (LedgerUnavailable, OSError, TimeoutError)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class LedgerWriteFailed(Exception):
    """Neither the database nor the spool took the row: the request was not recorded."""


@dataclass(frozen=True, slots=True)
class LedgerStats:
    """A snapshot of the writer's counters (also exported as neogate_ledger_* metrics)."""

    db_up: bool
    backlog_rows: int
    spool_rows: int
    spool_bytes: int
    rows_written: int
    rows_spooled: int
    rows_replayed: int
    batches: int
    last_batch_rows: int
    write_errors: int


class _Metrics:
    def __init__(self, registry: CollectorRegistry, writer: LedgerWriter) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        r = registry
        self.written = Counter(
            "neogate_ledger_rows_written_total", "Rows committed to the database.", registry=r
        )
        self.spooled = Counter(
            "neogate_ledger_rows_spooled_total",
            "Rows written to the local spool because the database could not take them.",
            registry=r,
        )
        self.replayed = Counter(
            "neogate_ledger_rows_replayed_total",
            "Spooled rows moved into the database.",
            registry=r,
        )
        self.errors = Counter(
            "neogate_ledger_write_errors_total", "Failed database writes.", registry=r
        )
        self.batch = Histogram(
            "neogate_ledger_batch_rows",
            "Rows per group commit.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "neogate_ledger_write_seconds",
            "Time to commit one batch to the database (or spool).",
            buckets=_WRITE_BUCKETS,
            registry=r,
        )
        backlog = Gauge(
            "neogate_ledger_backlog_rows", "Rows waiting for the next commit.", registry=r
        )
        backlog.set_function(lambda: len(writer._pending))
        spool_rows = Gauge("neogate_ledger_spool_rows", "Rows held in the spool.", registry=r)
        spool_rows.set_function(lambda: writer._spool.rows if writer._spool else 0)
        spool_bytes = Gauge("neogate_ledger_spool_bytes", "Size of the spool file.", registry=r)
        spool_bytes.set_function(lambda: writer._spool.size if writer._spool else 0)
        up = Gauge("neogate_ledger_up", "1 while the ledger database takes writes.", registry=r)
        up.set_function(lambda: 0.0 if writer._down else 1.0)


def _always() -> bool:
    return True


class LedgerWriter:
    """Group-committing, spooling ledger writer over one `LedgerStore`."""

    def __init__(
        self,
        store: LedgerStore,
        spool: Spool | None = None,
        *,
        adopt: Sequence[Path] = (),
        max_batch: int = 4096,
        replay_chunk: int = 5000,
        replay_round: int = 100_000,
        retry_interval_s: float = 2.0,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        alone: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        # True while the recording request is the only one in flight: only then does a row
        # commit on its own request's turn (`_commit_now`). With company the row waits for
        # the writer task, which commits every row of a loop turn in one transaction.
        self._alone = alone if alone is not None else _always
        self._spool = spool
        self._adopt = list(adopt)  # spools of worker indices no longer run, taken over at start
        self._max_batch = max_batch
        self._replay_chunk = replay_chunk
        self._replay_round = replay_round
        self._retry_interval = retry_interval_s
        self._clock = clock
        self._pending: list[tuple[LedgerRow, asyncio.Future[None]]] = []
        self._replay_waiters: list[asyncio.Future[int]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._waiting = False  # the writer task is waiting for rows (not committing)
        self._direct_turn = False  # a row was committed by record() in this loop turn
        self._closing = False
        self._down = False
        self._next_retry = 0.0
        self._written = self._spooled = self._replayed = 0
        self._batches = self._last_batch = self._errors = 0
        self._metrics = _Metrics(registry, self) if registry is not None else None
        self._db_streak = FailureStreak(
            log, "ledger database (rows go to the spool)", expected=_EXPECTED, level=logging.ERROR
        )

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and the spool, replay what the spool holds, start the writer task.

        A database that is down at start is not an error: rows go to the spool and
        are replayed when it comes back (the spool is required for that).
        """
        if self._spool is not None:
            await asyncio.to_thread(self._spool.open)
            for orphan in self._adopt:
                try:
                    n = await asyncio.to_thread(adopt_spool, self._spool, orphan)
                except OSError as exc:
                    log.error("ledger spool %s could not be taken over: %s", orphan, exc)
                    continue
                log.warning("ledger spool %s taken over: %d rows to replay", orphan, n)
        try:
            await self.store.open()
        except LedgerUnavailable as exc:
            if self._spool is None:
                raise
            self._db_streak.failed(exc)
            self._mark_down()
        if self._spool is not None and self._spool.rows and not self._down:
            await self._replay()
        self._task = asyncio.create_task(self._run(), name="neogate-ledger-writer")

    async def close(self) -> None:
        """Commit (or spool) everything queued, stop the task and close the store."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.store.close()

    # --- the request path -----------------------------------------------------------

    async def record(self, row: LedgerRow) -> None:
        """Return once `row` is committed or durably spooled; raise LedgerWriteFailed if neither.

        Cancelling the caller does not drop the row: it stays queued and is written.
        """
        if self._task is None or self._closing:
            raise LedgerWriteFailed("the ledger writer is not running")
        loop = asyncio.get_running_loop()
        if (
            self._waiting
            and not self._pending
            and not self._down
            and not self._direct_turn
            and self._alone()
            and self._commit_now(row, loop)
        ):
            return
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((row, fut))
        self._wake.set()
        await fut

    def _commit_now(self, row: LedgerRow, loop: asyncio.AbstractEventLoop) -> bool:
        """Commit `row` here, on the caller's turn, if the store can without waiting."""
        started = self._clock()
        try:
            if not self.store.write_now((row,)):
                return False  # it would wait (locked file, a thread-only store): queue it
        except Exception:  # the writer task retries it and owns the failure
            # Queued, the row takes the writer's road: retried, spooled if the database
            # refuses it again, counted and logged there, once per outage.
            return False
        # Rows recorded later in this same turn go to the writer together (group commit).
        self._direct_turn = True
        loop.call_soon(self._end_direct_turn)
        self._db_streak.succeeded()
        self._done((), (row,), started, spooled=False)
        return True

    def _end_direct_turn(self) -> None:
        self._direct_turn = False

    async def replay_now(self) -> int:
        """Try to move the spool into the database now; returns rows moved (0 if it failed)."""
        if self._task is None:
            return await self._replay()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._replay_waiters.append(fut)
        self._wake.set()
        return await fut

    @property
    def db_up(self) -> bool:
        return not self._down

    def stats(self) -> LedgerStats:
        spool = self._spool
        return LedgerStats(
            db_up=not self._down,
            backlog_rows=len(self._pending),
            spool_rows=spool.rows if spool else 0,
            spool_bytes=spool.size if spool else 0,
            rows_written=self._written,
            rows_spooled=self._spooled,
            rows_replayed=self._replayed,
            batches=self._batches,
            last_batch_rows=self._last_batch,
            write_errors=self._errors,
        )

    # --- the writer task -----------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._pending and not self._replay_waiters:
                if self._closing:
                    return
                self._wake.clear()
                self._waiting = True
                try:
                    await self._idle_wait()
                finally:
                    self._waiting = False
            if self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._commit(batch)
            if self._replay_waiters or self._replay_due():
                waiters, self._replay_waiters = self._replay_waiters, []
                try:
                    moved = await self._replay()
                except OSError as exc:
                    # The spool itself failed (disk): keep serving, try again later.
                    log.error("ledger spool replay failed: %s", exc)
                    self._next_retry = self._clock() + self._retry_interval
                    moved = 0
                for w in waiters:
                    if not w.done():
                        w.set_result(moved)

    async def _idle_wait(self) -> None:
        if not self._replay_pending():
            await self._wake.wait()
            return
        delay = max(0.0, self._next_retry - self._clock())
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            pass  # time to retry the database

    def _replay_pending(self) -> bool:
        return self._spool is not None and self._spool.rows > 0 and not self._closing

    def _replay_due(self) -> bool:
        return self._replay_pending() and self._clock() >= self._next_retry

    def _mark_down(self) -> None:
        self._down = True
        self._next_retry = self._clock() + self._retry_interval

    async def _commit(self, batch: list[tuple[LedgerRow, asyncio.Future[None]]]) -> None:
        rows = [row for row, _ in batch]
        started = self._clock()
        error: BaseException | None = None
        # While down, batches go straight to the spool instead of each waiting on a
        # failing database; without a spool there is nothing to do but try.
        if not self._down or self._spool is None:
            try:
                await self.store.write(rows)
            except LedgerUnavailable as exc:
                error = exc
            except Exception as exc:
                # Not an outage we recognise, but the rows must not be lost: spool them.
                log.exception("ledger write failed unexpectedly")
                error = exc
            else:
                self._db_streak.succeeded()
                self._done(batch, rows, started, spooled=False)
                return
            self._errors += 1
            if self._metrics:
                self._metrics.errors.inc()
            self._db_streak.failed(error)  # once per outage: the rest go to the spool
            self._mark_down()
        if self._spool is None:
            self._fail(batch, LedgerWriteFailed(f"ledger database unavailable: {error}"))
            return
        try:
            await asyncio.to_thread(self._spool.append, rows)
        except OSError as exc:
            log.error("ledger spool append failed, %d rows not recorded: %s", len(rows), exc)
            self._fail(batch, LedgerWriteFailed(f"ledger database and spool failed: {exc}"))
            return
        self._done(batch, rows, started, spooled=True)

    def _done(
        self,
        batch: Sequence[tuple[LedgerRow, asyncio.Future[None]]],
        rows: Sequence[LedgerRow],
        started: float,
        *,
        spooled: bool,
    ) -> None:
        n = len(rows)
        self._batches += 1
        self._last_batch = n
        if spooled:
            self._spooled += n
        else:
            self._written += n
        if self._metrics:
            (self._metrics.spooled if spooled else self._metrics.written).inc(n)
            self._metrics.batch.observe(n)
            self._metrics.latency.observe(self._clock() - started)
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)

    @staticmethod
    def _fail(batch: list[tuple[LedgerRow, asyncio.Future[None]]], exc: Exception) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(exc)

    async def _replay(self) -> int:
        """Move spooled rows into the database, round by round; 0 when the database refuses."""
        spool = self._spool
        if spool is None:
            return 0
        moved = 0
        while spool.rows > 0:
            rows, nbytes = await asyncio.to_thread(spool.read, self._replay_round)
            for i in range(0, len(rows), self._replay_chunk):
                try:
                    await self.store.write(rows[i : i + self._replay_chunk])
                except Exception as exc:
                    self._errors += 1
                    self._db_streak.failed(exc)  # counted; logged once per outage
                    self._mark_down()
                    return moved
                moved += min(self._replay_chunk, len(rows) - i)
                if self._down:
                    self._db_streak.succeeded()
                    log.info("ledger database is back, replaying %d spooled rows", spool.rows)
                    self._down = False
                # Live rows queued meanwhile go in between chunks, not after the whole spool.
                if self._pending and self._task is not None:
                    batch = self._pending[: self._max_batch]
                    del self._pending[: self._max_batch]
                    await self._commit(batch)
            # Only now, after the commits, forget exactly the replayed prefix.
            await asyncio.to_thread(spool.consume, nbytes)
            self._replayed += len(rows)
            if self._metrics:
                self._metrics.replayed.inc(len(rows))
            if nbytes == 0:
                break
        return moved
