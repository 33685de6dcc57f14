"""What an outage leaves to carry into Redis, and what a rebuild makes of it.

`Carryover` holds what one process changed locally while Redis was down: net counter
deltas in 1 ms slots (`OutageDeltas`), cut into batches that each carry a transfer id
(so a retried batch is applied once), and the rate credit used. An epoch says when the
ledger was read for a rebuild; deltas from before that cut-off are in the ledger and
are dropped (`Carryover.cut_at`).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from typing import Final

from gateway.state.limits import CounterCheck, MemoryLimitStore, RateCheck
from gateway.state.shared.redis_limits import CounterDelta


def make_epoch(cutoff: float) -> str:
    """An epoch id that also says when the ledger was read to build it."""
    return f"{uuid.uuid4().hex}@{cutoff!r}"


def epoch_cutoff(epoch: str) -> float:
    """The ledger-read time in an epoch; +inf (drop every delta) when it has none."""
    _, _, raw = epoch.partition("@")
    try:
        return float(raw)
    except ValueError:
        return math.inf


class OutageDeltas:
    """Net counter changes made locally, in 1 ms slots of the (wall) time they were made.

    The slot that holds the cut-off is dropped whole, so deltas made up to one slot
    after it go with it: with 10 ms slots that could be ~10 requests' reservations at
    1,000 req/s (the likely cause of one failure of the Redis-restart test, which
    allows 8); 1 ms keeps it to about one.
    """

    SLOTS_PER_S: Final = 1000

    def __init__(self) -> None:
        self._slots: dict[int, dict[str, CounterDelta]] = {}

    def __bool__(self) -> bool:
        return bool(self._slots)

    def add(self, counters: Sequence[CounterCheck], now: float) -> None:
        slot = self._slots.setdefault(math.floor(now * self.SLOTS_PER_S), {})
        for c in counters:
            old = slot.get(c.key)
            slot[c.key] = CounterDelta(c.amount + (old.amount if old else 0), c.ttl_s)

    def absorb(self, other: OutageDeltas) -> None:
        for index, deltas in other._slots.items():
            slot = self._slots.setdefault(index, {})
            for key, d in deltas.items():
                old = slot.get(key)
                slot[key] = CounterDelta(d.amount + (old.amount if old else 0), d.ttl_s)

    def drop_before(self, cutoff: float) -> int:
        """Forget slots that started before `cutoff`; returns how many deltas went."""
        first = math.ceil(cutoff * self.SLOTS_PER_S) if math.isfinite(cutoff) else None
        gone = [i for i in self._slots if first is None or i < first]
        count = sum(len(self._slots[i]) for i in gone)
        for i in gone:
            del self._slots[i]
        return count

    def merged(self) -> dict[str, CounterDelta]:
        out: dict[str, CounterDelta] = {}
        for deltas in self._slots.values():
            for key, d in deltas.items():
                old = out.get(key)
                out[key] = CounterDelta(d.amount + (old.amount if old else 0), d.ttl_s)
        return out


# A cut batch: (transfer id, counter deltas, rate pushes in seconds).
Batch = tuple[str, OutageDeltas, dict[str, float]]


class Carryover:
    """What this process changed locally during an outage and still owes Redis."""

    def __init__(self) -> None:
        self.pending = OutageDeltas()
        self.unsent: list[Batch] = []
        # Credit (seconds, at the configured rate) each rate used locally in this outage.
        self.rate_used: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self.unsent or self.pending or self.rate_used)

    def record(
        self, counters: Sequence[CounterCheck], rates: Sequence[RateCheck], now: float
    ) -> None:
        """A local change: counter deltas, and the (unscaled) rate credit it used."""
        self.pending.add(counters, now)
        for r in rates:
            self.rate_used[r.key] = self.rate_used.get(r.key, 0.0) + r.cost * r.interval_s

    def next_batch(self, local: MemoryLimitStore, share: int, clock: Callable[[], float]) -> Batch:
        """The oldest batch not yet acknowledged; the pending deltas cut into one if none is."""
        if not self.unsent:
            batch, self.pending = self.pending, OutageDeltas()
            self.unsent.append((uuid.uuid4().hex, batch, self._rate_pushes(local, share, clock())))
        return self.unsent[0]

    def sent(self) -> None:
        """Redis applied the oldest batch (now or before): forget it."""
        self.unsent.pop(0)

    def _rate_pushes(self, local: MemoryLimitStore, share: int, now: float) -> dict[str, float]:
        """How far to push each rate in Redis: the credit used here, while it still counts.

        A rate's local window holds `share` times the shared one, so what is left of this
        process's use by now is at most the local window's lead over now, divided by N.
        """
        pushes: dict[str, float] = {}
        for key, used in self.rate_used.items():
            tat = local.tat(key)
            lead = 0.0 if tat is None else max(0.0, tat - now) / share
            if min(used, lead) > 0:
                pushes[key] = min(used, lead)
        self.rate_used = {}
        return pushes

    def cut_at(self, cutoff: float) -> int:
        """Drop the deltas from before `cutoff`; keep (unbatch) the later ones. Returns how
        many deltas went.

        Rate pushes are not in the ledger: they are all kept.
        """
        for _, batch, pushes in self.unsent:
            self.pending.absorb(batch)
            for key, v in pushes.items():
                self.rate_used[key] = self.rate_used.get(key, 0.0) + v
        self.unsent.clear()
        return self.pending.drop_before(cutoff)

    def pending_deltas(self) -> dict[str, int]:
        """Net changes not yet in Redis."""
        total = OutageDeltas()
        total.absorb(self.pending)
        for _, batch, _ in self.unsent:
            total.absorb(batch)
        return {k: d.amount for k, d in total.merged().items() if d.amount}
