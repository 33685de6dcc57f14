"""Redis outages: fail open on local limits (flagged) or fail closed (503), and reconcile exactly once.

`FailoverLimitStore` is the `LimitStore` the gateway uses when Redis is
configured. While Redis answers, every operation is one Redis script. When it
stops answering:

- **fail open** (`on_outage: open`): reservations are decided by an in-process
  `MemoryLimitStore`. Each of the N processes sharing the limits (counted at the
  last sync, see below) gets 1/N of what was left: a budget counter starts at
  ``limit - (limit - value) / N`` of the value last synced (a key never seen:
  1/N of the whole limit), a rate keeps the theoretical arrival time last synced
  and each request moves it N times as far (1/N of the credit left, then 1/N of
  the rate). So N processes together stay within the budget and the rate. The
  `neogate_redis_up` gauge is 0, `neogate_limits_decided_locally_total` counts
  the local decisions, and a warning is logged once per outage.

Sync: every `sync_interval_s` (0.5 s) each process writes a heartbeat to
``<prefix>:members`` (a sorted set; N = the members seen within 3 intervals) and
reads the current values of the counters and rates it has used, so what it knows
at an outage is at most one interval old, even for tenants it served rarely.
- **fail closed** (`on_outage: closed`): `reserve` raises `SharedStateUnavailable`
  (503 `shared_state_unavailable` with `retry-after: 1`: the client may retry).

In both modes settlements (`adjust`) of requests already admitted cannot be
refused; they are applied locally. Every local change is also recorded as a
*pending* net delta per counter (in 1 ms slots of the time it was made).

Reconciliation, when a background probe reaches Redis again:

1. If the epoch is unchanged, Redis kept its counters: the pending deltas are
   cut into a batch with a fresh transfer id and added by one script that first
   writes a marker for that id. A batch whose reply was lost is retried with the
   same id, so it is applied once, never twice; changes made while it was in
   flight go into the next batch. Only when no delta is left does the store
   switch back to Redis (a synchronous step: nothing can slip in between).
   Because reservations and their settlements each land in exactly one place,
   Redis ends with exactly the sum it would have had without the outage.
2. If the epoch is missing, Redis lost its data: it is rebuilt from the ledger
   through the `reseed` hook (the ledger holds every completed request, those
   admitted locally included). The wall-clock time just before the ledger is read
   is the cut-off: the rebuild counts only attempts that finished before it, and it
   goes into the new epoch (``<id>@<time>``), written last. Local deltas are
   kept in 1 ms slots of the time they happened: slots before that cut-off are
   dropped (the ledger counts those requests), later ones are carried over as in 1.
   (Counting every row instead counted twice each request that finished between
   the cut-off and the read: once in the ledger, once in the carried deltas.)
3. If the epoch changed, another replica already did step 2: same cut-off rule,
   with the time read from its epoch.

Rate limits are not in the ledger, so they are rebuilt from what the processes
hold: a rebuild (2) first raises each rate to the theoretical arrival time this
process last synced, and every transfer (1, 2, 3) pushes each rate on by the
credit this process used locally (at most what its local window still holds). A
Redis that came back empty thus does not give every tenant a fresh minute.

What is lost in 2 and 3 is the reservation of a request that was in flight at
the cut-off (its settlement lands later, its reservation did not): an error of
one reservation per request in flight at that moment, which is the bound the
shared limits promise anyway. Replicas on different hosts compare their clocks
against the cut-off: keep them NTP-synchronised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Literal

from gateway.errors import GatewayError
from gateway.state.failures import FailureStreak
from gateway.state.limits import CounterCheck, LimitStore, MemoryLimitStore, RateCheck, Refusal
from gateway.state.shared.last_seen import LastSeen, share_start
from gateway.state.shared.metrics import SharedMetrics
from gateway.state.shared.outage_deltas import Carryover, epoch_cutoff, make_epoch
from gateway.state.shared.redis_limits import (
    REDIS_DOWN,
    Applied,
    EpochMissing,
    RedisLimitStore,
    SyncReply,
)

log = logging.getLogger("neogate.shared")

OnOutage = Literal["open", "closed"]
# Rebuilds a Redis that lost its data from the ledger, counting what finished before the cut-off.
Reseed = Callable[[LimitStore, float], Awaitable[None]]

PROBE_INTERVAL_S: Final = 0.25
SYNC_INTERVAL_S: Final = 0.5


class SharedStateUnavailable(GatewayError):
    """503: limits are shared through Redis, Redis is down and the gateway is set to fail closed."""

    status = 503
    error_type = "service_unavailable"
    default_code = "shared_state_unavailable"


class RebuildFailed(Exception):
    """Redis lost its counters and they could not be rebuilt from the ledger (yet)."""


# Either way the shared counters cannot be used now: the outage policy applies.
_DOWN_OR_UNSEEDED: Final[tuple[type[BaseException], ...]] = (*REDIS_DOWN, RebuildFailed)


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
        sync_interval_s: float = SYNC_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.origin = uuid.uuid4().hex
        self._sync_interval = sync_interval_s
        self.members = 1  # processes sharing these limits, at the last sync
        self._share = 1  # N in force for this outage's local decisions
        self._seen = LastSeen()  # counters and rates as Redis last reported them
        self._syncing: asyncio.Task[None] | None = None
        self._reconcile_streak = FailureStreak(log, "reconciling with redis (retried)")
        self._sync_streak = FailureStreak(log, "syncing limits with redis (retried)")
        self.on_outage = on_outage
        self.metrics = metrics if metrics is not None else SharedMetrics(None)
        self._reseed_hook = reseed
        self._probe_interval = probe_interval_s
        self._degraded = False
        self._epoch: str | None = None
        self._local = MemoryLimitStore()
        self._clock = clock
        self._carry = Carryover()  # local changes still owed to Redis
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
        if not self._degraded:
            with contextlib.suppress(*REDIS_DOWN):
                await self.sync()
        self._syncing = asyncio.get_running_loop().create_task(
            self._sync_loop(), name="neogate-redis-sync"
        )

    async def close(self) -> None:
        self._closed = True
        tasks = {t for t in (self._recovering, self._syncing) if t is not None}
        self._recovering = self._syncing = None
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a cancellation landing inside a redis-py read can be swallowed.
            await asyncio.wait(tasks, timeout=2.0)
        if not self._degraded:
            with contextlib.suppress(*REDIS_DOWN):
                await asyncio.wait_for(self.redis.leave(self.origin), 1.0)

    # --- sync ------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._sync_interval)
            if self._degraded:
                continue
            try:
                await self.sync()
            except _DOWN_OR_UNSEEDED as exc:
                await self._enter_outage(exc)
            except Exception as exc:
                self._sync_streak.failed(exc)  # the loop goes on; logged once per streak
            else:
                self._sync_streak.succeeded()

    async def sync(self) -> None:
        """Heartbeat, count the processes, refresh what this process knows of its keys."""
        now = self._clock()
        counters, rates = self._seen.to_sync(now)
        reply: SyncReply = await self.redis.sync(
            self.origin, now, counters, rates, alive_s=3 * self._sync_interval
        )
        self.members = reply.members
        self._seen.synced(counters, rates, reply, now)

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
                self._seen.remember(counters, result, now, rates)
                return None
        if self.on_outage == "closed":
            self.metrics.refused.inc()
            raise SharedStateUnavailable(
                "the gateway cannot check this tenant's limits now (shared state unavailable); "
                "retry shortly",
                retry_after_s=1.0,
            )
        self.metrics.local.labels("reserve").inc()
        await self._share_unseen(counters, now)
        refusal = await self._local.reserve(counters, self._scaled(rates), now)
        if refusal is None:
            self._carry.record(counters, rates, now)
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
        await self._local.adjust(counters, self._scaled(rates), now)
        self._carry.record(counters, rates, now)

    # --- the local share -------------------------------------------------------------

    def _scaled(self, rates: Sequence[RateCheck]) -> list[RateCheck]:
        """Each of N processes gets 1/N of a rate: every unit costs N times the interval."""
        n = self._share
        return [RateCheck(r.key, r.cost, r.interval_s * n, r.burst_s) for r in rates]

    async def _share_unseen(self, counters: Sequence[CounterCheck], now: float) -> None:
        """A budget this process never synced: assume it unspent, and take 1/N of it."""
        fresh = [
            CounterCheck(c.key, share_start(0, c.limit, self._share), None, c.ttl_s)
            for c in counters
            if c.limit is not None and not self._local.has(c.key, now)
        ]
        if fresh:
            await self._local.seed(fresh, now)

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
            self._seen.remember(counters, applied, now)
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
        """Rebuild the counters in Redis (never the local store), then write the epoch last.

        The epoch carries the time the ledger was read: deltas from before it are in it.
        """
        self.metrics.reseeds.inc()
        cutoff = self._clock()
        if self._reseed_hook is None:
            log.warning("no reseed hook: budgets restart from zero in this Redis")
        else:
            try:
                await self._reseed_hook(self.redis, cutoff)
            except REDIS_DOWN:
                raise
            except Exception as exc:
                log.exception("rebuilding redis counters from the ledger failed")
                raise RebuildFailed(str(exc)) from exc
        # Rates are not in the ledger: rebuild them from the times this process last saw.
        await self.redis.seed_rates(self._seen.rate_times(), cutoff)
        return await self.redis.ensure_epoch(make_epoch(cutoff))

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
        self._share = max(1, self.members)
        log.warning(
            "redis unreachable (%s: %s): %s; this process takes 1/%d of what was left",
            type(exc).__name__,
            exc,
            mode,
            self._share,
        )
        self._local = MemoryLimitStore()
        # MemoryLimitStore never suspends, so no other task runs before it is seeded.
        now = self._clock()
        await self._local.seed(self._seen.local_start(now, self._share), now)
        self._local.seed_rates({k: t for k, t in self._seen.rate_times().items() if t > now})
        self._recovering = asyncio.get_running_loop().create_task(
            self._probe(), name="neogate-redis-recovery"
        )

    async def _probe(self) -> None:
        while self._degraded and not self._closed:
            await asyncio.sleep(self._probe_interval)
            try:
                await self.reconcile()
            except _DOWN_OR_UNSEEDED:
                continue
            except Exception as exc:
                self._reconcile_streak.failed(exc)  # once per streak, with a count
            else:
                self._reconcile_streak.succeeded()

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
                self._cut_at(epoch, "redis lost its data; the ledger counts them")
            elif self._epoch is not None and epoch != self._epoch:
                self._cut_at(epoch, "redis was rebuilt by another replica meanwhile")
            self._epoch = epoch
            while self._carry:
                transfer_id, batch, pushes = self._carry.next_batch(
                    self._local, self._share, self._clock
                )
                result = await self.redis.transfer(
                    batch.merged(), epoch, transfer_id, pushes, self._clock()
                )
                label = {1: "applied", 0: "duplicate", -1: "no_epoch", -2: "other_epoch"}
                self.metrics.transfers.labels(label.get(result, "unknown")).inc()
                if result < 0:
                    return  # rebuilt meanwhile: the next probe applies the new cut-off
                self._carry.sent()
            # Nothing is pending and nothing awaited since the check: switch back now.
            self._degraded = False
            self.metrics.up.set(1)
            log.warning("redis is back: shared limits are exact again")

    def _cut_at(self, epoch: str, why: str) -> None:
        """Drop the deltas from before `epoch`'s ledger read; keep the later ones."""
        dropped = self._carry.cut_at(epoch_cutoff(epoch))
        if dropped:
            log.warning("dropping %d outage-time counter deltas: %s", dropped, why)

    def pending_deltas(self) -> dict[str, int]:
        """Net outage-time changes not yet in Redis (for tests and the admin view)."""
        return self._carry.pending_deltas()
