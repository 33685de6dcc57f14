"""Per-connection time limits: how long a client may take to send a request head, a body, or nothing.

Both roads enforce the same `ConnectionLimits` (from `listen.*`): neogate's own
edge (`gateway.http.edge`) checks them in its sweeper and its body wait; connections
read by aiohttp pass through a `RequestDeadlines` protocol in front of aiohttp's
own, because aiohttp has no head or body deadline of its own (its keep-alive
timer, set from `keepalive_s`, covers idle connections between requests).

- head: a request head must be whole within `head_timeout_s` of its first byte
  (of the connection's opening, for the first request): a head sent a byte at a
  time is cut.
- body: a body must be whole within `body_timeout_s` of its head.
- idle: a connection with no request in progress is closed after `keepalive_s`.

A connection's first head that llhttp cannot parse is answered here, as an OpenAI
error: aiohttp's own answer is plain text that quotes the bytes it read back.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Final, cast

import httptools

from gateway.config import ListenSpec
from gateway.errors import InvalidRequest

# After the 400: drop what the client still sends for this long, then close (closing
# at once could reset the connection before the client has read the answer).
_LINGER_S: Final = 2.0
# What llhttp's error says, by kind; never its text (llhttp's reasons are fixed strings,
# but nothing of a request may reach the answer or the log).
_KINDS: Final = {
    httptools.HttpParserInvalidMethodError: "an invalid method",
    httptools.HttpParserInvalidURLError: "an invalid request target",
}


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Time limits of one client connection, in seconds."""

    head_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keepalive_s: float = 75.0

    @classmethod
    def from_spec(cls, spec: ListenSpec) -> ConnectionLimits:
        return cls(spec.head_timeout_s, spec.body_timeout_s, spec.keepalive_s)

    @property
    def sweep_s(self) -> float:
        """How often a sweeper must look to cut within a quarter of the shortest limit."""
        return min(self.head_timeout_s, self.keepalive_s, 60.0) / 4


class RequestDeadlines(asyncio.Protocol):
    """Sits in front of aiohttp's protocol and cuts a connection whose head or body is too slow.

    It follows the request framing with llhttp (httptools, the parser aiohttp's
    own is built on) just far enough to know where a head begins and ends and
    where its body ends (Content-Length or chunked); every byte is passed on
    unchanged. A malformed request is aiohttp's to refuse: the guard stops
    following and the deadline in force stays. Except for the connection's first head:
    while no head has been whole, aiohttp has nothing under way on the connection, so
    the guard answers a head llhttp refuses itself, as an OpenAI error (400) that quotes
    nothing of the request, writes one line to `log` (rate-limited, without the bytes),
    and never passes the bytes on. aiohttp's own answer is plain text quoting the bytes
    it read; a malformed head later on a keep-alive connection still gets that (quoting
    only that client's own request back to it).
    """

    def __init__(
        self,
        inner: asyncio.BaseProtocol,
        limits: ConnectionLimits,
        head_deadline: float | None = None,
        log: logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        self._inner = cast(asyncio.Protocol, inner)
        self._limits = limits
        self._log = log
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._first_deadline = head_deadline
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._heads = 0  # heads llhttp read whole on this connection
        self._refused = False

    # -- asyncio.Protocol, forwarded --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        deadline = self._first_deadline
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._limits.head_timeout_s
        self._arm(deadline)  # the first head runs from the connection's opening
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered and closing: what the client still sends is dropped
        parser = self._parser
        if parser is not None:
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self._parser = None  # no longer HTTP/1.1 requests: nothing to follow
                self._disarm()
            except httptools.HttpParserError as exc:
                self._parser = None
                if self._heads == 0:
                    self._refuse(exc)
                    return
                # aiohttp is under way on the connection: it answers; the deadline stays
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- llhttp callbacks: a head begins, the head is whole, the message is whole --

    def on_message_begin(self) -> None:
        if self._timer is None:  # not the first head, which runs from the opening
            self._arm(asyncio.get_running_loop().time() + self._limits.head_timeout_s)

    def on_headers_complete(self) -> None:
        self._heads += 1
        self._arm(asyncio.get_running_loop().time() + self._limits.body_timeout_s)

    def on_message_complete(self) -> None:
        self._disarm()  # aiohttp's keep-alive timer covers the wait for the next request

    def _refuse(self, exc: httptools.HttpParserError) -> None:
        """Answer a first head llhttp refused with a 400, then close after a linger."""
        self._refused = True
        self._disarm()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        kind = _KINDS.get(type(exc), "a malformed head")
        if self._log is not None:
            peer = transport.get_extra_info("peername")
            host = str(peer[0]) if isinstance(peer, tuple) and peer else "-"
            self._log.warning(f"Bad request from %s ({type(exc).__name__}, answered 400)", host)
        error = InvalidRequest(
            f"the request is not valid HTTP/1.1: {kind}", code="malformed_request"
        )
        body = error.body()
        transport.write(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\nServer: neogate\r\n\r\n" % len(body) + body
        )
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(_LINGER_S, transport.close)

    # -- the one timer --

    def _arm(self, deadline: float) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_at(deadline, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.abort()
