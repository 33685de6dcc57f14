"""Backend state shared between replicas through Redis: ejections, 429 cool-downs, headroom, latency, prices, keys.

Each replica keeps its own `LiveState` and routes on it without touching Redis.
`SharedState` runs beside it:

- every `tick_s` it scans the local state for changes this replica made (a new
  circuit-breaker ejection, a later 429 cool-down, newer rate-limit headers, a
  new latency estimate, a new price book) and publishes them in one message on
  ``<prefix>:state`` (pub/sub), also writing each as a field of the hash
  ``<prefix>:state:snap`` (the snapshot a late joiner reads);
- a subscriber applies other replicas' updates through LiveState's own methods:
  an ejection trips the local breaker, a cool-down goes through `observe_429`,
  headroom through `observe_headers`, a latency estimate is folded in as one
  sample with `observe_latency`, prices through `PriceBoard.set_many`, and a key
  change makes the `KeyStore` refresh at once;
- on start, on every reconnect and every `snapshot_every_s` it re-reads the
  snapshot, so a replica that joined late or missed messages catches up.

An update carries its origin and a timestamp; each snapshot field is applied
once per timestamp, and a replica never applies its own. Remote updates are
applied in the tick, right after the local scan, and the scan's baselines move
past them, so an applied update is never published back (no echo).
Changes reach the other replicas within about two ticks (0.2 s by default).
Redis being down only stops the sharing: each replica keeps routing on what it
knows and catches up from the snapshot when Redis returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway.state.failures import FailureStreak
from gateway.state.keys import KeyStore
from gateway.state.live import BackendLive, LiveState
from gateway.state.shared.metrics import StateMetrics
from gateway.state.shared.redis_limits import REDIS_DOWN
from gateway.state.shared.state_updates import (
    KINDS,
    Update,
    latency_update,
    price_update,
    room_headers,
    room_update,
    snapshot_field,
)
from policies.latency import LatencyEstimate, LatencySample
from policies.pricebook import Price, PriceBook, PriceKey

log = logging.getLogger("neogate.shared")

TICK_S: Final = 0.1
SNAPSHOT_EVERY_S: Final = 5.0
SNAPSHOT_TTL_MS: Final = 86_400_000


@dataclass
class _Baseline:
    """What the last scan saw, so the next one reports only changes made since."""

    book: PriceBook
    ejections: dict[str, int] = field(default_factory=dict)
    cooldown: dict[str, float | None] = field(default_factory=dict)
    room: dict[str, float | None] = field(default_factory=dict)
    latency: dict[tuple[str, str], LatencyEstimate] = field(default_factory=dict)


class SharedState:
    """Publishes this replica's backend discoveries and applies the other replicas'."""

    def __init__(
        self,
        client: aioredis.Redis,
        key_prefix: str,
        live: LiveState | Callable[[], LiveState],
        keys: KeyStore | Callable[[], KeyStore | None] | None = None,
        *,
        tick_s: float = TICK_S,
        snapshot_every_s: float = SNAPSHOT_EVERY_S,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.channel = f"{key_prefix}:state"
        self.snap_key = f"{key_prefix}:state:snap"
        # Callables follow a reload that replaces the LiveState (see gateway.wiring).
        self._live_of: Callable[[], LiveState] = live if callable(live) else lambda: live
        self._keys_of: Callable[[], KeyStore | None] = keys if callable(keys) else lambda: keys
        self.origin = uuid.uuid4().hex
        self._tick_streak = FailureStreak(log, "shared state tick")
        self.metrics = StateMetrics(registry)
        self._tick_s = tick_s
        self._snapshot_every = snapshot_every_s
        self._clock = clock
        self._live = self._live_of()
        self._base = _Baseline(book=self._live.prices.book)
        self._outbox: dict[str, Update] = {}  # latest unpublished update per snapshot field
        self._inbox: list[Update] = []
        self._applied: dict[str, float] = {}  # snapshot field -> timestamp applied
        self._tasks: list[asyncio.Task[Any]] = []
        self._key_refresh: asyncio.Task[bool] | None = None
        self._stopping = asyncio.Event()
        self._scan(self._clock(), publish=False)

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Catch up from the snapshot (if Redis answers), then subscribe and tick."""
        try:
            await self.load_snapshot()
            self.tick()
        except REDIS_DOWN as exc:
            self.metrics.errors.inc()
            log.warning("shared state: redis unreachable at start (%s); will catch up later", exc)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._ticker(), name="neogate-shared-tick"),
            loop.create_task(self._subscriber(), name="neogate-shared-sub"),
        ]

    async def close(self) -> None:
        """Stop the loops (they notice within a tick), then publish what is left."""
        self._stopping.set()
        tasks, self._tasks = self._tasks, []
        if self._key_refresh is not None:
            tasks.append(self._key_refresh)
        if tasks:
            # The loops stop by themselves: redis-py can swallow a cancellation that lands
            # inside a read with a timeout, so cancelling is only the fallback.
            _, late = await asyncio.wait(tasks, timeout=2.0)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late, timeout=2.0)
        with contextlib.suppress(*REDIS_DOWN):
            await self.flush()

    def keys_changed(self) -> None:
        """This replica created or revoked a key: tell the others to refresh now."""
        u: Update = {"k": "keys", "t": self._clock()}
        self._outbox[snapshot_field(u)] = u

    # --- the tick: scan, apply, publish --------------------------------------------

    @property
    def live(self) -> LiveState:
        return self._live

    def tick(self) -> None:
        """Scan local changes into the outbox, then apply what other replicas sent."""
        now = self._clock()
        live = self._live_of()
        if live is not self._live:
            # A reload built a new LiveState from this replica's own config: adopt it
            # as the baseline instead of publishing its config prices to everyone.
            self._live = live
            self._base = _Baseline(book=live.prices.book)
            self._scan(now, publish=False)
        self._scan(now, publish=True)
        inbox, self._inbox = self._inbox, []
        for u in inbox:
            self._apply(u, now)

    async def flush(self) -> None:
        """Publish the outbox: one pub/sub message plus the snapshot fields."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        updates = list(outbox.values())
        for u in updates:
            u["o"] = self.origin
        msg = orjson.dumps({"o": self.origin, "u": updates})
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.publish(self.channel, msg)
            pipe.hset(self.snap_key, mapping={f: orjson.dumps(u) for f, u in outbox.items()})
            pipe.pexpire(self.snap_key, SNAPSHOT_TTL_MS)
            await pipe.execute()
        except REDIS_DOWN:
            # Keep what was not sent, unless a newer update for the same field came meanwhile.
            for f, u in outbox.items():
                self._outbox.setdefault(f, u)
            raise
        for u in updates:
            self.metrics.updates.labels("out", u["k"]).inc()

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless closing; True when it is time to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def _ticker(self) -> None:
        last_snapshot = self._clock()
        while not await self._pause(self._tick_s):
            try:
                self.tick()
                await self.flush()
                if self._clock() - last_snapshot >= self._snapshot_every:
                    last_snapshot = self._clock()
                    await self.load_snapshot()
            except REDIS_DOWN as exc:
                self.metrics.errors.inc()
                log.debug("shared state: redis unreachable: %s", exc)
            except Exception as exc:
                self._tick_streak.failed(exc)  # once per streak, with a count
            else:
                self._tick_streak.succeeded()

    async def _subscriber(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                await self.load_snapshot()  # whatever was missed while unsubscribed
                backoff = 0.1
                while not self._stopping.is_set():
                    msg = await pubsub.get_message(timeout=0.2)
                    if msg is not None and msg.get("type") == "message":
                        self.receive(bytes(msg["data"]))
            except REDIS_DOWN as exc:
                self.metrics.errors.inc()
                log.debug("shared state: subscription lost (%s); reconnecting", exc)
            finally:
                with contextlib.suppress(*REDIS_DOWN):
                    await pubsub.aclose()
            if await self._pause(backoff):
                return
            backoff = min(2.0, backoff * 2)

    def receive(self, raw: bytes) -> None:
        """Queue another replica's message; it is applied at the next tick."""
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("shared state: ignoring a malformed message")
            return
        if not isinstance(msg, dict) or msg.get("o") == self.origin:
            return
        updates = msg.get("u")
        if isinstance(updates, list):
            self._inbox.extend(u for u in updates if isinstance(u, dict))

    async def load_snapshot(self) -> None:
        """Queue every snapshot field written by another replica."""
        raw: dict[Any, Any] = await self.client.hgetall(self.snap_key)
        for value in raw.values():
            try:
                u = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue
            if isinstance(u, dict) and u.get("o") != self.origin:
                self._inbox.append(u)

    # --- local changes -------------------------------------------------------------

    def _scan(self, now: float, *, publish: bool) -> None:
        base = self._base
        for name, b in self._live.backends.items():
            snap = b.breaker.snapshot(now)
            if snap.ejections_total != base.ejections.get(name, 0) and snap.open_until:
                self._emit(publish, {"k": "eject", "b": name, "until": snap.open_until, "t": now})
            base.ejections[name] = snap.ejections_total
            room = b.headroom
            cool = room.cooldown_until
            if cool is not None and cool != base.cooldown.get(name) and cool > now:
                self._emit(publish, {"k": "cool", "b": name, "until": cool, "t": now})
            base.cooldown[name] = cool
            if room.observed_at is not None and room.observed_at != base.room.get(name):
                self._emit(publish, room_update(name, room))
            base.room[name] = room.observed_at
            for model, est in b.latency.items():
                if base.latency.get((name, model)) is not est:
                    self._emit(publish, latency_update(name, model, est, now))
                    base.latency[(name, model)] = est
        book = self._live.prices.book
        if book is not base.book:
            for key, price in book.prices.items():
                old = base.book.prices.get(key)
                if old is None or not old.same_rates(price):
                    self._emit(publish, price_update(key, price, now))
            base.book = book

    def _emit(self, publish: bool, u: Update) -> None:
        if publish:
            self._outbox[snapshot_field(u)] = u

    # --- remote changes ------------------------------------------------------------

    def _apply(self, u: Update, now: float) -> None:
        try:
            fld = snapshot_field(u)
            at = float(u["t"])
        except (KeyError, TypeError, ValueError, IndexError):
            log.warning("shared state: ignoring a malformed update")
            return
        if self._applied.get(fld, float("-inf")) >= at:
            return
        self._applied[fld] = at
        kind = u["k"]
        try:
            if kind == "keys":
                self._refresh_keys()
            elif kind == "price":
                self._apply_price(u)
            elif u.get("b") in self._live.backends:
                self._apply_backend(kind, u, now)
            else:
                return  # a backend this replica's config does not have
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("shared state: ignoring a malformed %s update: %s", kind, exc)
            return
        if kind in KINDS:
            self.metrics.updates.labels("in", kind).inc()

    def _apply_backend(self, kind: str, u: Update, now: float) -> None:
        name = str(u["b"])
        b = self._live.backends[name]
        if kind == "eject":
            until = float(u["until"])
            if until > now:
                _trip(b, now)
            self._base.ejections[name] = b.breaker.snapshot(now).ejections_total
        elif kind == "cool":
            until = float(u["until"])
            if until > now:
                self._live.observe_429(name, until - now, now)
            self._base.cooldown[name] = b.headroom.cooldown_until
        elif kind == "room":
            observed = float(u["observed_at"])
            if b.headroom.observed_at is None or observed > b.headroom.observed_at:
                self._live.observe_headers(name, room_headers(u, observed), observed)
        elif kind == "lat":
            model = str(u["m"])
            if model in b.spec.models:
                ttft, itl = u.get("ttft"), u.get("itl")
                self._live.observe_latency(
                    name,
                    model,
                    LatencySample(
                        None if ttft is None else float(ttft), None if itl is None else float(itl)
                    ),
                )
                est = b.latency.get(model)
                if est is not None:
                    self._base.latency[(name, model)] = est
        # Every kind can touch the headroom's timestamps (observe_429 sets observed_at).
        self._base.room[name] = b.headroom.observed_at
        self._base.cooldown[name] = b.headroom.cooldown_until

    def _apply_price(self, u: Update) -> None:
        raw = u["key"]
        key: PriceKey = raw if isinstance(raw, str) else (str(raw[0]), str(raw[1]))
        backend = key if isinstance(key, str) else key[0]
        if backend not in self._live.backends:
            return
        cached = u.get("cached")
        price = Price(
            float(u["in"]),
            float(u["out"]),
            None if cached is None else float(cached),
            source=str(u.get("source", "replica")),
            updated_at=float(u["updated_at"] if u.get("updated_at") is not None else u["t"]),
        )
        self._live.prices.set_many({key: price})
        self._base.book = self._live.prices.book

    def _refresh_keys(self) -> None:
        keys = self._keys_of()
        if keys is None:
            return
        if self._key_refresh is not None and not self._key_refresh.done():
            return  # a refresh is running; it reads the newest version
        self._key_refresh = asyncio.get_running_loop().create_task(keys.refresh())
        self._key_refresh.add_done_callback(_log_refresh_failure)


def _log_refresh_failure(task: asyncio.Task[bool]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("key refresh after a remote change failed: %s", task.exception())


def _trip(b: BackendLive, now: float) -> None:
    """Eject through the breaker's own API: report failures until it opens."""
    breaker = b.breaker
    for _ in range(breaker.config.consecutive_failures + 1):
        if breaker.snapshot(now).state == "open":
            return
        breaker.on_failure(now)
