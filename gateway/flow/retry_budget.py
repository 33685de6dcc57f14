"""The retry budget: retries may add at most a fixed share of recent traffic, so an outage cannot multiply load.

Pure and clock-injected (`now` in monotonic seconds). Like the Finagle and
Envoy retry budgets: each client request deposits `ratio` of a retry; a retry
withdraws one; a small floor keeps retries possible on a quiet gateway. Here the
account is a sliding window of `window_s` seconds, so deposits and
withdrawals both age out and a burst of failures long ago does not block a
retry now.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryBudgetConfig:
    """How many retries the recent traffic pays for."""

    ratio: float = 0.2  # retries per client request
    min_retries: int = 100  # per window (10 per second), whatever the traffic
    window_s: float = 10.0
    buckets: int = 10

    def __post_init__(self) -> None:
        if self.ratio < 0 or self.min_retries < 0:
            raise ValueError("ratio and min_retries must be >= 0")
        if self.window_s <= 0 or self.buckets < 1:
            raise ValueError("window_s must be positive and buckets >= 1")


@dataclass(frozen=True, slots=True)
class RetryBudgetState:
    """The account as metrics show it."""

    requests: int  # client requests in the window
    retries: int  # retries spent in the window
    allowance: float  # retries the window allows: max(min_retries, ratio * requests)
    denied_total: int  # retries refused since the budget was built


class RetryBudget:
    """Counts client requests and spent retries over a sliding window.

    Call `on_request(now)` once per client request (not per attempt: retries and
    hedges do not earn budget), and `try_spend(now)` before every extra upstream
    attempt (a failover retry or a hedge); it records the retry when it says yes.
    """

    def __init__(self, config: RetryBudgetConfig | None = None) -> None:
        self.config = config or RetryBudgetConfig()
        self._width = self.config.window_s / self.config.buckets
        self._buckets: deque[list[int]] = deque()  # [bucket index, requests, retries]
        self._denied = 0

    def on_request(self, now: float) -> None:
        self._bucket(now)[1] += 1

    def try_spend(self, now: float) -> bool:
        """Spend one retry if the window's allowance has room; otherwise count a denial."""
        requests, retries = self._counts(now)
        if retries + 1 > self._allowance(requests):
            self._denied += 1
            return False
        self._bucket(now)[2] += 1
        return True

    def snapshot(self, now: float) -> RetryBudgetState:
        requests, retries = self._counts(now)
        return RetryBudgetState(requests, retries, self._allowance(requests), self._denied)

    def _allowance(self, requests: int) -> float:
        return max(float(self.config.min_retries), self.config.ratio * requests)

    def _counts(self, now: float) -> tuple[int, int]:
        self._expire(now)
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def _bucket(self, now: float) -> list[int]:
        idx = self._expire(now)
        if not self._buckets or self._buckets[-1][0] != idx:
            self._buckets.append([idx, 0, 0])
        return self._buckets[-1]

    def _expire(self, now: float) -> int:
        idx = int(now // self._width)
        while self._buckets and self._buckets[0][0] <= idx - self.config.buckets:
            self._buckets.popleft()
        return idx
