"""Per-backend circuit breaking: eject a failing backend for a growing interval, probe it back in.

Pure and clock-injected: every method takes `now` (monotonic seconds, any
consistent source such as `loop.time()`); nothing here reads a clock.

    closed ──(N consecutive failures, or failure rate over the window)──> open
    open ──(now >= open_until)──> half_open
    half_open ──(the one probe succeeds)──> closed
    half_open ──(the probe fails)──> open, for a longer interval
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

State = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When to eject a backend and for how long."""

    consecutive_failures: int = 5
    # The rate rule only applies once the window holds at least `min_requests` outcomes,
    # so two failures out of three requests on a quiet backend do not eject it.
    failure_rate: float = 0.5
    min_requests: int = 20
    window_s: float = 30.0
    buckets: int = 10
    base_ejection_s: float = 5.0
    max_ejection_s: float = 300.0
    ejection_multiplier: float = 2.0
    # Closed this long without a new ejection: the next ejection starts from the base again.
    reset_after_s: float = 120.0
    # A probe whose outcome is never reported stops blocking the next probe after this long.
    probe_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1 or self.min_requests < 1 or self.buckets < 1:
            raise ValueError("consecutive_failures, min_requests and buckets must be >= 1")
        if not 0.0 < self.failure_rate <= 1.0:
            raise ValueError("failure_rate must be in (0, 1]")
        if self.window_s <= 0 or self.base_ejection_s <= 0 or self.probe_timeout_s <= 0:
            raise ValueError("window_s, base_ejection_s and probe_timeout_s must be positive")
        if self.max_ejection_s < self.base_ejection_s or self.ejection_multiplier < 1.0:
            raise ValueError("max_ejection_s must be >= base_ejection_s, multiplier >= 1")

    def ejection_s(self, streak: int) -> float:
        """The interval of the `streak`-th ejection in a row (1-based)."""
        grown = self.base_ejection_s * self.ejection_multiplier ** max(0, streak - 1)
        return min(self.max_ejection_s, grown)


@dataclass(frozen=True, slots=True)
class BreakerState:
    """What /admin/backends and the metrics show of one breaker."""

    state: State
    consecutive_failures: int
    failure_rate: float  # over the current window; 0.0 when it is empty
    open_until: float | None  # the `now`-clock time the ejection ends; None unless open
    ejections: int  # ejections in a row (sets the next interval); 0 after sustained success
    ejections_total: int  # every ejection since the breaker was built
    window_requests: int  # outcomes in the current window

    @property
    def code(self) -> int:
        """A gauge value: 0 closed, 1 half_open, 2 open."""
        return {"closed": 0, "half_open": 1, "open": 2}[self.state]


