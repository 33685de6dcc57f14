"""The limit store: budget counters and GCRA rates that admission checks and applies in one step.

`LimitStore` is what `gateway.flow.admission.Admission` reserves against;
`MemoryLimitStore` is the single-process one, and `gateway.state.shared` holds the one
in Redis and the one that fails over between them. The protocol is shaped for a Redis
Lua script: `reserve` gets every check with its key, amount, limit and TTL, checks all,
and applies all or none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

MINUTE_S = 60.0


@dataclass(frozen=True, slots=True)
class CounterCheck:
    """Add `amount` to counter `key` unless that takes it past `limit`; keep it `ttl_s`."""

    key: str
    amount: int
    limit: int | None
    ttl_s: float | None


@dataclass(frozen=True, slots=True)
class RateCheck:
    """GCRA: `cost` units, each worth `interval_s`; at most `burst_s` of credit ahead of now."""

    key: str
    cost: int
    interval_s: float
    burst_s: float = MINUTE_S


@dataclass(frozen=True, slots=True)
class Refusal:
    """Which check failed and, for rates, when it would pass."""

    key: str
    retry_after_s: float | None


class LimitStore(Protocol):
    """Counters and GCRA timestamps shared by every process that admits requests.

    `reserve` is all-or-nothing: it checks every counter (current + amount <= limit)
    and rate, and only if all pass applies them all; otherwise it returns the FIRST
    failing check in the order given and changes nothing. `adjust` adds signed
    deltas (settlement) without checking. `seed` sets counters that do not exist.
    """

    async def reserve(
        self, counters: Sequence[CounterCheck], rates: Sequence[RateCheck], now: float
    ) -> Refusal | None: ...

    async def adjust(
        self, counters: Sequence[CounterCheck], rates: Sequence[RateCheck], now: float
    ) -> None: ...

    async def seed(self, counters: Sequence[CounterCheck], now: float) -> None: ...


class MemoryLimitStore:
    """The single-process LimitStore: plain dicts, atomic because nothing here awaits."""

    def __init__(self) -> None:
        self._counters: dict[str, tuple[int, float | None]] = {}  # key -> (value, expires_at)
        self._tat: dict[str, float] = {}
        self._ops = 0

    def value(self, key: str, now: float) -> int:
        value, expires = self._counters.get(key, (0, None))
        return 0 if expires is not None and expires <= now else value

    async def reserve(
        self, counters: Sequence[CounterCheck], rates: Sequence[RateCheck], now: float
    ) -> Refusal | None:
        for c in counters:
            if c.limit is not None and self.value(c.key, now) + c.amount > c.limit:
                return Refusal(c.key, None)
        new_tats: list[tuple[str, float]] = []
        for r in rates:
            tat = max(self._tat.get(r.key, now), now) + r.cost * r.interval_s
            if tat - now > r.burst_s:
                return Refusal(r.key, tat - now - r.burst_s)
            new_tats.append((r.key, tat))
        self._apply(counters, now)
        self._tat.update(new_tats)
        return None

    async def adjust(
        self, counters: Sequence[CounterCheck], rates: Sequence[RateCheck], now: float
    ) -> None:
        self._apply(counters, now)
        for r in rates:
            if r.key in self._tat:
                self._tat[r.key] += r.cost * r.interval_s

    async def seed(self, counters: Sequence[CounterCheck], now: float) -> None:
        for c in counters:
            if c.key not in self._counters or self.value(c.key, now) == 0:
                self._counters[c.key] = (c.amount, None if c.ttl_s is None else now + c.ttl_s)

    def has(self, key: str, now: float) -> bool:
        """Whether counter `key` exists (and has not expired)."""
        entry = self._counters.get(key)
        return entry is not None and (entry[1] is None or entry[1] > now)

    def tat(self, key: str) -> float | None:
        """Rate `key`'s theoretical arrival time, if it has one."""
        return self._tat.get(key)

    def seed_rates(self, tats: Mapping[str, float]) -> None:
        """Start rates at these theoretical arrival times (a share of what was left)."""
        self._tat.update(tats)

    def _apply(self, counters: Sequence[CounterCheck], now: float) -> None:
        for c in counters:
            value = self.value(c.key, now)
            _, expires = self._counters.get(c.key, (0, None))
            if expires is None or expires <= now:
                expires = None if c.ttl_s is None else now + c.ttl_s
            self._counters[c.key] = (value + c.amount, expires)
        self._ops += 1
        if self._ops % 4096 == 0:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        # Expired period counters and long-idle rate timestamps would otherwise pile up.
        self._counters = {k: v for k, v in self._counters.items() if v[1] is None or v[1] > now}
        self._tat = {k: t for k, t in self._tat.items() if t > now}
