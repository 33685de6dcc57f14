"""Raw HTTP/1.1 client of the load generator: keep-alive connections as asyncio Protocols.

Request bytes are precomputed (one head per tenant, one Content-Length + body per body), so a
request costs one `transport.write`; responses are framed by Content-Length or chunked
encoding and handed, de-chunked, to a `ResponseReader`. Measured against the aiohttp client
on the same machine it costs about a third of the CPU per request.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import cast

from loadtest.wire import ResponseReader, Target

_perf = time.perf_counter


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection running one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.alive = True
        self.used = False
        self._reader: ResponseReader | None = None
        self._fut: asyncio.Future[bool] | None = None
        self._got_bytes = False
        self._buf = b""
        self._state = 0  # 0 head, 1 content-length body, 2 chunked body, 3 body until close
        self._left = 0
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but have the same methods.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes, reader: ResponseReader, fut: asyncio.Future[bool]) -> None:
        """Write one request; `fut` resolves True when done, False if it may be retried."""
        self._reader, self._fut = reader, fut
        self._got_bytes = False
        self._buf = b""
        self._state = 0
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:
            return  # bytes after a completed response: nothing is pipelined, ignore
        self._got_bytes = True
        now = _perf()
        if self._state == 0:
            data = self._buf + data if self._buf else data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buf = data
                return
            self._buf = b""
            if not self._head(data[: end + 2], reader):
                return
            data = data[end + 4 :]
            if not data and not (self._state == 1 and self._left == 0):
                return
        if self._state == 1:
            take = data[: self._left]
            self._left -= len(take)
            if take:
                reader.body(take, now)
            if self._left <= 0:
                self._complete(now)
        elif self._state == 2:
            self._chunked(data, reader, now)
        elif data:
            reader.body(data, now)

    def _head(self, head: bytes, reader: ResponseReader) -> bool:
        try:
            status = int(head[9:12])
        except ValueError:
            self._abort("protocol_error")
            return False
        low = head.lower()
        ctype = _header(low, b"content-type") or b""
        backend = _header(head, b"x-neogate-backend", low)
        reader.headers(status, ctype, backend.decode("latin-1") if backend is not None else None)
        self._close_after = (_header(low, b"connection") or b"") == b"close"
        te = _header(low, b"transfer-encoding")
        cl = _header(low, b"content-length")
        if te is not None and b"chunked" in te:
            self._state, self._left = 2, -1
        elif cl is not None:
            self._state, self._left = 1, int(cl)
        else:
            self._state, self._close_after = 3, True
        return True

    def _chunked(self, data: bytes, reader: ResponseReader, now: float) -> None:
        buf = self._buf + data if self._buf else data
        pos, n = 0, len(buf)
        out: list[bytes] = []
        while True:
            if self._left > 0:
                take = min(self._left, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                if self._left:
                    break
                self._left = -2  # expect the CRLF closing the chunk
            if self._left == -2:
                if n - pos < 2:
                    break
                pos += 2
                self._left = -1
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            try:
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
            except ValueError:
                self._abort("protocol_error")
                return
            if size == 0:
                # Last chunk: the body ends at the first empty line after it (trailers allowed).
                end = buf.find(b"\r\n\r\n", eol)
                if end < 0:
                    break  # keep "0\r\n..." buffered until the final CRLF arrives
                if out:
                    reader.body(b"".join(out), now)
                self._complete(now)
                return
            pos = eol + 2
            self._left = size
        self._buf = buf[pos:]
        if out:
            reader.body(out[0] if len(out) == 1 else b"".join(out), now)

    def _complete(self, now: float) -> None:
        reader, fut = self._reader, self._fut
        self._reader = self._fut = None
        self._buf = b""
        if reader is not None:
            reader.finish(now)
        if self._close_after:
            self.alive = False
            if self.transport is not None:
                self.transport.close()
        if fut is not None and not fut.done():
            fut.set_result(True)

    def _abort(self, error: str) -> None:
        reader, fut = self._reader, self._fut
        self._reader = self._fut = None
        self.alive = False
        if self.transport is not None:
            self.transport.abort()
        if reader is not None:
            reader.fail(error, _perf())
        if fut is not None and not fut.done():
            fut.set_result(True)

    def timeout(self) -> None:
        """The request's deadline passed."""
        self._abort("timeout")

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        reader, fut = self._reader, self._fut
        if reader is None or fut is None or fut.done():
            return
        if self._state == 3:
            self._reader = self._fut = None
            reader.finish(_perf())
            fut.set_result(True)
        elif self.used and not self._got_bytes:
            # A reused keep-alive connection the server had already closed: safe to resend.
            self._reader = self._fut = None
            fut.set_result(False)
        else:
            self._reader = self._fut = None
            reader.fail("disconnected", _perf())
            fut.set_result(True)