class _Window:
    """Successes and failures over the last `window_s`, in fixed buckets so memory stays bounded."""

    __slots__ = ("_buckets", "_n", "_width")

    def __init__(self, window_s: float, buckets: int) -> None:
        self._width = window_s / buckets
        self._n = buckets
        self._buckets: deque[list[int]] = deque()  # [bucket index, successes, failures]

    def add(self, now: float, failed: bool) -> None:
        idx = self._expire(now)
        if not self._buckets or self._buckets[-1][0] != idx:
            self._buckets.append([idx, 0, 0])
        self._buckets[-1][2 if failed else 1] += 1

    def counts(self, now: float) -> tuple[int, int]:
        self._expire(now)
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def clear(self) -> None:
        self._buckets.clear()

    def _expire(self, now: float) -> int:
        idx = int(now // self._width)
        while self._buckets and self._buckets[0][0] <= idx - self._n:
            self._buckets.popleft()
        return idx


class CircuitBreaker:
    """The health of one backend as seen by the gateway's own attempts.

    Report an attempt's outcome once it is known (for streams: at the first
    event): `on_success` when the backend answered (a pass-through 4xx is the
    client's fault and also counts as an answer), `on_failure` for retryable
    failures (unreachable, 5xx, 429, timeout), `on_release` when an allowed
    attempt ends with no verdict (cancelled). In half_open any verdict decides,
    including one from an attempt allowed before the ejection: it is fresh news.
    """

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        self._state: State = "closed"
        self._window = _Window(self.config.window_s, self.config.buckets)
        self._consecutive = 0
        self._open_until = 0.0
        self._closed_since = 0.0
        self._streak = 0
        self._total = 0
        self._probe_since: float | None = None  # set while the half-open probe is out

    def available(self, now: float) -> bool:
        """Whether `allow` would let a request through now; consumes nothing (for routing)."""
        self._advance(now)
        return self._state == "closed" or (self._state == "half_open" and self._probe_since is None)

    def allow(self, now: float) -> bool:
        """Admit one attempt; in half_open only one probe at a time gets through."""
        self._advance(now)
        if self._state == "closed":
            return True
        if self._state == "half_open" and self._probe_since is None:
            self._probe_since = now
            return True
        return False

    def on_success(self, now: float) -> None:
        self._advance(now)
        if self._state == "closed":
            self._window.add(now, failed=False)
            self._consecutive = 0
        elif self._state == "half_open":
            self._state = "closed"
            self._closed_since = now
            self._probe_since = None
            self._consecutive = 0
            self._window.clear()
        # open: a late success of an attempt allowed before the ejection does not cut it short

    def on_failure(self, now: float) -> None:
        self._advance(now)
        if self._state == "closed":
            self._window.add(now, failed=True)
            self._consecutive += 1
            ok, bad = self._window.counts(now)
            n, cfg = ok + bad, self.config
            over_rate = n >= cfg.min_requests and bad >= cfg.failure_rate * n
            if self._consecutive >= cfg.consecutive_failures or over_rate:
                self._eject(now)
        elif self._state == "half_open":
            self._consecutive += 1
            self._eject(now)
        # open: late failures of attempts allowed before the ejection change nothing

    def on_release(self, now: float) -> None:
        """An allowed attempt ended with no verdict: free the probe slot if it held it."""
        self._advance(now)
        if self._state == "half_open":
            self._probe_since = None

    def snapshot(self, now: float) -> BreakerState:
        self._advance(now)
        ok, bad = self._window.counts(now)
        return BreakerState(
            state=self._state,
            consecutive_failures=self._consecutive,
            failure_rate=bad / (ok + bad) if ok + bad else 0.0,
            open_until=self._open_until if self._state == "open" else None,
            ejections=self._streak,
            ejections_total=self._total,
            window_requests=ok + bad,
        )

    def _eject(self, now: float) -> None:
        self._streak += 1
        self._total += 1
        self._state = "open"
        self._open_until = now + self.config.ejection_s(self._streak)
        self._probe_since = None
        self._window.clear()

    def _advance(self, now: float) -> None:
        """Apply the transitions that only the passing of time causes."""
        if self._state == "open" and now >= self._open_until:
            self._state = "half_open"
            self._probe_since = None
        probe = self._probe_since
        if probe is not None and now - probe >= self.config.probe_timeout_s:
            self._probe_since = None  # only ever set in half_open
        if (
            self._state == "closed"
            and self._streak
            and now - self._closed_since >= self.config.reset_after_s
        ):
            self._streak = 0


class BreakerBoard:
    """One breaker per backend name, created on first use with that backend's config."""

    def __init__(
        self,
        default: BreakerConfig | None = None,
        overrides: dict[str, BreakerConfig] | None = None,
    ) -> None:
        self._default = default or BreakerConfig()
        self._overrides = dict(overrides or {})
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, backend: str) -> CircuitBreaker:
        breaker = self._breakers.get(backend)
        if breaker is None:
            breaker = CircuitBreaker(self._overrides.get(backend, self._default))
            self._breakers[backend] = breaker
        return breaker

    def reconfigure(
        self,
        backends: Iterable[str],
        default: BreakerConfig | None = None,
        overrides: dict[str, BreakerConfig] | None = None,
    ) -> None:
        """After a config reload: drop removed backends; keep state where the config is unchanged."""
        self._default = default or self._default
        self._overrides = dict(overrides) if overrides is not None else self._overrides
        keep = set(backends)
        for name in list(self._breakers):
            wanted = self._overrides.get(name, self._default)
            if name not in keep or self._breakers[name].config != wanted:
                del self._breakers[name]

    def snapshots(self, now: float) -> dict[str, BreakerState]:
        return {name: b.snapshot(now) for name, b in sorted(self._breakers.items())}
