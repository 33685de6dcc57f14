"""The SQLite ledger store: one file in WAL mode.

Durability: journal_mode=WAL with synchronous=NORMAL. A commit appends the
transaction to the -wal file with write(2) before COMMIT returns; it is not fsynced
until a checkpoint. The data is then in the OS page cache, which survives the
death of our process (kill -9, OOM kill, crash): the next open replays the WAL.
Only an OS crash or power loss can drop the last commits; pass
synchronous="FULL" to fsync every commit when that matters more than throughput.

Where commits go: with synchronous=NORMAL a commit is a few page-cache writes and no
fsync, so it runs on the event loop itself, on a connection of its own that never
waits for a lock (busy_timeout 0) and never checkpoints. Handing each batch to a
thread instead costs more than the commit: the thread must win the GIL from a busy
loop, and every request waits for that (measured: ~100 us of CPU per request and
~15% of the core benchmark's throughput). Everything that can block runs on the
store's thread, on a second connection: checkpoints (they fsync), reads, commits
with synchronous=FULL, and any commit that found the file locked by another process
(`serve --workers N` shares one file). A row commits on its own request's turn only while
that request is alone in the process (`LedgerWriter`'s `alone`: the latency of one request
at a time); with company, the rows of a loop turn wait for the writer task and commit as
one transaction (throughput).

Checkpoints never hold a commit below `wal_cap_bytes`: they are PASSIVE (SQLite
copies the WAL into the database and syncs it without the write lock), one per
`checkpoint_bytes` of WAL, plus one whenever the writer has been idle for `idle_s`.
The WAL starts over at the first commit after a PASSIVE round copied all of it, which
needs a round with no commit during its syncs: an idle moment. Only a WAL that
reaches `wal_cap_bytes` without one (back-to-back commits for that long) gets a
RESTART checkpoint, which takes the write lock while it copies and syncs the last
frames: the commit that meets it waits on the thread (`restarts` counts them).
Before, every checkpoint ended in a RESTART: one commit in ~800 waited for its fsyncs.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any, Literal, TypeVar

from gateway.metering.ledger.rows import LedgerRow, LedgerUnavailable
from gateway.metering.ledger.sqlite_file import (
    INSERTS,
    ROWS_PER_INSERT,
    SCHEMA,
    add_missing_columns,
    ensure_wal,
    is_busy,
)

T = TypeVar("T")

# Look at the WAL's size after this many commits on the loop's connection.
_CHECK_EVERY = 32
# PASSIVE checkpoint rounds (they never block commits) per checkpoint.
_PASSIVE_ROUNDS = 3
# The longest wait between idle checks while a checkpoint could not catch up.
_IDLE_BACKOFF_MAX_S = 1.0


class SqliteLedger:
    """LedgerStore over one SQLite file: quick commits on the loop, the rest on a thread."""

    dialect = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout_s: float = 2.0,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        create: bool = True,
        checkpoint_bytes: int = 64 << 20,
        wal_cap_bytes: int | None = None,
        idle_s: float = 0.002,
    ) -> None:
        self.path = Path(path)
        self._busy_ms = int(busy_timeout_s * 1000)
        self._synchronous = synchronous
        self._create = create
        self._conn: sqlite3.Connection | None = None  # the thread's connection
        # The loop's connection for quick commits (synchronous=NORMAL only).
        self._inline = synchronous == "NORMAL"
        self._fast: sqlite3.Connection | None = None
        self._wal = f"{self.path}-wal"
        # Checkpoint once the WAL holds this much: ~9,600 one-row commits (`PAGE_SIZE`).
        # While one runs, requests on the loop are slower (its copy and fsyncs beside them:
        # at c=1 the ledger's p99 was 2-4x that of no ledger with one per ~750 requests);
        # fewer of them is what keeps that out of the p99 (docs/benchmarks.md, 2026-12-05).
        self.checkpoint_bytes = checkpoint_bytes
        # Past this, a RESTART bounds the file (it may hold one commit; see the docstring).
        self.wal_cap_bytes = wal_cap_bytes if wal_cap_bytes is not None else 4 * checkpoint_bytes
        self.idle_s = idle_s
        self._since_check = 0
        self._checkpointing = False
        self._owed = False  # the WAL is past checkpoint_bytes and has not started over
        self._next_passive = 0  # WAL size at which the next PASSIVE checkpoint starts
        self._commits = 0  # commits by this store, loop and thread: the idle check's count
        self._idle_mark = 0
        self._idle_delay = idle_s
        self._idle_timer: asyncio.TimerHandle | None = None
        # A checkpoint's RESTART makes the next commit reuse the WAL from its start, but
        # the file keeps its size unless it is cut: without the limit the size check
        # above found it "full" after every 32 commits from the first checkpoint on, and
        # started a checkpoint each time (one commit in ~80 queued behind its fsync:
        # p99 at concurrency 1 several times that of no ledger). Cut to a quarter of the
        # checkpoint size, the file's size again says how much it holds.
        self._size_limit = max(checkpoint_bytes // 4, 1 << 16)
        self.inline_commits = 0
        self.thread_commits = 0
        self.checkpoints = 0  # checkpoints run (each one or more PASSIVE rounds)
        self.restarts = 0  # of those, ended by a RESTART (the WAL reached wal_cap_bytes)
        # One thread owns the connection: sqlite3 objects must stay on their thread,
        # and the event loop never blocks on disk.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neogate-ledger")

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def open(self) -> None:
        """Open (creating the file and schema when `create`); LedgerUnavailable on failure."""
        await self._run(self._open_sync)
        if self._inline:
            self._open_fast()

    def _open_fast(self) -> None:
        if self._fast is not None:
            return
        try:
            conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=rw",
                uri=True,
                isolation_level=None,
                check_same_thread=False,  # closed from the thread at the end
            )
            try:
                conn.execute("PRAGMA busy_timeout = 0")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                # This connection restarts the WAL after a checkpoint: it cuts the file.
                conn.execute(f"PRAGMA journal_size_limit = {self._size_limit}")
            except sqlite3.Error:
                conn.close()
                raise
        except (sqlite3.Error, OSError) as exc:
            raise LedgerUnavailable(f"sqlite ledger {self.path}: {exc}") from exc
        self._fast = conn

    def _open_sync(self) -> None:
        if self._conn is not None:
            return
        try:
            if self._create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, isolation_level=None)
            else:
                conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=rw", uri=True)
                conn.isolation_level = None
            try:
                conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                ensure_wal(conn, self._busy_ms / 1000)
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
                conn.execute(f"PRAGMA journal_size_limit = {self._size_limit}")
                if self._create:
                    add_missing_columns(conn)
                    for stmt in SCHEMA:
                        conn.execute(stmt)
            except BaseException:
                conn.close()
                raise
        except (sqlite3.Error, OSError) as exc:
            raise LedgerUnavailable(f"sqlite ledger {self.path}: {exc}") from exc
        self._conn = conn

    async def write(self, rows: Sequence[LedgerRow]) -> None:
        """Insert `rows` in one transaction; duplicates of (request_id, attempt) are skipped."""
        if self.write_now(rows):
            return
        values = [r.as_tuple() for r in rows]
        await self._run(lambda: self._write_sync(values))
        self.thread_commits += 1

    def write_now(self, rows: Sequence[LedgerRow]) -> bool:
        """Commit `rows` at once on the calling (loop) thread; False if that would mean waiting.

        False when the store commits on its thread (synchronous=FULL), is not open yet,
        or the file is locked by another process: the caller then uses `write`.
        Raises `LedgerUnavailable` when the database refuses the rows.
        """
        if not self._inline or self._conn is None:
            return False  # not open yet: the thread opens it (and makes the schema) first
        try:
            self._open_fast()
        except LedgerUnavailable:
            return False  # the thread's connection reports the reason
        conn = self._fast
        assert conn is not None
        try:
            self._commit(conn, [r.as_tuple() for r in rows])
        except sqlite3.Error as exc:
            if isinstance(exc, sqlite3.OperationalError) and is_busy(exc):
                return False
            self._fast = None  # reopened for the next batch
            conn.close()
            raise LedgerUnavailable(f"sqlite ledger {self.path}: {exc}") from exc
        self.inline_commits += 1
        self._commits += 1
        self._since_check += 1
        if self._since_check >= _CHECK_EVERY and not self._checkpointing:
            self._since_check = 0
            self._maybe_checkpoint()
        return True

    def _maybe_checkpoint(self) -> None:
        """Start a checkpoint on the thread once the WAL has grown (one stat(2) to know)."""
        try:
            size = os.stat(self._wal).st_size
        except OSError:
            return
        if size < self.checkpoint_bytes:  # the WAL started over (or never grew)
            self._owed = False
            self._next_passive = 0
            self._idle_delay = self.idle_s
            return
        self._owed = True
        if size >= self.wal_cap_bytes:
            self._start_checkpoint(restart=True)
        elif size >= self._next_passive:
            # Copy the bulk now, off the commit path; the WAL starts over after an idle one.
            self._next_passive = size + self.checkpoint_bytes
            self._start_checkpoint(restart=False)
        else:
            self._arm_idle()

    def _start_checkpoint(self, *, restart: bool) -> None:
        self._checkpointing = True
        fut = asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self._checkpoint(restart)
        )
        fut.add_done_callback(self._checkpoint_done)

    def _checkpoint(self, restart: bool) -> bool:
        """Copy the WAL into the database file and sync it; True if it caught up entirely.

        PASSIVE rounds never take the write lock: commits go on meanwhile. Caught up means
        a round found the WAL exactly as the previous round left it, all copied: nothing came
        in since (from any process), so the next commit starts the WAL over (SQLite does that
        when a writer finds it fully copied). A round with nothing to copy does no I/O. With
        `restart` a RESTART follows the rounds: it takes the write lock while it copies and
        syncs what came in since the last round, so a commit that meets it waits on this
        thread; only a WAL at `wal_cap_bytes` asks for one.
        """
        self._open_sync()
        conn = self._conn
        assert conn is not None
        self.checkpoints += 1
        caught_up = False
        copied = -1  # frames the last round left fully copied (-1: not all copied)
        for _ in range(_PASSIVE_ROUNDS + 1):
            ((busy, frames, done),) = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            if busy or done < frames:  # a reader still needs frames: not all copied
                copied = -1
                continue
            if frames == copied:
                caught_up = True
                break
            copied = frames
        if restart:
            self.restarts += 1
            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
            return True
        return caught_up

    def _checkpoint_done(self, fut: asyncio.Future[bool]) -> None:
        self._checkpointing = False
        if fut.cancelled():
            return
        if fut.exception() is not None:
            self._since_check = _CHECK_EVERY  # look again after the next commit
            return
        if fut.result():
            self._owed = False  # the next commit starts the WAL over
            self._idle_delay = self.idle_s
        elif self._owed:
            self._arm_idle()

    def _arm_idle(self) -> None:
        """Check again in `_idle_delay`: a checkpoint then, if no commit came in meanwhile."""
        if self._idle_timer is not None or self._fast is None:
            return
        self._idle_mark = self._commits
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self._idle_delay, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if not self._owed or self._fast is None:
            return
        if self._checkpointing or self._commits != self._idle_mark:
            self._arm_idle()  # still busy: look again after another quiet spell
            return
        # Idle: a PASSIVE round now meets no commit and can copy all of the WAL. If traffic
        # comes back during its syncs, try again later, less often each time.
        self._idle_delay = min(self._idle_delay * 2, _IDLE_BACKOFF_MAX_S)
        self._start_checkpoint(restart=False)

    @staticmethod
    def _commit(conn: sqlite3.Connection, values: list[tuple[Any, ...]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for i in range(0, len(values), ROWS_PER_INSERT):
                part = values[i : i + ROWS_PER_INSERT]
                conn.execute(INSERTS[len(part) - 1], list(chain.from_iterable(part)))
            conn.execute("COMMIT")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _write_sync(self, values: list[tuple[Any, ...]]) -> None:
        self._open_sync()
        conn = self._conn
        assert conn is not None
        try:
            self._commit(conn, values)
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"sqlite ledger {self.path}: {exc}") from exc
        self._commits += 1

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query (``?`` placeholders) on the store's thread."""

        def go() -> list[tuple[Any, ...]]:
            self._open_sync()
            assert self._conn is not None
            try:
                return list(self._conn.execute(sql, tuple(params)).fetchall())
            except sqlite3.Error as exc:
                raise LedgerUnavailable(f"sqlite ledger {self.path}: {exc}") from exc

        return await self._run(go)

    async def close(self) -> None:
        """Close the connection and stop the thread."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

        def go() -> None:
            if self._fast is not None:
                self._fast.close()
                self._fast = None
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        try:
            await self._run(go)
        finally:
            self._executor.shutdown(wait=True)
