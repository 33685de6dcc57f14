"""Request and token budgets of a simulated provider, and its x-ratelimit-* headers.

Each budget is a bucket that refills continuously at `limit` per window (60 s x time_scale
for the per-minute ones, a day for requests per day), as OpenAI and Groq describe theirs:
`remaining` is what the bucket holds, `reset` the time until it is full again, formatted
like `7.66s`, `12ms` or `2m59.56s`.

Which budgets the headers describe depends on the provider (tests/fixtures/wire/):

- OpenAI-style (and Together): `x-ratelimit-*-requests` is the per-minute request budget;
- Groq (`groq_headers`): `x-ratelimit-*-requests` is the per-DAY request budget (RPD) and
  `x-ratelimit-*-tokens` the per-minute token budget; a per-minute request limit is
  enforced (429 with retry-after) but never reported in headers, as Groq does.
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
    # Requests per day; its window is a day at the same time scale as `window_s`.
    daily: Bucket | None = None
    # Groq's header semantics (see the module docstring).
    groq_headers: bool = False

    def set_limits(self, rpm: int | None, tpm: int | None) -> None:
        """(Re)configure the per-minute budgets; None removes one."""
        now = self.clock()
        self.requests = Bucket(rpm, self.window_s, updated=now) if rpm else None
        self.tokens = Bucket(tpm, self.window_s, updated=now) if tpm else None

    def set_daily(self, rpd: int | None) -> None:
        """(Re)configure the requests-per-day budget; None removes it."""
        day_s = self.window_s * 1440.0
        self.daily = Bucket(rpd, day_s, updated=self.clock()) if rpd else None

    def check(self, tokens: int) -> tuple[str, float] | None:
        """None if the request fits (and is charged), else (which budget, seconds to wait)."""
        now = self.clock()
        for name, bucket, amount in (
            ("requests", self.requests, 1),
            ("requests_per_day", self.daily, 1),
            ("tokens", self.tokens, tokens),
        ):
            if bucket is not None:
                wait = bucket.wait_s(amount, now)
                if wait > 0:
                    return name, wait
        if self.requests is not None:
            self.requests.take(1, now)
        if self.daily is not None:
            self.daily.take(1, now)
        if self.tokens is not None:
            self.tokens.take(tokens, now)
        return None

    def bucket(self, name: str) -> Bucket | None:
        """The budget `check` named."""
        return {"requests": self.requests, "requests_per_day": self.daily}.get(name, self.tokens)

    def headers(self) -> dict[str, str]:
        """x-ratelimit-* headers for every configured budget."""
        now = self.clock()
        out: dict[str, str] = {}
        # Groq reports its day budget under the requests names; OpenAI its minute budget.
        reqs = self.daily if self.groq_headers else self.requests
        for name, bucket in (("requests", reqs), ("tokens", self.tokens)):
            if bucket is None:
                continue
            out[f"x-ratelimit-limit-{name}"] = str(bucket.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(max(bucket.remaining(now), 0))
            out[f"x-ratelimit-reset-{name}"] = format_duration(bucket.reset_s(now))
        return out
