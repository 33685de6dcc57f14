"""`ConnectionPool`: keep-alive connections to one http origin, at most `limit` open at once."""

from __future__ import annotations

import asyncio
from collections import deque

from adapters.fasthttp.connection import Connection
from adapters.fasthttp.errors import ConnectError, ConnectionClosed, ResponseTimeout
from adapters.fasthttp.exchange import Response


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
        self._idle: list[Connection] = []  # a stack: the warmest connection is reused first
        self._count = 0
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
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
    ) -> Connection:
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

    async def _wait_slot(self, loop: asyncio.AbstractEventLoop, until: float) -> Connection | None:
        fut: asyncio.Future[Connection | None] = loop.create_future()
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

    async def _connect(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> Connection:
        self._count += 1
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                _, proto = await loop.create_connection(
                    lambda: Connection(self), self.host, self.port
                )
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

    def release(self, conn: Connection, reusable: bool) -> None:
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

    def forget(self, conn: Connection) -> None:
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

    def _discard_idle(self, conn: Connection) -> None:
        self._idle.remove(conn)
        conn.shut()
        self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        if conn.counted:
            conn.counted = False
            self._slot_freed()

    def _slot_freed(self) -> None:
        self._count -= 1
        self._wake_one(None)

    def _wake_one(self, conn: Connection | None) -> bool:
        """Hand `conn` (or a free slot, for None) to the first live waiter."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False
