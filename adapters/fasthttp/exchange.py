"""One request/response exchange on a pooled connection: its head, its body as it arrives, its one timer.

The response head and its Content-Length or chunked body are parsed in the connection's
`data_received`, and the connection goes back to the pool the moment the body's last byte
arrived. Timeouts are one loop timer per exchange that re-arms itself lazily, instead of a
timeout context per read.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from adapters.fasthttp.connection import Connection
from adapters.fasthttp.errors import (
    BadResponse,
    ConnectionClosed,
    HttpClientError,
    IncompleteBody,
    ResponseTimeout,
)
from adapters.fasthttp.wire import ChunkedDecoder, parse_head

_HIGH_WATER: Final = 1024 * 1024  # buffered stream bytes before reading pauses
_MAX_BODY: Final = 64 * 1024 * 1024  # a whole (non-streamed) body
_MAX_HEAD: Final = 64 * 1024
_EARLY: Final = 0.001  # loop timers may fire up to a clock tick early

_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _DONE, _FAILED = range(6)

_NO_HEADERS: Final[CIMultiDictProxy[str]] = CIMultiDictProxy(CIMultiDict())


class ExchangePool(Protocol):
    """What an exchange needs of its pool (`pool.ConnectionPool`): a name for messages, and
    somewhere to give the connection back."""

    origin: str

    def release(self, conn: Connection, reusable: bool) -> None: ...


class Response:
    """One request/response exchange: the head has arrived once `ConnectionPool.request` returns."""

    __slots__ = (
        "_buf",
        "_buffered",
        "_chunks",
        "_conn",
        "_decoder",
        "_exc",
        "_first_byte_at",
        "_got_bytes",
        "_idle_s",
        "_keep_alive",
        "_last_rx",
        "_left",
        "_loop",
        "_paused",
        "_pool",
        "_state",
        "_timer",
        "_total_at",
        "_waiter",
        "_whole",
        "headers",
        "status",
    )

    def __init__(
        self,
        pool: ExchangePool,
        conn: Connection,
        loop: asyncio.AbstractEventLoop,
        first_byte_at: float,
        idle_s: float,
        total_at: float,
    ) -> None:
        self._pool = pool
        self._conn: Connection | None = conn
        self._loop = loop
        self._state = _HEAD
        self._buf = b""
        self._got_bytes = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._left = 0
        self._decoder: ChunkedDecoder | None = None
        self._keep_alive = True
        self._exc: HttpClientError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._whole = False
        self._first_byte_at = first_byte_at
        self._idle_s = idle_s
        self._total_at = total_at
        self._last_rx = 0.0
        self._timer: asyncio.TimerHandle | None = loop.call_at(
            min(first_byte_at, total_at), self._on_timer
        )
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still be buffered here, unread)."""
        return self._state == _DONE

    # -- the consumer's side -------------------------------------------------------------

    async def wait_head(self) -> None:
        while self._state == _HEAD:
            await self._wait()
        if self._state == _FAILED and self.status == 0:
            assert self._exc is not None
            raise self._exc

    async def read(self) -> bytes:
        """The whole body."""
        self._whole = True
        if self._paused:
            self._resume()
        while self._state < _DONE:
            await self._wait()
        if self._state == _FAILED:
            assert self._exc is not None
            raise self._exc
        chunks = self._chunks
        if len(chunks) == 1:
            body = chunks.popleft()
        else:
            body = b"".join(chunks)
            chunks.clear()
        self._buffered = 0
        return body

    async def next_chunk(self) -> bytes:
        """The next piece of the body as it arrived; b"" at its end."""
        while True:
            chunks = self._chunks
            if chunks:
                chunk = chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < _HIGH_WATER // 4:
                    self._resume()
                return chunk
            if self._state == _DONE:
                return b""
            if self._state == _FAILED:
                assert self._exc is not None
                raise self._exc
            await self._wait()

    def shorten(self, seconds: float) -> None:
        """Bound the rest of this exchange to `seconds` from now."""
        at = self._loop.time() + seconds
        if at < self._total_at and self._state < _DONE:
            self._total_at = at
            self._rearm(at)

    def close(self) -> None:
        """Done with this answer: an unfinished exchange closes its socket (cancelling upstream)."""
        if self._state < _DONE:
            self._fail(IncompleteBody("closed by the caller before the body's end"))
        self._chunks.clear()
        self._buffered = 0

    async def _wait(self) -> None:
        fut = self._loop.create_future()
        self._waiter = fut
        try:
            await fut
        finally:
            self._waiter = None

    def _wake(self) -> None:
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- the connection's side -----------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._got_bytes = True
        state = self._state
        if state == _HEAD:
            data = self._head(data)
            if self._state in (_HEAD, _DONE, _FAILED):
                return
            self._body(data)
            if self._state < _DONE:
                # The body is still coming: its gaps are bounded by the idle timeout from now
                # on, not by the first-byte timeout the timer was set for.
                self._rearm(min(self._last_rx + self._idle_s, self._total_at))
            return
        self._body(data)

    def _body(self, data: bytes) -> None:
        if not data:
            return
        state = self._state
        if state == _LENGTH:
            left = self._left
            n = len(data)
            if n < left:
                self._left = left - n
                self._add(data)
            else:
                if n > left:
                    data = data[:left]
                    self._keep_alive = False  # bytes past the framed end: do not reuse
                self._add(data)
                self._finish()
        elif state == _CHUNKED:
            decoder = self._decoder
            assert decoder is not None
            try:
                pieces, ended = decoder.feed(data)
            except ValueError as exc:
                self._fail(BadResponse(f"{self._pool.origin} sent a broken chunked body: {exc}"))
                return
            for piece in pieces:
                self._add(piece)
            if ended:
                if decoder.extra:
                    self._keep_alive = False
                self._finish()
        elif state == _UNTIL_CLOSE:
            self._add(data)

    def _head(self, data: bytes) -> bytes:
        """Consume the head from `data`; return what follows it (the start of the body)."""
        buf = self._buf + data if self._buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self._fail(BadResponse(f"{self._pool.origin} sent an oversized response head"))
            else:
                self._buf = buf
            return b""
        self._buf = b""
        try:
            head = parse_head(buf[:end])
        except ValueError as exc:
            self._fail(BadResponse(f"{self._pool.origin} sent a bad response head: {exc}"))
            return b""
        rest = buf[end + 4 :]
        if head.status < 200:
            return self._head(rest) if rest else b""  # an interim answer (100 Continue): skip
        self.status = head.status
        self.headers = head.headers
        self._keep_alive = head.keep_alive
        self._last_rx = self._loop.time()
        length = head.length
        if head.chunked:
            self._state = _CHUNKED
            self._decoder = ChunkedDecoder()
        elif length is None:
            self._state = _UNTIL_CLOSE
            self._keep_alive = False
        elif length == 0:
            if rest:
                self._keep_alive = False
            self._finish()
            return b""
        elif length > _MAX_BODY:
            self._fail(BadResponse(f"{self._pool.origin} announced an oversized body"))
            return b""
        else:
            self._state = _LENGTH
            self._left = length
        self._wake()
        return rest

    def _add(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._last_rx = self._loop.time()
        if self._buffered > _HIGH_WATER:
            if self._whole:
                if self._buffered > _MAX_BODY:
                    self._fail(BadResponse(f"{self._pool.origin} sent an oversized body"))
                    return
            elif not self._paused and self._conn is not None and self._conn.transport:
                self._paused = True
                self._conn.transport.pause_reading()
        self._wake()

    def _resume(self) -> None:
        self._paused = False
        conn = self._conn
        if conn is not None and conn.transport is not None and self._state < _DONE:
            conn.transport.resume_reading()
            self._last_rx = self._loop.time()  # the pause was ours, not the upstream's silence

    def on_eof(self) -> None:
        state = self._state
        if state == _UNTIL_CLOSE:
            self._keep_alive = False
            self._finish()
        elif state == _HEAD:
            self._fail(
                ConnectionClosed(
                    f"{self._pool.origin} closed the connection before answering",
                    got_bytes=self._got_bytes,
                )
            )
        elif state < _DONE:
            self._fail(IncompleteBody(f"{self._pool.origin} closed the connection mid-body"))

    def _finish(self) -> None:
        self._state = _DONE
        self._cancel_timer()
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._paused and conn.transport is not None:
                # Paused by the byte that ended the body: the next exchange must hear its answer.
                self._paused = False
                conn.transport.resume_reading()
            self._pool.release(conn, self._keep_alive)
        self._wake()

    def _fail(self, exc: HttpClientError) -> None:
        if self._state >= _DONE:
            return
        self._state = _FAILED
        self._exc = exc
        self._cancel_timer()
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn, False)
        self._wake()

    # -- the one timer -------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _rearm(self, at: float) -> None:
        if self._timer is not None:
            if self._timer.when() <= at:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._loop.time()
        if self._state == _HEAD:
            due, what = self._first_byte_at, "no response head in time"
        elif self._paused:
            due, what = now + self._idle_s, ""
        else:
            due, what = self._last_rx + self._idle_s, "the body stalled past the idle timeout"
        if self._total_at <= due:
            due, what = self._total_at, "the exchange ran past its total deadline"
        if due - now <= _EARLY:
            self._fail(ResponseTimeout(f"{self._pool.origin}: {what}"))
        else:
            self._timer = self._loop.call_at(due, self._on_timer)
