"""GPU uptime as the gateway observes it, and the hours a GPU is held over a window.

A local worker is up when the gateway's scrape of its `/metrics` succeeds. `UptimeTracker`
turns each process's scrapes into up intervals, [first success, last success] of a run of
successes: a failed scrape ends the run at its last success, and so does a silence longer
than `max_gap_s` (the process stopped scraping: killed, stalled); the next success starts
a new interval. The ledger keeps the intervals (`gpu_uptime`, written by the background
task, `gateway/metering/ledger/gpu_uptime.py`): the open one is rewritten with a later end
at each write, so a crash loses at most the time since the last write. Intervals of
several processes watching the same worker overlap; `covered_s` merges them.

Hours held (docs/economics.md): a `reserved` GPU is paid for the whole window; an
`on_demand` one for the union of its observed up intervals, clipped to the window. With
no interval overlapping the window neogate does not know whether the GPU was up (nobody
watched it, or a ledger from before uptime was kept): `Held.seconds` is None, "no uptime
observed", never 0 and never the window.

Pure: the clock is passed in, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

# A run of successful scrapes ends after this many scrape intervals without one.
GAP_INTERVALS = 2.0

HeldFrom = Literal["window", "uptime", "no uptime observed"]


@dataclass(frozen=True, slots=True)
class Span:
    """An interval [start, end] in unix seconds (the ledger's `ts` unit)."""

    start: float
    end: float


@dataclass(frozen=True, slots=True)
class UptimeRow:
    """One up interval of one backend as one process observed it: a `gpu_uptime` row."""

    backend: str
    up_from: float
    up_to: float


class UptimeTracker:
    """One process's up intervals per backend, and the ones the ledger has not heard yet.

    `up` and `down` are called by each scrape; `unwritten` gives the rows to upsert (keyed
    on backend and `up_from`: an open interval is the same row with a later `up_to`);
    `written` acknowledges a successful write. Rows that failed to write stay unwritten
    and go with the next write, however long the database is away.
    """

    def __init__(self) -> None:
        self._open: dict[str, Span] = {}
        self._unwritten: dict[tuple[str, float], float] = {}

    def up(self, backend: str, now: float, max_gap_s: float) -> None:
        """A scrape of `backend` succeeded at `now`."""
        cur = self._open.get(backend)
        if cur is None or now - cur.end > max_gap_s or now < cur.end:
            cur = Span(now, now)  # a new run (or the clock stepped back)
        else:
            cur = Span(cur.start, now)
        self._open[backend] = cur
        self._unwritten[(backend, cur.start)] = cur.end

    def down(self, backend: str) -> None:
        """A scrape of `backend` failed: its run ended at the last success."""
        self._open.pop(backend, None)

    def unwritten(self) -> list[UptimeRow]:
        """Rows changed since they were last written, oldest first."""
        rows = [UptimeRow(b, start, end) for (b, start), end in self._unwritten.items()]
        return sorted(rows, key=lambda r: (r.up_from, r.backend))

    def written(self, rows: Iterable[UptimeRow]) -> None:
        """`rows` reached the ledger; one extended since stays unwritten."""
        for r in rows:
            key = (r.backend, r.up_from)
            if self._unwritten.get(key) == r.up_to:
                del self._unwritten[key]


def merged(spans: Iterable[Span]) -> list[Span]:
    """The union of `spans` as disjoint spans in order (overlapping or touching ones joined)."""
    out: list[Span] = []
    for s in sorted(spans, key=lambda s: (s.start, s.end)):
        if out and s.start <= out[-1].end:
            if s.end > out[-1].end:
                out[-1] = Span(out[-1].start, s.end)
        else:
            out.append(s)
    return out


def covered_s(spans: Iterable[Span], since: float, until: float) -> float:
    """Seconds of [since, until] inside the union of `spans`."""
    clipped = (Span(max(s.start, since), min(s.end, until)) for s in spans)
    return sum(s.end - s.start for s in merged(c for c in clipped if c.end > c.start))


def overlapping(spans: Iterable[Span], since: float, until: float) -> list[Span]:
    """The spans that touch [since, until] (a zero-length one at an edge included)."""
    return [s for s in spans if s.end >= since and s.start <= until]


@dataclass(frozen=True, slots=True)
class Held:
    """How long a GPU was held over a window, and where that comes from."""

    seconds: float | None  # None: on_demand with no uptime observed in the window
    held_from: HeldFrom
    observed_s: float | None  # observed uptime in the window (None: none observed)


def held(mode: str, spans: Iterable[Span], since: float, until: float) -> Held:
    """Held time of a GPU in `mode` over [since, until] given its observed up spans."""
    window = max(until - since, 0.0)
    seen = overlapping(spans, since, until)
    observed = covered_s(seen, since, until) if seen else None
    if mode != "on_demand":
        return Held(window, "window", observed)
    if observed is None:
        return Held(None, "no uptime observed", None)
    return Held(observed, "uptime", observed)
