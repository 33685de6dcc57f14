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
error: aiohttp's own answer is plain text that quotes the bytes it read back. A
later one is aiohttp's to answer, behind the requests before it, and it answers in
OpenAI JSON too (`gateway.http.refusals`).
"""

from __future__ import annotations

import asyncio
import contextlib
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


# The most of a request in progress kept to find where it ends (`RequestDeadlines._ends`).
_HOLD_BYTES: Final = 65536


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
    and never passes the bytes on. A malformed head later on a keep-alive connection is
    aiohttp's to answer (as an OpenAI error, `gateway.http.refusals`), in order: the guard
    gives aiohttp one request per read when several end in one, because aiohttp's parser,
    failing on a request, drops the requests before it in the same read unanswered.
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
        self._in_message = False
        # The reads since the last one that ended between requests (None: too long to keep),
        # and the requests that ended in them.
        self._held: list[bytes] | None = []
        self._held_bytes = 0
        self._completed = 0

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
        if parser is None:
            self._inner.data_received(data)
            return
        completed = self._completed
        failed = False
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
            # aiohttp is under way on the connection: it answers (`gateway.http.refusals`)
            # behind the requests before; the deadline stays.
            failed = True
        ended = self._completed - completed
        if ended and (ended > 1 or self._in_message or failed):
            # Requests end in `data` and another follows: aiohttp gets one request per read,
            # or an error in a later one would drop the ones before it unanswered.
            ends = self._ends(data)
            if ends:
                at = 0
                for end in ends:
                    self._inner.data_received(data[at:end])
                    at = end
                data = data[at:]
                self._held, self._held_bytes, self._completed = [], 0, 0
                if not data:
                    return
        self._hold(data)
        self._inner.data_received(data)

    def _hold(self, data: bytes) -> None:
        """Keep `data` while a request that spans reads is in progress (for `_ends`)."""
        held = self._held
        if not self._in_message:
            self._held, self._held_bytes, self._completed = [], 0, 0
        elif held is not None:
            self._held_bytes += len(data)
            if self._held_bytes > _HOLD_BYTES:
                self._held = None  # too long to read again: no split until the next boundary
            else:
                held.append(data)

    def _ends(self, data: bytes) -> list[int]:
        """Where in `data` each request that ended in it ends (llhttp read again, from the
        last read that ended between requests); none when that is too far back."""
        held = self._held
        if held is None:
            return []
        start = self._held_bytes
        buf = b"".join([*held, data]) if held else data
        out: list[int] = []
        at, size = 0, len(buf)
        for _ in range(self._completed):
            # A request's end: gallop from the last end to a prefix holding it, then halve.
            step, lo = 256, at + 1
            hi = min(at + step, size)
            while hi < size and not _ends_in(buf[at:hi]):
                lo, step = hi + 1, step * 2
                hi = min(at + step, size)
            while lo < hi:
                mid = (lo + hi) // 2
                if _ends_in(buf[at:mid]):
                    hi = mid
                else:
                    lo = mid + 1
            at = lo
            if at > start:
                out.append(at - start)
        return out

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
        self._in_message = True
        if self._timer is None:  # not the first head, which runs from the opening
            self._arm(asyncio.get_running_loop().time() + self._limits.head_timeout_s)

    def on_headers_complete(self) -> None:
        self._heads += 1
        self._arm(asyncio.get_running_loop().time() + self._limits.body_timeout_s)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._completed += 1
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


class _Ends:
    """Counts the requests that end in what llhttp is given."""

    __slots__ = ("ended",)

    def __init__(self) -> None:
        self.ended = 0

    def on_message_complete(self) -> None:
        self.ended += 1


def _ends_in(data: bytes) -> int:
    """How many requests end in `data` (read from a request's first byte), up to an error."""
    ends = _Ends()
    with contextlib.suppress(httptools.HttpParserError, httptools.HttpParserUpgrade):
        httptools.HttpRequestParser(ends).feed_data(data)
    return ends.ended
