"""The listening sockets of an app: where a connection starts, what connections share, how they end.

A connection accepted here starts at neogate's own edge (`gateway.http.edge`), or,
with `listen.fast_edge` off (and on the admin port), at aiohttp behind the same
connection deadlines (`gateway.http.conn_deadlines`). Only aiohttp's public API is
used: the socket is ours (`loop.create_server` with our protocol factory), and
a connection reaches aiohttp through a `web.RequestHandler` of `runner.server`
(`gateway.http.refusals`: aiohttp's own, with its answer to an unreadable head
in OpenAI JSON). (aiohttp's sites take no protocol factory, so these
sockets are not aiohttp sites: `open_site` answers the bound address, and the
app's `on_shutdown` hook, set by `add_listeners` in the app factory, drains
and closes them when the runner is cleaned up.)
"""

from __future__ import annotations

import asyncio
import http
import logging
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any, Final

from aiohttp import web

from gateway.http.conn_deadlines import ConnectionLimits, RequestDeadlines
from gateway.http.edge import EdgeConnection
from gateway.http.refusals import handler_factory
from gateway.http.server_log import ServerLog
from gateway.runtime import REQUEST_IDS, RUNTIME

log = logging.getLogger("neogate")


class Edge:
    """The connections of one listening socket and what they share."""

    def __init__(
        self,
        app: web.Application,
        fallback: Callable[[], asyncio.BaseProtocol],
        *,
        limits: ConnectionLimits,
        fast_edge: bool = True,
    ) -> None:
        self.ref = app[RUNTIME]
        self.ids = app[REQUEST_IDS]
        self.fallback = fallback
        self.limits = limits
        # Bad requests the guard answers itself: one line each, rate-limited, no bytes.
        self.log = ServerLog()
        self.fast_edge = fast_edge
        self.connections: set[EdgeConnection] = set()
        self.busy = 0
        self.closing = False
        self._drained = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._date_at = 0
        self._tail = b""
        self._status_lines: dict[int, bytes] = {}

    def protocol(self) -> asyncio.BaseProtocol:
        if not self.fast_edge:
            return RequestDeadlines(self.fallback(), self.limits, log=self.log)
        return EdgeConnection(self)

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def status_line(self, status: int) -> bytes:
        line = self._status_lines.get(status)
        if line is None:
            try:
                reason = http.HTTPStatus(status).phrase
            except ValueError:
                reason = "Unknown"
            line = self._status_lines[status] = f"HTTP/1.1 {status} {reason}\r\n".encode()
        return line

    def tail(self) -> bytes:
        """The `Date` and `Server` lines and the head's end, formatted once a second."""
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            # The last lines of every head, with the blank line that ends it.
            self._tail = f"Date: {formatdate(now, usegmt=True)}\r\nServer: neogate\r\n\r\n".encode()
        return self._tail

    def request_done(self) -> None:
        self.busy -= 1
        if self.closing and self.busy == 0:
            self._drained.set()

    async def _sweep(self) -> None:
        """Cut heads slower than the head deadline and close connections idle past the
        keep-alive time (one timer per site; bodies have their deadline in `wait_body`)."""
        limits = self.limits
        while True:
            await asyncio.sleep(limits.sweep_s)
            now = time.monotonic()
            idle_cutoff = now - limits.keepalive_s
            head_cutoff = now - limits.head_timeout_s
            for conn in list(self.connections):
                if conn.busy:
                    continue
                since = conn.head_since
                if since is not None:
                    if since < head_cutoff:
                        conn.abort()
                elif conn.last_active < idle_cutoff:
                    conn.close()

    async def shutdown(self, drain_s: float) -> None:
        """Close idle connections, let requests in flight finish for up to `drain_s`, then cut."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        if self.busy:
            try:
                await asyncio.wait_for(self._drained.wait(), drain_s)
            except TimeoutError:
                log.warning("%d requests still in flight after %.0fs: cut", self.busy, drain_s)
        tasks = [c.task for c in self.connections if c.task is not None]
        for conn in list(self.connections):
            conn.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)


class EdgeSite:
    """One listening socket and its connections."""

    def __init__(self, server: asyncio.Server, edge: Edge, drain_s: float) -> None:
        self._server = server
        self._edge = edge
        self._drain_s = drain_s
        sockname = server.sockets[0].getsockname()
        self.host: str = sockname[0]
        self.port: int = sockname[1]

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the drain time), close."""
        self._server.close()  # no new connections while the open ones drain
        await self._edge.shutdown(self._drain_s)


class Listeners:
    """The sockets an app listens on; the app's `on_shutdown` drains them."""

    def __init__(self) -> None:
        self.sites: list[EdgeSite] = []

    async def close(self, app: web.Application) -> None:
        sites, self.sites = self.sites, []
        for site in sites:
            await site.stop()


LISTENERS: Final = web.AppKey("listeners", Listeners)


def add_listeners(app: web.Application) -> None:
    """Make `app` ready for `open_site` (in the app factory: a started app takes no hooks)."""
    listeners = app[LISTENERS] = Listeners()
    app.on_shutdown.append(listeners.close)


async def open_site(
    runner: web.AppRunner,
    host: str,
    port: int,
    *,
    fast_edge: bool = True,
    backlog: int = 128,
    reuse_port: bool = False,
    drain_s: float = 60.0,
    limits: ConnectionLimits | None = None,
) -> EdgeSite:
    """Listen on host:port for `runner`'s app, through the edge unless `fast_edge` is off.

    `runner` is set up and its app made by the app factory (`add_listeners`); `limits`
    defaults to the app's `listen.*` time limits; both roads keep them.
    """
    app = runner.app
    if runner.server is None or LISTENERS not in app:
        raise RuntimeError("open_site needs a set-up runner of an app with add_listeners")
    # aiohttp's protocol, answering the heads it cannot read as OpenAI errors.
    fallback = handler_factory(runner, app[REQUEST_IDS])
    if limits is None:
        limits = ConnectionLimits.from_spec(app[RUNTIME].current.config.listen)
    edge = Edge(app, fallback, limits=limits, fast_edge=fast_edge)
    kwargs: dict[str, Any] = {"backlog": backlog}
    if reuse_port:
        kwargs["reuse_port"] = True
    server = await asyncio.get_running_loop().create_server(edge.protocol, host, port, **kwargs)
    edge.start()
    site = EdgeSite(server, edge, drain_s)
    app[LISTENERS].sites.append(site)
    return site
