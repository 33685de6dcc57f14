"""Per-minute request and token budgets of a simulated provider, and its x-ratelimit-* headers.

Each budget is a bucket that refills continuously at `limit` per window (60 s x time_scale),
as OpenAI and Groq describe theirs: `remaining` is what the bucket holds, `reset` the time
until it is full again, formatted like `7.66s`, `12ms` or `1m0s`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `12ms`, `7.66s`, `1m0s`, `2m59.56s`, `1h0m0s`."""
    if seconds < 1.0:
        return f"{math.ceil(seconds * 1000)}ms"
    hours, rest = divmod(seconds, 3600.0)
    minutes, secs = divmod(rest, 60.0)
    text = f"{round(secs, 2):.2f}".rstrip("0").rstrip(".") + "s"
    if hours >= 1:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes >= 1:
        return f"{int(minutes)}m{text}"
    return text


@dataclass
class Bucket:
    """A budget of `limit` units per `window_s`, refilled continuously."""

    limit: int
    window_s: float
    level: float = field(default=-1.0)
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.level < 0:
            self.level = float(self.limit)

    def _refill(self, now: float) -> None:
        rate = self.limit / self.window_s
        self.level = min(float(self.limit), self.level + (now - self.updated) * rate)
        self.updated = now

    def remaining(self, now: float) -> int:
        """Whole units available now."""
        self._refill(now)
        return int(self.level)

    def reset_s(self, now: float) -> float:
        """Seconds until the bucket is full."""
        self._refill(now)
        return (self.limit - self.level) * self.window_s / self.limit

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` units are available (inf if it exceeds the limit)."""
        self._refill(now)
        if amount > self.limit:
            return math.inf
        return max(0.0, (amount - self.level) * self.window_s / self.limit)

    def take(self, amount: float, now: float) -> None:
        """Spend `amount` units (the caller checked wait_s)."""
        self._refill(now)
        self.level -= amount

    def set_remaining(self, amount: float, now: float) -> None:
        """Force the level (control endpoint)."""
        self._refill(now)
        self.level = float(amount)


@dataclass
class RateLimits:
    """The request and token budgets of one provider."""

    clock: Callable[[], float]
    window_s: float
    requests: Bucket | None = None
    tokens: Bucket | None = None

    def set_limits(self, rpm: int | None, tpm: int | None) -> None:
        """(Re)configure the budgets; None removes one."""
        now = self.clock()
        self.requests = Bucket(rpm, self.window_s, updated=now) if rpm else None
        self.tokens = Bucket(tpm, self.window_s, updated=now) if tpm else None

    def check(self, tokens: int) -> tuple[str, float] | None:
        """None if the request fits (and is charged), else (which budget, seconds to wait)."""
        now = self.clock()
        if self.requests is not None:
            wait = self.requests.wait_s(1, now)
            if wait > 0:
                return "requests", wait
        if self.tokens is not None:
            wait = self.tokens.wait_s(tokens, now)
            if wait > 0:
                return "tokens", wait
        if self.requests is not None:
            self.requests.take(1, now)
        if self.tokens is not None:
            self.tokens.take(tokens, now)
        return None

    def headers(self) -> dict[str, str]:
        """x-ratelimit-* headers for every configured budget."""
        now = self.clock()
        out: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            out[f"x-ratelimit-limit-{name}"] = str(bucket.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(max(bucket.remaining(now), 0))
            out[f"x-ratelimit-reset-{name}"] = format_duration(bucket.reset_s(now))
        return out
