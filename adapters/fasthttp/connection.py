"""One pooled TCP connection: an asyncio Protocol that hands its bytes to the exchange running on it."""

from __future__ import annotations

import asyncio
from typing import Protocol, cast


class Exchange(Protocol):
    """What a connection feeds: the exchange running on it (`exchange.Response`)."""

    def feed(self, data: bytes) -> None: ...

    def on_eof(self) -> None: ...


class ConnectionOwner(Protocol):
    """What a connection tells when it closes: its pool (`pool.ConnectionPool`)."""

    def forget(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """One TCP connection; forwards bytes to the exchange running on it, if any."""

    __slots__ = ("alive", "counted", "exchange", "idle_since", "pool", "transport", "uses")

    def __init__(self, pool: ConnectionOwner) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
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
