"""neogate's own HTTP/1.1 edge for the inference endpoints; every other connection goes to aiohttp.

Why: aiohttp's server side (its Request and Response objects, router,
middleware, keep-alive timer) costs ~38 us per request on a 2-core machine
against ~9 us for a bare asyncio protocol: a tenth of the gateway's whole CPU
per request. So the inference requests, nearly all the traffic, take a short
road, and aiohttp keeps everything else.

Heads are read by `gateway.http.edge_head` (llhttp, through httptools, in its strict
mode), which says whether the edge serves one itself: a strict, common subset
of HTTP/1.1 `POST`s to the three inference paths. (A `Content-Encoding` is
refused with 415 by the request path before the body is read, on both roads.)
Anything else, at any request boundary, and anything llhttp refuses, hands the
connection, with every byte not yet answered, to aiohttp's own protocol, which
serves it from then on: malformed and unusual requests meet aiohttp's parser
(llhttp too) and its answer, other paths meet their aiohttp routes, and an
inference request that aiohttp reads is served by the same request path
(`gateway.flow.proxy`). The listening socket and what its connections share are in
`gateway.http.edge_site`.

Time limits (`gateway.http.conn_deadlines`, `listen.*`): the site's one sweeper
cuts a head not whole within `head_timeout_s` and closes connections idle
past `keepalive_s`; a body not whole within `body_timeout_s` of its head is a
408; a connection handed to aiohttp keeps its head deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import Final, Protocol, cast

from gateway.errors import GatewayError, RequestTimeout
from gateway.flow.proxy import serve_request
from gateway.http.conn_deadlines import ConnectionLimits, RequestDeadlines
from gateway.http.edge_head import HandOver, HeadReader
from gateway.http.exchange import too_large
from gateway.http.inbound import PATHS, Endpoint
from gateway.runtime import RequestIds, RuntimeRef

log = logging.getLogger("neogate")

_PIPELINE_PAUSE: Final = 1 << 20  # stop reading while this much waits behind a request
# After an answer sent before its body was read (413, 415, 401...): half-close, drop what
# the client still sends for this long, then close (closing at once could reset the
# connection before the client has read the answer).
_LINGER_S: Final = 2.0


class EdgeHost(Protocol):
    """What a connection needs from its listening socket (`gateway.http.edge_site.Edge`)."""

    ref: RuntimeRef
    ids: RequestIds
    fallback: Callable[[], asyncio.BaseProtocol]
    limits: ConnectionLimits
    connections: set[EdgeConnection]
    busy: int
    closing: bool

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]: ...

    def status_line(self, status: int) -> bytes: ...

    def tail(self) -> bytes: ...

    def request_done(self) -> None: ...


class EdgeConnection(asyncio.Protocol):
    """One client connection while the edge serves it."""

    __slots__ = (
        "_body",
        "_body_deadline",
        "_body_waiter",
        "_buf",
        "_discarding",
        "_drain",
        "_edge",
        "_head",
        "_need",
        "_read_paused",
        "_write_paused",
        "busy",
        "current",
        "head_since",
        "last_active",
        "task",
        "transport",
    )

    def __init__(self, edge: EdgeHost) -> None:
        self._edge = edge
        self._buf = b""
        self._body = bytearray()
        self._need = 0  # body bytes of the current request still to come
        self._body_waiter: asyncio.Future[bytes] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._read_paused = False
        self._write_paused = False
        self.busy = False
        self.current: EdgeExchange | None = None
        self.task: asyncio.Task[None] | None = None
        self.last_active = time.monotonic()
        # When the head in progress began (None: no request under way); the first
        # request's head runs from the connection's opening.
        self.head_since: float | None = self.last_active
        self._body_deadline = 0.0
        self._discarding = False
        self.transport: asyncio.Transport | None = None
        self._head = HeadReader()  # the head in progress, from the first byte of `_buf`

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # not fatal: only latency of small writes
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._edge.connections.add(self)

    def data_received(self, data: bytes) -> None:
        now = self.last_active = time.monotonic()
        if self._discarding:
            return
        if self.head_since is None and not self.busy and not self._need:
            self.head_since = now
        if self._need:
            data = self._take_body(data)
            if not data:
                return
        if self.busy:  # pipelined: the next request waits for this answer
            self._buf += data
            if len(self._buf) > _PIPELINE_PAUSE and not self._read_paused:
                self._read_paused = True
                assert self.transport is not None
                self.transport.pause_reading()
            return
        self._buf = self._buf + data if self._buf else data
        self._next_request()

    def eof_received(self) -> bool | None:
        return None  # the transport closes; a request in flight is cancelled, as aiohttp does

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._edge.connections.discard(self)
        task = self.task
        if task is not None and not task.done():
            task.cancel()  # the client left: the request path meters what was sent

    # -- requests --

    def _next_request(self) -> None:
        """Read on in the head in progress; serve it when it is whole and the edge's."""
        buf = self._buf
        try:
            head = self._head.feed(buf)
        except HandOver:
            self._hand_over()
            return
        if head is None:
            return
        self.head_since = None
        self._body_deadline = time.monotonic() + self._edge.limits.body_timeout_s
        ex = EdgeExchange(self, self._edge.ids.next(), head.headers, head.length, head.keep_alive)
        start, length = head.end, head.length
        if len(buf) - start >= length:
            ex.body = buf[start : start + length]
            self._buf = buf[start + length :]
        else:
            self._body = bytearray(buf[start:])
            self._need = length - len(self._body)
            self._buf = b""
        self.busy = True
        self.current = ex
        self._edge.busy += 1
        task = self.task = asyncio.get_running_loop().create_task(self._serve(ex, head.endpoint))
        # A callback, not a `finally`: a task cancelled before its first step never runs one.
        task.add_done_callback(self._served)

    def _take_body(self, data: bytes) -> bytes:
        """Add to the body in progress; return what follows it."""
        need = self._need
        if len(data) < need:
            self._body += data
            self._need = need - len(data)
            return b""
        self._body += data[:need]
        self._need = 0
        body = bytes(self._body)
        self._body = bytearray()
        ex = self.current
        if ex is not None:
            ex.body = body
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(body)
        return data[need:]

    async def wait_body(self) -> bytes:
        """The rest of the body, or RequestTimeout when it is not whole by its deadline."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes] = loop.create_future()
        self._body_waiter = waiter
        deadline = loop.time() + (self._body_deadline - time.monotonic())
        try:
            async with asyncio.timeout_at(deadline):
                return await waiter
        except TimeoutError:
            raise RequestTimeout(
                "the request body did not arrive in time", should_retry=False
            ) from None
        finally:
            self._body_waiter = None

    async def _serve(self, ex: EdgeExchange, endpoint: Endpoint) -> None:
        try:
            await serve_request(self._edge.ref.current, ex, endpoint)
        except GatewayError as exc:
            self._fail(ex, exc)
        except Exception:
            # A bug of ours: logged with its traceback, answered as an OpenAI 500, never a crash.
            log.exception("unhandled error in POST /v1%s (request %s)", PATHS[endpoint], ex.rid)
            self._fail(ex, GatewayError("internal error in the gateway"))

    def _served(self, task: asyncio.Task[None]) -> None:
        ex = self.current
        assert ex is not None and task is self.task
        self._finished(ex)

    def _fail(self, ex: EdgeExchange, exc: GatewayError) -> None:
        if ex.head_sent:
            self.abort()  # a stream already under way cannot become an error response
            return
        self.send_whole(ex, exc.http_status(), exc.response_headers(ex.rid), exc.body())

    def _finished(self, ex: EdgeExchange) -> None:
        self.task = None
        self.current = None
        self.busy = False
        self.last_active = time.monotonic()
        self._edge.request_done()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if ex.close_after or not ex.complete or self._need or self._edge.closing:
            unread = self._need > 0
            self._need = 0
            self._body = bytearray()
            self._buf = b""
            if unread and ex.complete and not self._edge.closing:
                self._linger(transport)
            else:
                transport.close()
            return
        self.head_since = time.monotonic() if self._buf else None
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        if self._buf:
            self._next_request()

    def _linger(self, transport: asyncio.Transport) -> None:
        """The answer went out before the body was read: end our side, drop the rest, close."""
        self._discarding = True
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(_LINGER_S, transport.close)

    def _hand_over(self) -> None:
        """Give the connection and every byte not yet answered to aiohttp's protocol."""
        transport = self.transport
        assert transport is not None
        self._edge.connections.discard(self)
        self.transport = None
        edge = self._edge
        loop_now = asyncio.get_running_loop().time()
        since = self.head_since if self.head_since is not None else time.monotonic()
        deadline = loop_now + edge.limits.head_timeout_s - (time.monotonic() - since)
        # aiohttp has no head or body deadline of its own: the guard keeps ours.
        proto = RequestDeadlines(edge.fallback(), edge.limits, head_deadline=deadline, log=edge.log)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        buf, self._buf = self._buf, b""
        if buf:
            cast(asyncio.Protocol, proto).data_received(buf)

    # -- writing (used by EdgeExchange) --

    def head(self, ex: EdgeExchange, status: int, headers: dict[str, str], framing: str) -> bytes:
        """Status line and headers up to the blank line; `framing` is the length or chunked line."""
        ex.close_after = not ex.keep_alive or self._edge.closing or self._need > 0
        lines = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
        if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
            raise ValueError("a response header holds a line break")
        if ex.close_after:
            framing += "Connection: close\r\n"
        edge = self._edge
        return edge.status_line(status) + (lines + framing).encode() + edge.tail()

    def send_whole(
        self, ex: EdgeExchange, status: int, headers: dict[str, str], body: bytes
    ) -> None:
        transport = self.transport
        head = self.head(ex, status, headers, f"Content-Length: {len(body)}\r\n")
        ex.head_sent = ex.complete = True
        if transport is not None and not transport.is_closing():
            transport.write(head + body)

    async def drained(self) -> None:
        if not self._write_paused:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain = waiter
        try:
            await waiter
        finally:
            self._drain = None

    def open_transport(self) -> asyncio.Transport:
        """The transport to write to; ConnectionResetError once the client is gone."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        return transport

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class EdgeExchange:
    """One request the edge read: the `ClientExchange` of `gateway.flow.proxy`."""

    __slots__ = (
        "_conn",
        "body",
        "close_after",
        "complete",
        "head_sent",
        "headers",
        "keep_alive",
        "length",
        "rid",
    )

    def __init__(
        self,
        conn: EdgeConnection,
        rid: str,
        headers: Mapping[str, str],
        length: int,
        keep_alive: bool,
    ) -> None:
        self._conn = conn
        self.rid = rid
        self.headers = headers
        self.length = length
        self.keep_alive = keep_alive
        self.body: bytes | None = None
        self.head_sent = False
        self.complete = False  # the answer was framed to its end
        self.close_after = False

    async def read_body(self, cap: int) -> bytes:
        if self.length > cap:
            raise too_large(self.length, cap)
        body = self.body
        if body is None:
            body = self.body = await self._conn.wait_body()
        return body

    async def send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self._conn.send_whole(self, status, headers, body)

    async def open_stream(self, status: int, headers: dict[str, str], buffer_bytes: int) -> None:
        conn = self._conn
        head = conn.head(self, status, headers, "Transfer-Encoding: chunked\r\n")
        self.head_sent = True
        transport = conn.open_transport()
        transport.set_write_buffer_limits(high=buffer_bytes)
        transport.write(head)

    async def write(self, data: bytes) -> None:
        conn = self._conn
        transport = conn.open_transport()
        if data:
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            await conn.drained()

    async def write_eof(self) -> None:
        transport = self._conn.open_transport()
        transport.write(b"0\r\n\r\n")
        self.complete = True

    def abort(self) -> None:
        self._conn.abort()
