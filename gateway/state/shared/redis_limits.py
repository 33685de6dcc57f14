"""The LimitStore in Redis: budget counters and GCRA rates, checked and applied atomically by Lua scripts.

Every process and replica that points at the same Redis and key prefix shares
one set of counters, so a tenant's limit holds across all of them instead of
multiplying by their number. Each operation is one script run: Redis executes
it without interleaving any other command, which is what makes `reserve`
all-or-nothing across processes.

Keys: ``<prefix>:lim:<admission key>`` for counters (integer, with the period's
TTL) and GCRA theoretical arrival times (seconds as a decimal string, expiring
once they lie in the past). ``<prefix>:epoch`` marks that the counters are
complete: it is written after the counters were seeded from the ledger, so when
Redis comes back empty (restart without persistence, FLUSHALL) every script sees
the epoch missing and refuses to act on counters that lost their history; the
caller reseeds and writes a new epoch (see `gateway.state.shared.outage`).

A single Redis (optionally with replicas and Sentinel) is supported, not Redis
Cluster: the scripts (`gateway.state.shared.limit_scripts`) touch keys of several tenants' periods
plus the epoch.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.config import RedisSpec, resolve_secret
from gateway.state.limits import CounterCheck, RateCheck, Refusal
from gateway.state.shared.limit_scripts import ADJUST, RESERVE, SEED, SEED_RATES, TRANSFER
from gateway.state.shared.resp import RespClient

# Errors that mean "Redis cannot answer now" (down, restarting, loading, failing over).
# A ResponseError from a script is a bug of ours and is not in this list.
REDIS_DOWN: Final[tuple[type[BaseException], ...]] = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.ReadOnlyError,
    rexc.MasterDownError,
    rexc.TryAgainError,
    OSError,
)

# A reply that arrives later than this is treated as an outage: admission sits on
# the request path, and a hung Redis must not hang every request with it.
DEFAULT_TIMEOUT_S: Final = 0.5
# Markers of applied transfers live this long, so a retried transfer is applied once.
TRANSFER_MARKER_TTL_S: Final = 86_400


class EpochMissing(Exception):
    """Redis has no epoch: its counters lost their history and must be reseeded first."""


def connect(
    spec: RedisSpec, *, timeout_s: float = DEFAULT_TIMEOUT_S, max_connections: int = 64
) -> aioredis.Redis:
    """A client for `spec` with short timeouts, a bounded pool and no silent retries.

    Requests beyond `max_connections` wait for a connection (each script takes well
    under a millisecond) instead of failing.

    redis-py retries a failed command by default; a script whose reply was lost
    may already have run, and running it again would count a request twice. So
    failures surface at once and `gateway.state.shared.outage` decides what to do.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        spec.url,
        max_connections=max_connections,
        timeout=timeout_s * 4,  # waiting for a free connection; past it: an outage
        password=resolve_secret(spec.password),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )
    client: aioredis.Redis = aioredis.Redis.from_pool(pool)
    return client


