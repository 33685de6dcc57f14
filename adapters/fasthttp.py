"""A lean HTTP/1.1 client for the hot path: keep-alive connection pools on asyncio Protocols.

One `ConnectionPool` per origin (plain http only). A request is one `transport.write`; the
response head and its Content-Length or chunked body are parsed in `data_received`, and the
connection goes back to the pool the moment the body's last byte arrived. Timeouts are one
loop timer per exchange that re-arms itself lazily, instead of a timeout context per read.

    HttpClientError
    ├── ConnectError        the TCP connect failed (refused, unreachable)
    ├── ResponseTimeout     connect, pool wait, first byte, idle gap or total deadline passed
    ├── ConnectionClosed    the server closed or reset before the response head was complete
    ├── IncompleteBody      the server closed or reset before the body's framed end
    ├── BadResponse         not HTTP/1.x, broken framing, oversized head or body
    └── BadRequestHeader    a header name or value would break the request framing

Messages name the origin, never a header value (the API key travels in one).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final, NamedTuple, cast

from multidict import CIMultiDict, CIMultiDictProxy

_HIGH_WATER: Final = 1024 * 1024  # buffered stream bytes before reading pauses
_MAX_BODY: Final = 64 * 1024 * 1024  # a whole (non-streamed) body
_MAX_HEAD: Final = 64 * 1024
_EARLY: Final = 0.001  # loop timers may fire up to a clock tick early

_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _DONE, _FAILED = range(6)


class HttpClientError(Exception):
    """A failure of this client; the message names the origin, never a header."""


class ConnectError(HttpClientError):
    pass


class ResponseTimeout(HttpClientError):
    pass


class ConnectionClosed(HttpClientError):
    """Closed before the head; `got_bytes` says whether any response byte had arrived."""

    def __init__(self, message: str, *, got_bytes: bool) -> None:
        super().__init__(message)
        self.got_bytes = got_bytes


class IncompleteBody(HttpClientError):
    pass


class BadResponse(HttpClientError):
    pass


class BadRequestHeader(HttpClientError):
    pass


class _Conn(asyncio.Protocol):
    """One TCP connection; forwards bytes to the exchange running on it, if any."""

    __slots__ = ("alive", "counted", "exchange", "idle_since", "pool", "transport", "uses")

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: Response | None = None
        self.alive = True
        self.counted = True  # holds one of the pool's slots
        self.idle_since = 0.0
        self.uses = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but have the same methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is not None:
            ex.feed(data)
        else:
            self.shut()  # bytes nobody asked for: this connection cannot be trusted again

    def eof_received(self) -> bool:
        ex = self.exchange
        if ex is not None:
            ex.on_eof()
        self.alive = False
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        ex = self.exchange
        if ex is not None:
            ex.on_eof()
        self.pool.forget(self)

    def usable(self) -> bool:
        return self.alive and self.transport is not None and not self.transport.is_closing()

    def shut(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.abort()


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
        pool: ConnectionPool,
        conn: _Conn,
        loop: asyncio.AbstractEventLoop,
        first_byte_at: float,
        idle_s: float,
        total_at: float,
    ) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
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


class Head(NamedTuple):
    """A parsed response head and how its body is framed."""

    status: int
    headers: CIMultiDictProxy[str]
    keep_alive: bool
    length: int | None  # None: chunked, or until the connection closes
    chunked: bool


def parse_head(raw: bytes) -> Head:
    """Parse a status line and header lines (CRLF-separated, without the blank line)."""
    text = raw.decode("latin-1")
    lines = text.split("\r\n")
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise ValueError("a bare CR or LF in the head")
    line = lines[0]
    code = line[9:12]
    if (
        not line.startswith("HTTP/1.")
        or len(line) < 12
        or line[8] != " "
        or (len(line) > 12 and line[12] != " ")
        or not (code.isascii() and code.isdigit())
    ):
        raise ValueError("not an HTTP/1.x status line")
    status = int(code)
    if status == 101:
        raise ValueError("an unasked-for protocol switch")
    items = []
    for h in lines[1:]:
        name, sep, value = h.partition(":")
        if not sep or not name or name[0] in " \t" or name[-1] in " \t":
            raise ValueError("a malformed header line")
        items.append((name, value.strip(" \t")))
    headers = CIMultiDictProxy(CIMultiDict(items))
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if line[7] == "1" else "keep-alive" in connection
    if status < 200 or status in (204, 304):
        return Head(status, headers, keep_alive, 0, False)
    te = headers.get("transfer-encoding")
    if te is not None:
        if te.lower().rsplit(",", 1)[-1].strip(" \t") != "chunked":
            raise ValueError("a transfer-encoding other than chunked")
        # Both framings at once is how responses get smuggled: use chunked, never reuse.
        return Head(status, headers, keep_alive and "content-length" not in headers, None, True)
    lengths = headers.getall("content-length", None)
    if lengths is None:
        return Head(status, headers, False, None, False)
    values = {v.strip(" \t") for v in lengths}
    value = values.pop()
    if values or not (value.isascii() and value.isdigit()):
        raise ValueError("a bad content-length")
    return Head(status, headers, keep_alive, int(value), False)


class ChunkedDecoder:
    """Incremental decoder of a chunked body; `extra` is set when bytes follow its end."""

    __slots__ = ("_buf", "_left", "extra")

    _SIZE, _CRLF, _TRAILER = 0, -1, -2

    def __init__(self) -> None:
        self._buf = b""
        self._left = self._SIZE  # > 0: bytes left in the current chunk
        self.extra = False

    def feed(self, data: bytes) -> tuple[list[bytes], bool]:
        """The body pieces in `data`, and whether the body ended."""
        buf = self._buf + data if self._buf else data
        pos, n = 0, len(buf)
        out: list[bytes] = []
        left = self._left
        ended = False
        while pos < n:
            if left > 0:
                take = min(left, n - pos)
                out.append(buf[pos : pos + take] if take < n or pos else buf)
                pos += take
                left -= take
                if left == 0:
                    left = self._CRLF
            elif left == self._CRLF:
                if n - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ValueError("no CRLF after a chunk")
                pos += 2
                left = self._SIZE
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > 4096:
                        raise ValueError("an oversized chunk-size or trailer line")
                    break
                line = buf[pos:eol]
                pos = eol + 2
                if left == self._TRAILER:
                    if not line:
                        ended = True
                        break
                    continue
                size = line.split(b";", 1)[0].strip(b" \t")
                if not size or len(size) > 15 or size.lstrip(b"0123456789abcdefABCDEF"):
                    raise ValueError("a bad chunk size")
                left = int(size, 16) or self._TRAILER
        self._left = left
        self._buf = buf[pos:] if pos < n and not ended else b""
        self.extra = ended and pos < n
        return out, ended


_NO_HEADERS: Final[CIMultiDictProxy[str]] = CIMultiDictProxy(CIMultiDict())


class ConnectionPool:
    """Keep-alive connections to one http origin, at most `limit` open (or opening) at once."""

    def __init__(
        self, host: str, port: int, *, limit: int = 256, keepalive_s: float = 15.0
    ) -> None:
        self.host = host
        self.port = port
        self.origin = f"{host}:{port}"
        self.limit = limit
        self.keepalive_s = keepalive_s
        self._idle: list[_Conn] = []  # a stack: the warmest connection is reused first
        self._count = 0
        self._waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def size(self) -> int:
        """Connections open or opening."""
        return self._count

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def request(
        self,
        data: bytes,
        *,
        connect_s: float,
        first_byte_s: float,
        idle_s: float,
        total_s: float,
    ) -> Response:
        """Send one serialized request; return once the response head arrived.

        A reused connection that the server closed before answering anything (the keep-alive
        race) is retried once on a fresh connection: the server never saw the request.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        first_byte_at = start + first_byte_s
        total_at = start + total_s
        for retry in (False, True):
            conn = await self._acquire(loop, connect_s, min(first_byte_at, total_at), fresh=retry)
            reused = conn.uses > 0
            conn.uses += 1
            resp = Response(self, conn, loop, first_byte_at, idle_s, total_at)
            conn.exchange = resp
            assert conn.transport is not None
            conn.transport.write(data)
            try:
                await resp.wait_head()
            except ConnectionClosed as exc:
                if reused and not exc.got_bytes and not retry:
                    continue
                raise
            except BaseException:
                resp.close()  # cancelled: closing the socket cancels the upstream request
                raise
            return resp
        raise AssertionError("unreachable")

    async def _acquire(
        self, loop: asyncio.AbstractEventLoop, connect_s: float, until: float, *, fresh: bool
    ) -> _Conn:
        while True:
            if self._closed:
                raise ConnectError(f"the pool for {self.origin} is closed")
            idle = self._idle
            while idle and not fresh:
                conn = idle.pop()
                if conn.usable():
                    return conn
                conn.shut()
                self._drop(conn)
            if self._count < self.limit:
                return await self._connect(loop, min(connect_s, until - loop.time()))
            if fresh and idle:
                self._discard_idle(idle[0])  # make room for the retry's fresh connection
                continue
            got = await self._wait_slot(loop, until)
            if got is not None and got.usable():
                return got  # just released after a whole answer: as good as fresh
            if got is not None:  # it died on the way
                got.shut()
                self._drop(got)

    async def _wait_slot(self, loop: asyncio.AbstractEventLoop, until: float) -> _Conn | None:
        fut: asyncio.Future[_Conn | None] = loop.create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout_at(until):
                return await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                # Handed a connection or a slot just as we gave up: pass it on.
                got = fut.result()
                if got is not None:
                    self.release(got, True)
                else:
                    self._wake_one(None)
            else:
                fut.cancel()
            if isinstance(exc, TimeoutError):
                raise ResponseTimeout(f"no connection to {self.origin} came free in time") from None
            raise

    async def _connect(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> _Conn:
        self._count += 1
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                _, proto = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except TimeoutError:
            self._slot_freed()
            raise ResponseTimeout(f"connecting to {self.origin} timed out") from None
        except OSError as exc:
            self._slot_freed()
            raise ConnectError(f"cannot connect to {self.origin}: {exc.strerror or exc}") from None
        except BaseException:
            self._slot_freed()
            raise
        return proto

    def release(self, conn: _Conn, reusable: bool) -> None:
        """Take back a connection whose exchange ended; reuse it only if its answer was whole."""
        conn.exchange = None
        if not reusable or self._closed or not conn.alive:
            conn.shut()
            self._drop(conn)
            return
        if self._wake_one(conn):
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.keepalive_s, self._sweep)
        self._idle.append(conn)

    def forget(self, conn: _Conn) -> None:
        """The connection closed (from either side)."""
        if conn in self._idle:
            self._idle.remove(conn)
        self._drop(conn)

    def close(self) -> None:
        """Close every idle connection; busy ones close when their exchange ends."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.shut()
            self._drop(conn)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def _sweep(self) -> None:
        """Close connections idle for longer than the keep-alive (oldest sit at the bottom)."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        horizon = loop.time() - self.keepalive_s
        while self._idle and self._idle[0].idle_since <= horizon:
            self._discard_idle(self._idle[0])
        if self._idle:
            at = self._idle[0].idle_since + self.keepalive_s
            self._sweeper = loop.call_at(at, self._sweep)

    def _discard_idle(self, conn: _Conn) -> None:
        self._idle.remove(conn)
        conn.shut()
        self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        if conn.counted:
            conn.counted = False
            self._slot_freed()

    def _slot_freed(self) -> None:
        self._count -= 1
        self._wake_one(None)

    def _wake_one(self, conn: _Conn | None) -> bool:
        """Hand `conn` (or a free slot, for None) to the first live waiter."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False
