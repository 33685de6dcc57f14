"""Redis outages: fail open on local limits (flagged) or fail closed (503), and reconcile exactly once.

`FailoverLimitStore` is the `LimitStore` the gateway uses when Redis is
configured. While Redis answers, every operation is one Redis script. When it
stops answering:

- **fail open** (`on_outage: open`): reservations are decided by an in-process
  `MemoryLimitStore` seeded with the last counter values this process saw from
  Redis, so a tenant near its budget stays near it. Rate limits restart per
  process (each allows the configured rate while Redis is away). The
  `neogate_redis_up` gauge is 0, `neogate_limits_decided_locally_total` counts
  the local decisions, and a warning is logged once per outage.
- **fail closed** (`on_outage: closed`): `reserve` raises `SharedStateUnavailable`
  (503, `x-should-retry: false` is not set: the client may retry later).

In both modes settlements (`adjust`) of requests already admitted cannot be
refused; they are applied locally. Every local change is also added to a
*pending* map of net deltas per counter.

Reconciliation, when a background probe reaches Redis again:

1. If the epoch is unchanged, Redis kept its counters: the pending deltas are
   cut into a batch with a fresh transfer id and added by one script that first
   writes a marker for that id. A batch whose reply was lost is retried with the
   same id, so it is applied once, never twice; changes made while it was in
   flight go into the next batch. Only when no delta is left does the store
   switch back to Redis (a synchronous step: nothing can slip in between).
   Because reservations and their settlements each land in exactly one place,
   Redis ends with exactly the sum it would have had without the outage.
2. If the epoch is missing, Redis lost its data: counters are rebuilt from the
   ledger through the `reseed` hook (the ledger holds every completed request,
   including those admitted locally), then a new epoch is written, and the
   pending deltas are dropped, since the ledger already counts them. Requests
   still in flight at that moment are the only ones missing: the error is bounded
   by one in-flight reservation per request per replica.
3. If the epoch changed, another replica already did step 2: drop the deltas.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.admission import CounterCheck, LimitStore, MemoryLimitStore, RateCheck, Refusal
from gateway.errors import GatewayError
from gateway.shared.redis_limits import (
    REDIS_DOWN,
    Applied,
    CounterDelta,
    EpochMissing,
    RedisLimitStore,
)

log = logging.getLogger("neogate.shared")

OnOutage = Literal["open", "closed"]
# Rebuilds Redis's counters from the ledger, writing them into the store it is given.
Reseed = Callable[[LimitStore], Awaitable[None]]

PROBE_INTERVAL_S: Final = 0.25
# Counter values seen from Redis are kept for the fail-open fallback; this bounds them.
_MAX_SEEN: Final = 100_000


class SharedStateUnavailable(GatewayError):
    """503: limits are shared through Redis, Redis is down and the gateway is set to fail closed."""

    status = 503
    error_type = "service_unavailable"
    default_code = "shared_state_unavailable"


class RebuildFailed(Exception):
    """Redis lost its counters and they could not be rebuilt from the ledger (yet)."""


# Either way the shared counters cannot be used now: the outage policy applies.
_DOWN_OR_UNSEEDED: Final[tuple[type[BaseException], ...]] = (*REDIS_DOWN, RebuildFailed)


class SharedMetrics:
    """What an operator watches during a Redis outage."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.up = Gauge(
            "neogate_redis_up",
            "1 while shared limits and state go through Redis, 0 during an outage.",
            registry=r,
        )
        self.outages = Counter(
            "neogate_redis_outages_total", "Times Redis stopped answering.", registry=r
        )
        self.local = Counter(
            "neogate_limits_decided_locally_total",
            "Admission operations decided in-process because Redis was down (fail open).",
            ["op"],
            registry=r,
        )
        self.refused = Counter(
            "neogate_limits_refused_redis_down_total",
            "Requests refused with 503 because Redis was down (fail closed).",
            registry=r,
        )
        self.reseeds = Counter(
            "neogate_redis_reseeds_total",
            "Times Redis came back empty and its counters were rebuilt from the ledger.",
            registry=r,
        )
        self.transfers = Counter(
            "neogate_redis_transfers_total",
            "Batches of outage-time deltas added to Redis after an outage, by result.",
            ["result"],
            registry=r,
        )
        self.up.set(1)