def _header(block: bytes, name: bytes, low: bytes | None = None) -> bytes | None:
    """Value of header `name` (lowercase) in a header block; `low` is the block lowercased."""
    search = low if low is not None else block
    i = search.find(b"\r\n" + name + b":")
    if i < 0:
        return None
    i += len(name) + 3
    j = search.find(b"\r\n", i)
    return block[i : j if j >= 0 else len(block)].strip()


class RawClient:
    """HTTP/1.1 over asyncio Protocols with a keep-alive pool; precomputed request bytes."""

    def __init__(
        self, target: Target, heads: list[bytes], bodies: list[bytes], limit: int, timeout: float
    ) -> None:
        self._target = target
        # One request head per tenant, one "Content-Length + body" tail per body.
        self._heads = heads
        self._tails = [b"Content-Length: %d\r\n\r\n%s" % (len(b), b) for b in bodies]
        self._limit = max(1, limit)
        self._timeout = timeout
        self._idle: list[_Conn] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self._all: set[_Conn] = set()

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Conn, self._target.host, self._target.port)
        self._all.add(conn)
        return conn

    async def _acquire(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if conn.alive:
                return conn
            self._drop(conn)
        if self._open < self._limit:
            self._open += 1
            try:
                return await self._connect()
            except BaseException:
                self._open -= 1
                self._wake_one()
                raise
        fut: asyncio.Future[_Conn | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        conn_or_none = await fut
        return conn_or_none if conn_or_none is not None else await self._acquire()

    def _drop(self, conn: _Conn) -> None:
        self._all.discard(conn)
        self._open -= 1

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def _release(self, conn: _Conn) -> None:
        if not conn.alive:
            self._drop(conn)
            self._wake_one()
            return
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(conn)
                return
        self._idle.append(conn)

    async def request(self, i: int, k: int, reader: ResponseReader) -> None:
        """Send body `i` as tenant `k`; errors end up in the reader's record."""
        data = self._heads[k] + self._tails[i]
        loop = asyncio.get_running_loop()
        deadline = reader.scheduled + self._timeout
        for _ in range(2):
            try:
                conn = await self._acquire()
            except OSError:
                reader.fail("connect_error", _perf())
                return
            fut: asyncio.Future[bool] = loop.create_future()
            conn.send(data, reader, fut)
            timer = loop.call_at(_loop_time_for(loop, deadline), conn.timeout)
            try:
                finished = await fut
            except asyncio.CancelledError:
                conn.timeout()
                self._release(conn)
                raise
            finally:
                timer.cancel()
            conn.used = True
            self._release(conn)
            if finished:
                return
        reader.fail("disconnected", _perf())

    async def close(self) -> None:
        """Close every connection."""
        for conn in list(self._all):
            if conn.transport is not None:
                conn.transport.close()
        self._all.clear()
        self._idle.clear()


def _loop_time_for(loop: asyncio.AbstractEventLoop, perf_deadline: float) -> float:
    # The loop has its own clock; convert an absolute perf_counter deadline to it.
    return loop.time() + max(0.0, perf_deadline - _perf())


def request_head(target: Target, key: str | None, extra: dict[str, str] | None = None) -> bytes:
    """Request line and headers up to (not including) Content-Length."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    lines = [
        f"POST {target.path} HTTP/1.1",
        f"Host: {host}:{target.port}",
        "Content-Type: application/json",
        "Accept: application/json, text/event-stream",
        "User-Agent: neogate-loadtest",
    ]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    for name, value in (extra or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")
