"""Background tasks of one app: key-revocation refresh for the process's life; per config the
worker /metrics scrapers (and the uptime they observe, into the ledger), the price-feed poller
and the provisioning gauges."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import orjson

from adapters.base import Backend
from adapters.worker_metrics import MetricsParseError, parse_worker_metrics
from gateway.config import BackendSpec, GatewayConfig
from gateway.errors import GatewayError
from gateway.metering.ledger.gpu_uptime import record_uptime
from gateway.metering.ledger.provisioning import (
    PROVISIONING_WINDOW_S,
    gpu_terms,
    provisioning,
    provisioning_gauges_values,
)
from gateway.metering.ledger.rows import LedgerStore, LedgerUnavailable
from gateway.metering.uptime import GAP_INTERVALS, UptimeTracker
from gateway.metrics import GatewayMetrics
from gateway.state.failures import FailureStreak
from gateway.state.keys import KeyStore
from gateway.state.live import LiveState
from policies.pricebook import (
    FeedError,
    Price,
    SkippedRow,
    parse_neogate_feed,
    parse_openrouter_rows,
)

log = logging.getLogger("neogate.background")

KEY_REFRESH_S = 0.5  # revocations by another process take effect within this
# Failures that are an outage of something we depend on: logged without a traceback.
_OUTAGES: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    aiohttp.ClientError,
    GatewayError,
    MetricsParseError,
    FeedError,
    LedgerUnavailable,
)
PROVISIONING_REFRESH_S = 60.0
# After a scrape succeeds, the uptime writer waits this long (at most a quarter of the scrape
# interval) for the other workers' scrapes of the same tick, then writes them all at once.
UPTIME_GATHER_S = 0.05


class Background:
    """Starts and stops the app's pollers; each loop survives its own failures.

    `start` runs the process's own (key refresh); `follow` (re)starts the ones a
    config defines, over that config's backends and live state.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        metrics: GatewayMetrics,
        keys: KeyStore,
        ledger: LedgerStore | None,
    ) -> None:
        self._session = session
        self._metrics = metrics
        self._keys = keys
        self._ledger = ledger
        self._tasks: list[asyncio.Task[None]] = []  # the process's
        self._config_tasks: list[asyncio.Task[None]] = []  # the config's in force
        self._skips_logged: frozenset[tuple[str, str]] = frozenset()
        self._feed_streak = FailureStreak(log, "price feed", expected=_OUTAGES)
        self._config: GatewayConfig | None = None
        self._backends: Mapping[str, Backend] = {}
        self._specs: dict[str, BackendSpec] = {}
        self._live: LiveState | None = None
        # Local workers' uptime as this process's scrapes see it (kept across reloads),
        # written to the ledger as this observer's rows after each tick of scrapes.
        self._uptime = UptimeTracker()
        self._uptime_due = asyncio.Event()
        self.observer = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def start(self) -> None:
        self._spawn(self._tasks, "key-refresh", KEY_REFRESH_S, self._refresh_keys)

    async def follow(
        self, config: GatewayConfig, backends: Mapping[str, Backend], live: LiveState
    ) -> None:
        """Stop the previous config's pollers, then start `config`'s."""
        await _cancel(self._config_tasks)
        self._config, self._backends, self._live = config, backends, live
        self._specs = {b.name: b for b in config.backends}
        feed = config.price_feed
        self._skips_logged = frozenset()
        self._feed_streak = FailureStreak(
            log, f"price feed {feed.url if feed else ''} (last good prices kept)", expected=_OUTAGES
        )
        tasks = self._config_tasks
        interval = config.routing.scrape_interval_s
        local = {name: b for name, b in backends.items() if b.is_local}
        for name, backend in local.items():
            # On one fixed-rate schedule from now: the workers are scraped on the same ticks,
            # so one uptime write carries them all.
            scrape = self._scraper(name, backend, live, interval)
            self._spawn(tasks, f"scrape-{name}", interval, scrape, fixed_rate=True)
        if self._ledger is not None and local:
            # Written right after each tick's scrapes (not one write per scrape per worker):
            # a crash loses about one interval, the time since the last successful scrape.
            self._spawn(tasks, "uptime", 0.0, self._uptime_writer(interval))
        if feed is not None:
            self._spawn(tasks, "price-feed", feed.interval_s, self.poll_price_feed)
        if self._ledger is not None and gpu_terms(config):
            self._spawn(tasks, "provisioning", PROVISIONING_REFRESH_S, self._provisioning)

    async def stop(self, *, write_uptime: bool = True) -> None:
        await _cancel(self._config_tasks)
        await _cancel(self._tasks)
        if not write_uptime:
            return
        try:
            await self.write_uptime()  # the last interval's end (the ledger closes after)
        except LedgerUnavailable as exc:
            log.warning("uptime not written at stop: %s", exc)

    def _uptime_writer(self, interval: float) -> Callable[[], Awaitable[None]]:
        gather_s = min(UPTIME_GATHER_S, interval / 4)

        async def step() -> None:
            await self._uptime_due.wait()
            await asyncio.sleep(gather_s)
            self._uptime_due.clear()
            await self.write_uptime()

        return step

    async def write_uptime(self) -> None:
        """Upsert this process's changed up intervals into the ledger, in one statement."""
        rows = self._uptime.unwritten()
        if self._ledger is None or not rows:
            return
        await record_uptime(self._ledger, self.observer, rows)
        self._uptime.written(rows)

    def _spawn(
        self,
        tasks: list[asyncio.Task[None]],
        name: str,
        interval: float,
        step: Callable[[], Awaitable[None]],
        *,
        fixed_rate: bool = False,
    ) -> None:
        """Run `step` forever: `interval` after each run ends, or (`fixed_rate`) on ticks
        `interval` apart from now (a run past its tick skips to the next one)."""
        # A failing task (its database or endpoint down) logs once per outage, not per try.
        streak = FailureStreak(log, f"background task {name}", expected=_OUTAGES)
        clock = asyncio.get_running_loop().time
        due = clock()

        async def loop() -> None:
            nonlocal due
            while True:
                try:
                    await step()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    streak.failed(exc)
                else:
                    streak.succeeded()
                if not fixed_rate:
                    await asyncio.sleep(interval)
                    continue
                now = clock()
                due += interval
                if due < now:
                    due += math.ceil((now - due) / interval) * interval
                await asyncio.sleep(due - now)

        tasks.append(asyncio.get_running_loop().create_task(loop(), name=name))

    def _scraper(
        self, name: str, backend: Backend, live: LiveState, interval: float
    ) -> Callable[[], Awaitable[None]]:
        streak = FailureStreak(log, f"metrics scrape of {name}", expected=_OUTAGES)

        async def scrape() -> None:
            started = time.time()
            try:
                text = await backend.fetch_metrics()
                if text is None:
                    # Local workers always have a metrics URL, so None is a non-200 answer:
                    # a failure like any other (the worker goes stale on the same clock).
                    raise MetricsParseError("the endpoint answered an error status")
                metrics = parse_worker_metrics(text, time.time())
            except (GatewayError, MetricsParseError) as exc:
                self._metrics.scrape_failures.labels(name).inc()
                streak.failed(exc)
                self._uptime.down(name)
                return
            streak.succeeded()
            live.observe_worker(name, metrics)
            # Up now. The run goes on unless the silence before this scrape (its own time
            # not counted: a slow answer is not a gap) passed GAP_INTERVALS intervals.
            now = time.time()
            self._uptime.up(name, now, GAP_INTERVALS * interval + (now - started))
            self._uptime_due.set()

        return scrape

    async def poll_price_feed(self) -> None:
        """Fetch the feed; a malformed or unreachable feed keeps the last good prices."""
        config, live = self._in_force()
        feed = config.price_feed
        assert feed is not None
        try:
            async with self._session.get(feed.url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                if r.status != 200:
                    raise FeedError(f"price feed answered {r.status}")
                body = await r.read()
            updates = self._feed_updates(orjson.loads(body))
        except (aiohttp.ClientError, TimeoutError, FeedError, orjson.JSONDecodeError) as exc:
            self._metrics.price_feed_failures.inc()
            self._feed_streak.failed(exc)  # the last good prices stay in force
            return
        self._feed_streak.succeeded()
        before = live.prices.book.version
        after = live.prices.set_many(updates)
        if after != before:
            log.info("price feed applied: version %d -> %d", before, after)

    def _feed_updates(self, obj: object) -> dict[str | tuple[str, str], Price]:
        config, _ = self._in_force()
        feed = config.price_feed
        assert feed is not None
        now = time.time()
        if feed.format == "neogate":
            parsed = parse_neogate_feed(obj, now=now)
            known = {(k if isinstance(k, str) else k[0]) for k in parsed}
            unknown = known - set(self._backends)
            if unknown:
                raise FeedError(f"feed prices unknown backends {sorted(unknown)}")
            out_ng: dict[str | tuple[str, str], Price] = {}
            for key, found in parsed.items():
                if isinstance(key, str):
                    out_ng[key] = found
                    continue
                for public in _public_models(self._specs[key[0]].models, key[1]):
                    out_ng[(key[0], public)] = found
            return out_ng
        parsed_or = parse_openrouter_rows(obj, now=now)
        self._report_skipped(parsed_or.skipped)
        by_id = parsed_or.prices
        out: dict[str | tuple[str, str], Price] = {}
        for feed_id, target in feed.map.items():
            price = by_id.get(feed_id)
            if price is None:
                continue
            backend, _, model = target.partition("/")
            out[(backend, model) if model else backend] = price
        return out

    def _report_skipped(self, skipped: tuple[SkippedRow, ...]) -> None:
        """Bad feed rows: a gauge, /admin/prices, and one log line per new set of bad rows."""
        _, live = self._in_force()
        self._metrics.price_feed_skipped_rows.set(len(skipped))
        live.prices.feed_skipped = skipped
        seen = frozenset((s.id, s.reason) for s in skipped)
        if seen and seen != self._skips_logged:
            log.warning(
                "price feed: %d row(s) skipped, the rest applied: %s",
                len(skipped),
                "; ".join(s.reason for s in skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
            )
        self._skips_logged = seen

    async def _provisioning(self) -> None:
        """Provisioning truth over the last window into the Prometheus gauges."""
        config, _ = self._in_force()
        ledger = self._ledger
        if ledger is None:
            return
        now = time.time()
        rows = await provisioning(
            ledger,
            gpu_terms(config),
            since=now - PROVISIONING_WINDOW_S,
            until=None,
            now=now,
        )
        gauges = self._metrics.gpu_provisioning
        for suffix, values in provisioning_gauges_values(rows).items():
            for backend, value in values.items():
                gauges[suffix].labels(backend).set(value)

    async def _refresh_keys(self) -> None:
        await self._keys.refresh()

    def _in_force(self) -> tuple[GatewayConfig, LiveState]:
        assert self._config is not None and self._live is not None, "follow() a config first"
        return self._config, self._live


def _public_models(models: Mapping[str, str], name: str) -> list[str]:
    """The public models a feed's model name prices on one backend.

    Prices are looked up by public model; a feed may name either that or the backend's
    own model id (as the feed format documents), which can serve several public names.
    """
    if name in models:
        return [name]
    found = [public for public, backend_model in models.items() if backend_model == name]
    if not found:
        raise FeedError(f"feed prices model {name!r}, which this backend does not serve")
    return found


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    tasks.clear()
