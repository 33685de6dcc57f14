"""The one splitter of an SSE byte stream into event blocks, fed chunk by chunk as bytes arrive.

A line ends in LF, CRLF or a bare CR (the SSE grammar); an event ends at a blank line.
Chunks may split the stream anywhere, a CRLF included: a chunk ending in CR is taken as
a line end at once (an event whose blank line ends there is complete), and an LF opening
the next chunk is then the rest of that CRLF, not a second line end.

Blocks come out with their lines joined by LF and without the blank line that ended them;
blank lines between events make no empty blocks. A block longer than `max_event_bytes`
before its end raises `EventTooLarge`. Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import Final

MAX_EVENT_BYTES: Final = 8 * 1024 * 1024


class EventTooLarge(ValueError):
    """An event grew past the splitter's limit before its blank line."""


class EventSplitter:
    """Incremental SSE event splitter for one stream: `feed` each chunk, `finish` at its end."""

    __slots__ = ("_buf", "_max", "_skip_lf")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buf = b""  # the unfinished event, lines normalised to LF
        self._max = max_event_bytes
        self._skip_lf = False  # the last chunk ended in CR: an LF next completes that CRLF

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events that `chunk` completes, in order (often none, usually one)."""
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._skip_lf = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf
        if buf:
            # The held part has no blank line: search from its last byte on.
            at = len(buf) - 1
            buf += chunk
            found = buf.find(b"\n\n", at) >= 0
        else:
            buf = chunk
            found = b"\n\n" in buf
        if not found:
            if len(buf) > self._max:
                raise EventTooLarge(f"an event longer than {self._max} bytes")
            self._buf = buf
            return []
        blocks = buf.split(b"\n\n")
        rest = blocks.pop()
        if len(rest) > self._max:
            raise EventTooLarge(f"an event longer than {self._max} bytes")
        self._buf = rest
        if len(blocks) == 1 and blocks[0] and blocks[0][0] != 10:
            return blocks  # the common case: one whole event
        # A run of three or more line ends leaves LFs at a block's start: blank lines.
        trimmed = (b.lstrip(b"\n") if b[:1] == b"\n" else b for b in blocks)
        return [b for b in trimmed if b]

    def finish(self) -> bytes | None:
        """The last event if the stream ended without its blank line (None if nothing is left)."""
        buf, self._buf = self._buf, b""
        self._skip_lf = False
        if not buf.strip():
            return None
        return buf.lstrip(b"\n")
