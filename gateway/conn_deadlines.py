"""Per-connection time limits: how long a client may take to send a request head, a body, or nothing.

Both roads enforce the same `ConnectionLimits` (from `listen.*`): neogate's own
edge (`gateway.edge`) checks them in its sweeper and its body wait; connections
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
import re
from dataclasses import dataclass
from typing import Final, cast

from gateway.config import ListenSpec

_CONTENT_LENGTH: Final = re.compile(rb"\ncontent-length[ \t]*:[ \t]*([0-9]{1,18})[ \t]*\r?\n", re.I)
_CHUNKED: Final = re.compile(rb"\ntransfer-encoding[ \t]*:[^\n]*chunked", re.I)
_CHUNKED_END: Final = re.compile(rb"(?:^|\n)0[ \t;]*[^\n]*\r?\n(?:[^\n]+\r?\n)*\r?\n")


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

    It follows the request framing just far enough to know where a head ends and
    how long its body is (Content-Length, or chunked up to its last chunk); every
    byte is passed on unchanged. A malformed request is aiohttp's to refuse.
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
        self._head = b""  # the head so far (state "head")
        self._state = "idle"  # idle -> head -> body | chunked -> idle
        self._left = 0  # body bytes still to come (state "body")
        self._tail = b""  # the end of the chunked body so far (state "chunked")
        self._first_deadline = head_deadline

    # -- asyncio.Protocol, forwarded --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        deadline = self._first_deadline
        if deadline is None:
            deadline = loop.time() + self._limits.head_timeout_s
        self._state = "head"
        self._arm(deadline)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._follow(data)
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

    # -- framing --

    def _follow(self, data: bytes) -> None:
        while data:
            state = self._state
            if state == "idle":
                self._state = "head"
                self._head = b""
                self._arm(asyncio.get_running_loop().time() + self._limits.head_timeout_s)
                continue
            if state == "head":
                data = self._in_head(data)
            elif state == "body":
                take = min(self._left, len(data))
                self._left -= take
                data = data[take:]
                if not self._left:
                    self._idle()
            else:  # chunked: up to the last chunk and its blank line
                tail = self._tail + data
                end = _CHUNKED_END.search(tail)
                if end is None:
                    self._tail = tail[-4096:]
                    return
                consumed = end.end() - len(self._tail)
                self._tail = b""
                data = data[max(consumed, 0) :]
                self._idle()

    def _in_head(self, data: bytes) -> bytes:
        head = self._head + data
        if not self._head:
            head = head.lstrip(b"\r\n")  # blank lines between requests
            if not head:
                return b""
        at = head.find(b"\n\r\n")
        at2 = head.find(b"\n\n")
        ends = [i for i in (at + 3 if at >= 0 else -1, at2 + 2 if at2 >= 0 else -1) if i >= 0]
        if not ends:
            self._head = head[-65536:]  # aiohttp refuses a longer head
            return b""
        end = min(ends)
        rest_len = len(head) - end
        head = head[:end]
        self._head = b""
        loop = asyncio.get_running_loop()
        if _CHUNKED.search(head):
            self._state, self._tail = "chunked", b"\n"
            self._arm(loop.time() + self._limits.body_timeout_s)
        else:
            m = _CONTENT_LENGTH.search(head)
            length = int(m.group(1)) if m else 0
            if length:
                self._state, self._left = "body", length
                self._arm(loop.time() + self._limits.body_timeout_s)
            else:
                self._idle()
        return data[len(data) - rest_len :] if rest_len else b""

    def _idle(self) -> None:
        self._state = "idle"
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
