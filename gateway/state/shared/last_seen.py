"""What one process last saw of the shared limits in Redis: where its fail-open fallback starts.

Every counter and rate a reservation or settlement touched is remembered with the value
Redis returned, and refreshed at each sync (`FailoverLimitStore.sync`), so what a
process knows when Redis stops answering is at most one sync interval old. At an outage
each of N processes starts from 1/N of what was left (`share_start`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from gateway.state.limits import CounterCheck, RateCheck
from gateway.state.shared.redis_limits import Applied, SyncReply

# Keys not used for this long are no longer synced (their tenant went quiet).
_SYNC_KEEP_S: Final = 3600.0
# Counter values seen from Redis are kept for the fail-open fallback; this bounds them.
_MAX_SEEN: Final = 100_000


class LastSeen:
    """Counters and rates as Redis last reported them to this process."""

    def __init__(self) -> None:
        # Counters: key -> (value, ttl, when seen, limit, when used).
        self.counters: dict[str, tuple[int, float | None, float, int | None, float]] = {}
        # Rates: key -> (theoretical arrival time, when seen, when used).
        self.rates: dict[str, tuple[float, float, float]] = {}

    def to_sync(self, now: float) -> tuple[list[str], list[str]]:
        """The counter and rate keys to read at a sync (those used within the last hour)."""
        self.forget_unused(now)
        return list(self.counters), list(self.rates)

    def synced(
        self, counters: Sequence[str], rates: Sequence[str], reply: SyncReply, now: float
    ) -> None:
        """Take the values a sync read for `counters` and `rates` (keys forgotten meanwhile stay so)."""
        for key, value in zip(counters, reply.values, strict=True):
            old = self.counters.get(key)
            if old is not None:
                self.counters[key] = (value or 0, old[1], now, old[3], old[4])
        for key, tat in zip(rates, reply.tats, strict=True):
            seen = self.rates.get(key)
            if seen is not None:
                self.rates[key] = (tat if tat is not None else now, now, seen[2])

    def forget_unused(self, now: float) -> None:
        cut = now - _SYNC_KEEP_S
        if any(s[4] < cut for s in self.counters.values()):
            self.counters = {k: s for k, s in self.counters.items() if s[4] >= cut}
        if any(r[2] < cut for r in self.rates.values()):
            self.rates = {k: r for k, r in self.rates.items() if r[2] >= cut}

    def remember(
        self,
        counters: Sequence[CounterCheck],
        applied: Applied,
        now: float,
        rates: Sequence[RateCheck] = (),
    ) -> None:
        """What Redis returned for an operation on `counters` (and, for a reservation, `rates`)."""
        if len(self.counters) >= _MAX_SEEN:
            self.counters = {
                k: s for k, s in self.counters.items() if s[1] is not None and now - s[2] < s[1]
            }
            if len(self.counters) >= _MAX_SEEN:
                self.counters.clear()
        for c, value in zip(counters, applied.values, strict=True):
            old = self.counters.get(c.key)
            limit = c.limit if c.limit is not None or old is None else old[3]
            self.counters[c.key] = (value, c.ttl_s, now, limit, now)
        if len(self.rates) >= _MAX_SEEN:
            self.rates = {k: r for k, r in self.rates.items() if r[0] > now}
        for r, tat in zip(rates, applied.tats, strict=False):
            self.rates[r.key] = (tat, now, now)

    def local_start(self, now: float, share: int) -> list[CounterCheck]:
        """Where the local fallback starts: 1/N of what was left at the last sync."""
        return [
            CounterCheck(k, share_start(v, limit, share), None, ttl)
            for k, (v, ttl, at, limit, _) in self.counters.items()
            if ttl is None or now - at < ttl
        ]

    def rate_times(self) -> dict[str, float]:
        """Each rate's theoretical arrival time as last seen."""
        return {k: r[0] for k, r in self.rates.items()}


def share_start(value: int, limit: int | None, share: int) -> int:
    """A local counter's start: the budget as synced, less all but 1/`share` of what is left."""
    if limit is None or share <= 1 or value >= limit:
        return value
    return limit - (limit - value) // share