class FailoverLimitStore:
    """A `LimitStore`: Redis while it answers, a flagged local fallback while it does not."""

    def __init__(
        self,
        redis: RedisLimitStore,
        on_outage: OnOutage = "open",
        *,
        reseed: Reseed | None = None,
        metrics: SharedMetrics | None = None,
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        self.redis = redis
        self.on_outage = on_outage
        self.metrics = metrics if metrics is not None else SharedMetrics(None)
        self._reseed_hook = reseed
        self._probe_interval = probe_interval_s
        self._degraded = False
        self._epoch: str | None = None
        self._local = MemoryLimitStore()
        self._pending: dict[str, CounterDelta] = {}
        self._unsent: list[tuple[str, dict[str, CounterDelta]]] = []  # (transfer id, deltas)
        self._seen: dict[str, tuple[int, float | None, float]] = {}  # key -> value, ttl, at
        self._recovering: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def degraded(self) -> bool:
        """True while Redis is considered down (decisions are local or refused)."""
        return self._degraded

    async def start(self) -> None:
        """Learn the epoch (a Redis without one is rebuilt from the ledger first).

        If Redis is down, start degraded and keep probing.
        """
        try:
            epoch = await self.redis.epoch()
            if epoch is None:
                await self._rebuild()
            else:
                self._epoch = epoch
        except _DOWN_OR_UNSEEDED as exc:
            await self._enter_outage(exc)

    async def close(self) -> None:
        self._closed = True
        task, self._recovering = self._recovering, None
        if task is not None:
            task.cancel()
            # Bounded: a cancellation landing inside a redis-py read can be swallowed.
            await asyncio.wait({task}, timeout=2.0)

    # --- LimitStore ----------------------------------------------------------------

    async def reserve(
        self, counters: Sequence[CounterCheck], rates: Sequence[RateCheck], now: float
    ) -> Refusal | None:
        if not self._degraded:
            try:
                result = await self._reserve_redis(counters, rates, now)
            except _DOWN_OR_UNSEEDED as exc:
                await self._enter_outage(exc)
            else:
                if isinstance(result, Refusal):
                    return result
                self._remember(counters, result, now)
                return None
        if self.on_outage == "closed":
            self.metrics.refused.inc()
            raise SharedStateUnavailable(
                "the gateway cannot check this tenant's limits now (shared state unavailable); "
                "retry shortly",
                retry_after_s=1.0,
            )
        self.metrics.local.labels("reserve").inc()
        refusal = await self._local.reserve(counters, rates, now)
        if refusal is None:
            self._add_pending(counters)
        return refusal

    async def adjust(
        self, counters: Sequence[CounterCheck], rates: Sequence[RateCheck], now: float
    ) -> None:
        if not self._degraded:
            try:
                await self._adjust_redis(counters, rates, now)
                return
            except _DOWN_OR_UNSEEDED as exc:
                await self._enter_outage(exc)
        self.metrics.local.labels("adjust").inc()
        await self._local.adjust(counters, rates, now)
        self._add_pending(counters)

    async def seed(self, counters: Sequence[CounterCheck], now: float) -> None:
        if not self._degraded:
            try:
                await self.redis.seed(counters, now)
                return
            except REDIS_DOWN as exc:
                await self._enter_outage(exc)
        # Seeds are absolute values (set if absent), not deltas: never carried into Redis.
        await self._local.seed(counters, now)

    # --- Redis with epoch recovery -------------------------------------------------

    async def _reserve_redis(
        self, counters: Sequence[CounterCheck], rates: Sequence[RateCheck], now: float
    ) -> Refusal | Applied:
        try:
            return await self.redis.reserve_values(counters, rates, now)
        except EpochMissing:
            await self._rebuild()
            return await self.redis.reserve_values(counters, rates, now)

    async def _adjust_redis(
        self, counters: Sequence[CounterCheck], rates: Sequence[RateCheck], now: float
    ) -> None:
        try:
            applied = await self.redis.adjust_values(counters, rates, now)
            self._remember(counters, applied, now)
        except EpochMissing:
            # The settlement of a request whose reservation was lost with Redis's data:
            # the rebuilt counters come from the ledger, which will hold this request.
            await self._rebuild()

    async def _rebuild(self) -> None:
        """Redis lost its counters: reseed them from the ledger, then write a new epoch."""
        async with self._lock:
            if await self.redis.epoch() is not None:
                return  # another task (or replica) rebuilt them meanwhile
            log.warning(
                "redis has no epoch (restarted empty?): rebuilding counters from the ledger"
            )
            self._epoch = await self._reseed()

    async def _reseed(self) -> str:
        """Rebuild the counters in Redis (never the local store), then write the epoch last."""
        self.metrics.reseeds.inc()
        if self._reseed_hook is None:
            log.warning("no reseed hook: budgets restart from zero in this Redis")
        else:
            try:
                await self._reseed_hook(self.redis)
            except REDIS_DOWN:
                raise
            except Exception as exc:
                log.exception("rebuilding redis counters from the ledger failed")
                raise RebuildFailed(str(exc)) from exc
        return await self.redis.ensure_epoch()

    # --- outage and recovery -------------------------------------------------------

    async def _enter_outage(self, exc: BaseException) -> None:
        if self._degraded or self._closed:
            return
        self._degraded = True
        self.metrics.up.set(0)
        self.metrics.outages.inc()
        mode = (
            "admitting on local limits seeded from the last values seen (FAIL OPEN: "
            "limits are per process until it returns)"
            if self.on_outage == "open"
            else "refusing new requests with 503 (FAIL CLOSED)"
        )
        log.warning("redis unreachable (%s: %s): %s", type(exc).__name__, exc, mode)
        self._local = MemoryLimitStore()
        # MemoryLimitStore never suspends, so no other task runs before it is seeded.
        await self._local.seed(self._last_seen(time.time()), time.time())
        self._recovering = asyncio.get_running_loop().create_task(
            self._probe(), name="neogate-redis-recovery"
        )

    def _last_seen(self, now: float) -> list[CounterCheck]:
        """The counters as last seen in Redis: where the local fallback starts."""
        return [
            CounterCheck(k, v, None, ttl)
            for k, (v, ttl, at) in self._seen.items()
            if ttl is None or now - at < ttl
        ]

    async def _probe(self) -> None:
        while self._degraded and not self._closed:
            await asyncio.sleep(self._probe_interval)
            try:
                await self.reconcile()
            except _DOWN_OR_UNSEEDED:
                continue
            except Exception:
                log.exception("reconciling with redis failed; retrying")

    async def reconcile(self) -> None:
        """Bring this process back onto Redis, carrying outage-time deltas over exactly once."""
        async with self._lock:
            if not self._degraded:
                return
            await self.redis.client.ping()
            epoch = await self.redis.epoch()
            if epoch is None:
                log.warning("redis is back without its counters: rebuilding from the ledger")
                epoch = await self._reseed()
                self._drop_pending("redis lost its data; the ledger already counts them")
            elif epoch != self._epoch and self._epoch is not None:
                self._drop_pending("redis was rebuilt by another replica meanwhile")
            self._epoch = epoch
            while self._unsent or self._pending:
                if not self._unsent:
                    batch, self._pending = self._pending, {}
                    self._unsent.append((uuid.uuid4().hex, batch))
                transfer_id, batch = self._unsent[0]
                result = await self.redis.transfer(batch, epoch, transfer_id)
                self._unsent.pop(0)
                label = {1: "applied", 0: "duplicate", -1: "no_epoch", -2: "other_epoch"}
                self.metrics.transfers.labels(label.get(result, "unknown")).inc()
                if result < 0:
                    self._drop_pending("redis epoch changed during the transfer")
                    return  # the next probe reseeds
            # Nothing is pending and nothing awaited since the check: switch back now.
            self._degraded = False
            self.metrics.up.set(1)
            log.warning("redis is back: shared limits are exact again")

    def _drop_pending(self, why: str) -> None:
        n = len(self._pending) + sum(len(b) for _, b in self._unsent)
        if n:
            log.warning("dropping %d outage-time counter deltas: %s", n, why)
        self._pending.clear()
        self._unsent.clear()

    # --- bookkeeping ---------------------------------------------------------------

    def _add_pending(self, counters: Sequence[CounterCheck]) -> None:
        for c in counters:
            old = self._pending.get(c.key)
            amount = c.amount + (old.amount if old is not None else 0)
            self._pending[c.key] = CounterDelta(amount, c.ttl_s)

    def _remember(self, counters: Sequence[CounterCheck], applied: Applied, now: float) -> None:
        if len(self._seen) >= _MAX_SEEN:
            self._seen = {
                k: s for k, s in self._seen.items() if s[1] is not None and now - s[2] < s[1]
            }
            if len(self._seen) >= _MAX_SEEN:
                self._seen.clear()
        for c, value in zip(counters, applied.values, strict=True):
            self._seen[c.key] = (value, c.ttl_s, now)

    def pending_deltas(self) -> dict[str, int]:
        """Net outage-time changes not yet in Redis (for tests and the admin view)."""
        out = {k: d.amount for k, d in self._pending.items()}
        for _, batch in self._unsent:
            for k, d in batch.items():
                out[k] = out.get(k, 0) + d.amount
        return out
