"""The client side of one inference request, whichever HTTP server carries it.

The request path (`gateway.flow.proxy`) reads the body and writes the answer
through this small Protocol, so the same code serves a connection held by
neogate's own HTTP/1.1 edge (`gateway.http.edge`) and one handed to aiohttp.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Final, Protocol

from aiohttp import web
from multidict import MultiMapping

from gateway.errors import PayloadTooLarge, UnsupportedMediaType

# The request id the aiohttp road's middleware gives each request (the edge numbers its own).
REQUEST_ID: Final = web.RequestKey("request_id", str)


class ClientExchange(Protocol):
    """One client request and its answer: a whole body, or a stream of writes."""

    rid: str
    headers: Mapping[str, str]  # case-insensitive

    async def read_body(self, cap: int) -> bytes:
        """The body, refused (PayloadTooLarge) before it is read whole when it is over `cap`."""
        ...

    async def send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        """Answer with a whole body."""
        ...

    async def open_stream(self, status: int, headers: dict[str, str], buffer_bytes: int) -> None:
        """Send the head of a streamed answer; writes wait once `buffer_bytes` are unread."""
        ...

    async def write(self, data: bytes) -> None:
        """Send a piece of the stream; raises ConnectionResetError once the client is gone."""
        ...

    async def write_eof(self) -> None:
        """End the stream cleanly."""
        ...

    def abort(self) -> None:
        """Drop the connection at once (a client that stopped reading)."""
        ...


def refuse_encoded_body(headers: Mapping[str, str]) -> None:
    """Refuse (415) a request whose body is compressed, before any of it is read.

    Request bodies are never decompressed: a small gzip body can inflate to gigabytes
    (a stall of the event loop, or memory), and no OpenAI client compresses requests.
    """
    if "content-encoding" not in headers:  # the common case, both roads case-insensitive
        return
    codings: list[str]
    if isinstance(headers, MultiMapping):
        codings = list(headers.getall("content-encoding", ()))
    else:
        one = headers.get("content-encoding")
        codings = [] if one is None else [one]
    for coding in codings:
        if coding.strip(" \t").lower() not in ("", "identity"):
            raise UnsupportedMediaType(
                "compressed request bodies are not accepted: send the body without Content-Encoding"
            )


def too_large(length: int, cap: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body of {length} bytes is over the limit of {cap} bytes")


class AiohttpExchange:
    """A request that aiohttp parsed; the answer is built as an aiohttp response."""

    __slots__ = ("_request", "headers", "response", "rid")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.headers: Mapping[str, str] = request.headers
        self.rid = request[REQUEST_ID]
        self.response: web.StreamResponse | None = None

    async def read_body(self, cap: int) -> bytes:
        length = self._request.content_length
        if length is not None and length > cap:
            raise too_large(length, cap)
        chunks: list[bytes] = []
        size = 0
        async for chunk in self._request.content.iter_any():
            size += len(chunk)
            if size > cap:
                raise PayloadTooLarge(f"request body is over the limit of {cap} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.response = web.Response(body=body, status=status, headers=headers)

    async def open_stream(self, status: int, headers: dict[str, str], buffer_bytes: int) -> None:
        resp = web.StreamResponse(status=status, headers=headers)
        self.response = resp
        await resp.prepare(self._request)
        transport = self._request.transport
        if transport is not None:
            transport.set_write_buffer_limits(high=buffer_bytes)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def write_eof(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def abort(self) -> None:
        transport = self._request.transport
        if transport is not None:
            transport.abort()


class StallGuard:
    """Cut a client that reads nothing for `timeout_s` while a stream is written to it.

    An exchange's write waits once the transport is over its high-water mark (the
    edge and aiohttp alike), so a slow reader slows the relay (and the upstream
    read) instead of growing memory;
    a reader that stopped altogether would pin the stream forever without this bound.
    One timer per stream, re-armed at most once per `timeout_s`, instead of a
    timeout scope around every event: a write that does not wait costs two
    attribute stores. A cut aborts the connection, so the waiting write raises
    `ConnectionResetError` (or the request task is cancelled with the connection).
    """

    __slots__ = ("_exchange", "_handle", "_loop", "_since", "_timeout_s", "cut")

    def __init__(self, exchange: ClientExchange, timeout_s: float) -> None:
        self._exchange = exchange
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None  # when the write in progress began
        self._handle: asyncio.TimerHandle | None = None
        self.cut = False

    async def write(self, data: bytes) -> None:
        loop = self._loop
        self._since = now = loop.time()
        if self._handle is None:
            self._handle = loop.call_at(now + self._timeout_s, self._check)
        try:
            await self._exchange.write(data)
        finally:
            self._since = None
        if self.cut:
            raise ConnectionResetError("the client stopped reading the stream")

    def _check(self) -> None:
        self._handle = None
        since = self._since
        if since is None:
            return  # not writing: the next write arms the timer again
        due = since + self._timeout_s
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self.cut = True
        self._exchange.abort()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
