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
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import cast

import httptools

from gateway.config import ListenSpec


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
    following and the deadline in force stays.
    """

    def __init__(
        self,
        inner: asyncio.BaseProtocol,
        limits: ConnectionLimits,
        head_deadline: float | None = None,
    ) -> None:
        self._inner = cast(asyncio.Protocol, inner)
        self._limits = limits
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._first_deadline = head_deadline
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)

    # -- asyncio.Protocol, forwarded --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        deadline = self._first_deadline
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._limits.head_timeout_s
        self._arm(deadline)  # the first head runs from the connection's opening
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is not None:
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self._parser = None  # no longer HTTP/1.1 requests: nothing to follow
                self._disarm()
            except httptools.HttpParserError:
                self._parser = None  # aiohttp answers it; the deadline in force stays
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
        self._arm(asyncio.get_running_loop().time() + self._limits.body_timeout_s)

    def on_message_complete(self) -> None:
        self._disarm()  # aiohttp's keep-alive timer covers the wait for the next request

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
