"""A minimal pipelined RESP2 client for the admission hot path: one connection, many scripts in flight.

redis-py spends ~150 us of CPU per command in Python; admission runs two scripts
per request. This client writes each command straight to one connection and
matches replies to callers in order (Redis answers in order), so concurrent
requests share the connection without a pool or locks. It speaks only what the
limit scripts need (EVALSHA, SCRIPT LOAD, AUTH, SELECT) and raises redis-py's
exception classes, so `REDIS_DOWN` covers it. Everything else stays on redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.exceptions as rexc

# A slow reader must not let the transport buffer grow without bound.
_HIGH_WATER = 1 << 20


def encode(args: tuple[bytes | str | int | float, ...]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


async def read_reply(reader: asyncio.StreamReader) -> Any:
    """One RESP2 reply; an error reply is returned as a ResponseError instance."""
    line = await reader.readuntil(b"\r\n")
    kind, body = line[:1], line[1:-2]
    if kind == b":":
        return int(body)
    if kind == b"$":
        n = int(body)
        if n < 0:
            return None
        return (await reader.readexactly(n + 2))[:-2]
    if kind == b"*":
        n = int(body)
        if n < 0:
            return None
        return [await read_reply(reader) for _ in range(n)]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        return rexc.ResponseError(body.decode(errors="replace"))
    raise rexc.ConnectionError(f"unexpected reply from redis: {line[:40]!r}")


class _Conn:
    """One open connection and the callers waiting for its replies, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.dead: BaseException | None = None
        self._out: list[bytes] = []
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                reply = await read_reply(self.reader)
                fut = self.waiting.popleft()
                if not fut.done():
                    if isinstance(reply, rexc.ResponseError):
                        fut.set_exception(reply)
                    else:
                        fut.set_result(reply)
        except (OSError, EOFError, asyncio.IncompleteReadError, rexc.ConnectionError) as exc:
            self.kill(rexc.ConnectionError(f"redis connection lost: {exc}"))
        except IndexError:
            self.kill(rexc.ConnectionError("redis sent a reply nobody asked for"))

    def kill(self, exc: BaseException) -> None:
        if self.dead is None:
            self.dead = exc
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)
        self.writer.close()

    def send(self, args: tuple[bytes | str | int | float, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self.waiting.append(fut)
        if not self._out:
            # Commands sent in the same loop iteration leave in one write (one syscall).
            loop.call_soon(self._flush)
        self._out.append(encode(args))
        return fut

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.dead is None and out:
            self.writer.write(b"".join(out))


class RespClient:
    """Pipelined scripts over one connection to `redis://[:password@]host[:port][/db]`."""

    def __init__(self, url: str, password: str | None, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError("the fast client speaks plain redis:// only")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.db = int(parts.path.strip("/") or 0)
        self.username = unquote(parts.username) if parts.username else None
        self.password = password or (unquote(parts.password) if parts.password else None)
        self.timeout_s = timeout_s
        self._conn: _Conn | None = None
        self._opening: asyncio.Lock | None = None
        self._scripts: dict[bytes, bytes] = {}  # sha -> source

    async def evalsha(self, sha: str, source: str, keys: list[str], args: list[str]) -> Any:
        """Run a script by its SHA1, loading it first when Redis does not know it."""
        cmd: tuple[bytes | str | int | float, ...] = (b"EVALSHA", sha, len(keys), *keys, *args)
        try:
            return await self.call(cmd)
        except rexc.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # Not run: Redis refused before executing, so loading and retrying is safe.
        await self.call((b"SCRIPT", b"LOAD", source))
        return await self.call(cmd)

    async def call(self, cmd: tuple[bytes | str | int | float, ...]) -> Any:
        conn = await self._connection()
        fut = conn.send(cmd)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.timeout_s, self._expire, conn, fut)
        try:
            if conn.writer.transport.get_write_buffer_size() > _HIGH_WATER:
                await conn.writer.drain()
            return await fut
        finally:
            timer.cancel()

    def _expire(self, conn: _Conn, fut: asyncio.Future[Any]) -> None:
        if not fut.done():
            # Replies are matched by order: after a lost one the connection is unusable.
            fut.set_exception(rexc.TimeoutError("redis did not answer in time"))
            conn.kill(rexc.TimeoutError("redis connection dropped after a timeout"))

    async def _connection(self) -> _Conn:
        conn = self._conn
        if conn is not None and conn.dead is None:
            return conn
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            conn = self._conn
            if conn is not None and conn.dead is None:
                return conn
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.timeout_s
                )
            except (OSError, TimeoutError) as exc:
                raise rexc.ConnectionError(f"cannot connect to redis: {exc}") from exc
            conn = _Conn(reader, writer)
            setup: list[asyncio.Future[Any]] = []
            if self.password is not None:
                auth = (self.username, self.password) if self.username else (self.password,)
                setup.append(conn.send((b"AUTH", *auth)))
            if self.db:
                setup.append(conn.send((b"SELECT", self.db)))
            try:
                for fut in setup:
                    await asyncio.wait_for(fut, self.timeout_s)
            except rexc.ResponseError as exc:
                conn.kill(rexc.ConnectionError(str(exc)))
                raise rexc.AuthenticationError(str(exc)) from exc
            except TimeoutError as exc:
                conn.kill(rexc.TimeoutError("redis setup timed out"))
                raise rexc.TimeoutError("redis setup timed out") from exc
            self._conn = conn
            return conn

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.kill(rexc.ConnectionError("client closed"))
            conn.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({conn.task}, timeout=1.0)