def connect_fast(spec: RedisSpec, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> RespClient | None:
    """The pipelined client for the limit scripts; None where it does not apply (TLS, sockets)."""
    if not spec.url.startswith("redis://"):
        return None
    return RespClient(spec.url, resolve_secret(spec.password), timeout_s)


def _ttl_ms(ttl_s: float | None) -> str:
    return "" if ttl_s is None else str(max(1, math.ceil(ttl_s * 1000)))


@dataclass(frozen=True, slots=True)
class Applied:
    """A reservation Redis applied, with each counter's value after it (for a local fallback)
    and, for a reservation, each rate's theoretical arrival time."""

    values: tuple[int, ...]
    tats: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class SyncReply:
    """What one sync read: processes sharing these limits now, and the keys' current state."""

    members: int
    values: tuple[int | None, ...]  # counters (None: absent)
    tats: tuple[float | None, ...]  # rates' theoretical arrival times (None: absent)


@dataclass(frozen=True, slots=True)
class CounterDelta:
    """A net change of one counter to carry into Redis (after an outage)."""

    amount: int
    ttl_s: float | None


class RedisLimitStore:
    """`LimitStore` over one Redis: exact across every process that shares it.

    Raises one of `REDIS_DOWN` when Redis cannot answer and `EpochMissing` when
    its counters lost their history; `gateway.state.shared.outage` turns both into a
    policy. `reserve_values` also returns the counters' new values.
    """

    def __init__(
        self, client: aioredis.Redis, key_prefix: str, fast: RespClient | None = None
    ) -> None:
        self.client = client
        self.fast = fast
        self.prefix = key_prefix
        self.epoch_key = f"{key_prefix}:epoch"
        self._reserve = client.register_script(RESERVE)
        self._adjust = client.register_script(ADJUST)
        self._seed = client.register_script(SEED)
        self._transfer = client.register_script(TRANSFER)
        self._seed_rates = client.register_script(SEED_RATES)
        self.members_key = f"{key_prefix}:members"

    def key(self, admission_key: str) -> str:
        return f"{self.prefix}:lim:{admission_key}"

    async def aclose(self) -> None:
        if self.fast is not None:
            await self.fast.aclose()
        await self.client.aclose()

    async def _run(self, script: Any, source: str, keys: list[str], args: list[str]) -> Any:
        """One script run: over the pipelined client when there is one, else redis-py."""
        if self.fast is not None:
            return await self.fast.evalsha(script.sha, source, keys, args)
        return await script(keys=keys, args=args)

    # --- the LimitStore protocol ---------------------------------------------------

    async def reserve(
        self, counters: Sequence[CounterCheck], rates: Sequence[RateCheck], now: float
    ) -> Refusal | None:
        result = await self.reserve_values(counters, rates, now)
        return result if isinstance(result, Refusal) else None

    async def adjust(
        self, counters: Sequence[CounterCheck], rates: Sequence[RateCheck], now: float
    ) -> None:
        await self.adjust_values(counters, rates, now)

    async def seed(self, counters: Sequence[CounterCheck], now: float) -> None:
        if not counters:
            return
        args: list[str] = []
        for c in counters:
            args += [str(int(c.amount)), _ttl_ms(c.ttl_s)]
        await self._seed(keys=[self.key(c.key) for c in counters], args=args)

    # --- beyond the protocol -------------------------------------------------------

    async def adjust_values(
        self, counters: Sequence[CounterCheck], rates: Sequence[RateCheck], now: float
    ) -> Applied:
        """`adjust`, returning the counters' new values."""
        keys = [self.epoch_key] + [self.key(c.key) for c in counters]
        keys += [self.key(r.key) for r in rates]
        args: list[str] = [repr(now), str(len(counters)), str(len(rates))]
        for c in counters:
            args += [str(int(c.amount)), _ttl_ms(c.ttl_s)]
        args += [repr(r.cost * r.interval_s) for r in rates]
        reply: list[Any] = await self._run(self._adjust, ADJUST, keys, args)
        if int(reply[0]) < 0:
            raise EpochMissing("redis has no epoch")
        return Applied(tuple(int(v) for v in reply[1:]))

    async def reserve_values(
        self, counters: Sequence[CounterCheck], rates: Sequence[RateCheck], now: float
    ) -> Refusal | Applied:
        """`reserve`, returning the counters' new values when it applied them."""
        keys = [self.epoch_key] + [self.key(c.key) for c in counters]
        keys += [self.key(r.key) for r in rates]
        args: list[str] = [repr(now), str(len(counters)), str(len(rates))]
        for c in counters:
            limit = "" if c.limit is None else str(int(c.limit))
            args += [str(int(c.amount)), limit, _ttl_ms(c.ttl_s)]
        for r in rates:
            args += [str(int(r.cost)), repr(r.interval_s), repr(r.burst_s)]
        reply: list[Any] = await self._run(self._reserve, RESERVE, keys, args)
        code = int(reply[0])
        if code == -1:
            raise EpochMissing("redis has no epoch")
        if code == 1:
            return Refusal(counters[int(reply[1]) - 1].key, None)
        if code == 2:
            return Refusal(rates[int(reply[1]) - 1].key, float(reply[2]))
        n = len(counters)
        return Applied(
            tuple(int(v) for v in reply[1 : n + 1]), tuple(float(v) for v in reply[n + 1 :])
        )

    async def epoch(self) -> str | None:
        """The current epoch, or None when Redis lost (or never had) its counters."""
        value = await self.client.get(self.epoch_key)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def ensure_epoch(self, candidate: str | None = None) -> str:
        """Write `candidate` (or a random id) as the epoch unless one exists; the one in force."""
        candidate = candidate or uuid.uuid4().hex
        await self.client.set(self.epoch_key, candidate, nx=True)
        value = await self.epoch()
        if value is None:  # deleted between the two commands: try once more
            await self.client.set(self.epoch_key, candidate, nx=True)
            value = await self.epoch()
        if value is None:
            raise EpochMissing("could not establish an epoch")
        return value

    async def transfer(
        self,
        deltas: Mapping[str, CounterDelta],
        epoch: str,
        transfer_id: str,
        rates: Mapping[str, float] | None = None,
        now: float = 0.0,
    ) -> int:
        """Add `deltas` (and push each rate in `rates` that many seconds on) once: a retry
        with the same `transfer_id` is a no-op.

        Returns 1 applied, 0 applied before, -1 Redis has no epoch, -2 another epoch
        (Redis lost its counters and was reseeded: the deltas are already in the ledger).
        """
        items = [(k, d) for k, d in deltas.items() if d.amount]
        pushes = [(k, v) for k, v in (rates or {}).items() if v > 0]
        keys = [self.epoch_key, f"{self.prefix}:xfer:{transfer_id}"]
        keys += [self.key(k) for k, _ in items] + [self.key(k) for k, _ in pushes]
        args = [epoch, str(TRANSFER_MARKER_TTL_S), repr(now), str(len(items))]
        for _, d in items:
            args += [str(int(d.amount)), _ttl_ms(d.ttl_s)]
        args += [repr(v) for _, v in pushes]
        return int(await self._transfer(keys=keys, args=args))

    async def seed_rates(self, tats: Mapping[str, float], now: float) -> None:
        """Raise rates' theoretical arrival times to `tats` where they are lower or absent."""
        if not tats:
            return
        keys = [self.key(k) for k in tats]
        await self._seed_rates(keys=keys, args=[repr(now), *(repr(t) for t in tats.values())])

    async def sync(
        self,
        origin: str,
        now: float,
        counters: Sequence[str],
        rates: Sequence[str],
        *,
        alive_s: float,
    ) -> SyncReply:
        """Say this process is alive, count the live ones, read counters' and rates' state."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.members_key, {origin: now})
        pipe.zremrangebyscore(self.members_key, "-inf", now - alive_s)
        pipe.zcard(self.members_key)
        pipe.pexpire(self.members_key, max(1, math.ceil(alive_s * 1000)))
        keys = [self.key(k) for k in (*counters, *rates)]
        if keys:
            pipe.mget(keys)
        reply = await pipe.execute()
        raw: list[Any] = reply[4] if keys else []
        n = len(counters)
        return SyncReply(
            max(1, int(reply[2])),
            tuple(None if v is None else int(v) for v in raw[:n]),
            tuple(None if v is None else float(v) for v in raw[n:]),
        )

    async def leave(self, origin: str) -> None:
        """This process stops sharing the limits (a clean shutdown): the others' share grows."""
        await self.client.zrem(self.members_key, origin)

    async def value(self, admission_key: str) -> int:
        """One counter's value (0 when absent): for tests and the admin view."""
        raw = await self.client.get(self.key(admission_key))
        return 0 if raw is None else int(raw)
