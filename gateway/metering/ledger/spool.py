"""The local spool: ledger rows the database could not take, as fsynced JSON lines.

Every method is synchronous and blocking (it fsyncs); the writer calls them from a
worker thread and never two at once. A row is durable once `append` returns.
The replayer reads a prefix with `read`, commits it to the database, then removes
exactly that prefix with `consume`, so rows appended meanwhile are kept.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from gateway.metering.ledger.rows import LedgerRow

log = logging.getLogger(__name__)


class Spool:
    """An append-only file of JSON lines, one `LedgerRow` per line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows = 0  # rows currently in the file
        self.size = 0  # bytes currently in the file

    def open(self) -> None:
        """Create the file if absent; cut a torn last line left by a crash; count rows."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with open(self.path, "ab+") as f:
            f.seek(0)
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end != len(data):
                # The append that wrote this tail never finished its fsync, so no
                # caller was told its row was durable: dropping it loses nothing promised.
                log.warning("ledger spool %s: dropping a torn last line", self.path)
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        if created:
            _fsync_dir(self.path.parent)  # the new file's name must survive a power cut too
        self.size = end
        self.rows = data.count(b"\n", 0, end)

    def append(self, rows: Sequence[LedgerRow]) -> None:
        """Append rows and fsync; on failure the file is cut back to its previous size."""
        payload = b"".join(r.to_json() + b"\n" for r in rows)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            before = os.fstat(fd).st_size
            try:
                view = memoryview(payload)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            except OSError:
                # A partial line would glue onto the next append and corrupt both rows.
                os.ftruncate(fd, before)
                raise
        finally:
            os.close(fd)
        self.size = before + len(payload)
        self.rows += len(rows)

    def read(self, max_rows: int | None = None) -> tuple[list[LedgerRow], int]:
        """The first rows (up to `max_rows`) and how many bytes they span.

        A line that does not parse is logged and skipped (its bytes still count,
        so `consume` removes it rather than blocking the spool forever).
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], 0
        rows: list[LedgerRow] = []
        pos = 0
        while pos < len(data) and (max_rows is None or len(rows) < max_rows):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # torn tail: not ours to read yet
            line = data[pos:nl]
            pos = nl + 1
            if not line.strip():
                continue
            try:
                rows.append(LedgerRow.from_json(line))
            except (ValueError, TypeError, KeyError) as exc:
                log.error("ledger spool %s: unreadable line skipped: %s", self.path, exc)
        return rows, pos

    def consume(self, nbytes: int) -> None:
        """Remove the first `nbytes` (a prefix returned by `read`) now that it is committed."""
        if nbytes <= 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            total = f.tell()
            if nbytes >= total:
                f.truncate(0)
                f.flush()
                os.fsync(f.fileno())
                self.size = 0
                self.rows = 0
                return
            f.seek(nbytes)
            tail = f.read()
        # Rows were appended after the replayed prefix: keep them, atomically.
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out:
            out.write(tail)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self.size = len(tail)
        self.rows = tail.count(b"\n")


def adopt_spool(target: Spool, orphan: Path) -> int:
    """Move the rows of a spool no process writes any more into `target`; remove the orphan.

    Rows reach `target` (fsynced) before the orphan goes: a crash in between leaves
    them in both, and replay ignores the copy (rows are keyed by request and attempt).
    """
    source = Spool(orphan)
    source.open()
    rows, _ = source.read()
    if rows:
        target.append(rows)
    orphan.unlink()
    _fsync_dir(orphan.parent)
    return len(rows)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
