"""Provider rate-limit headroom: `x-ratelimit-*` / `retry-after` headers to an immutable value.

Times are absolute on the caller's clock (`now` is passed in, never read here), so the
same value works with `time.monotonic()` in the gateway and simulated time in tests.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

# Used when a 429 carries no usable retry-after.
DEFAULT_COOLDOWN_S = 1.0
# Keep this fraction of a known limit in reserve: "near" the limit before it is hit.
DEFAULT_RESERVE_FRACTION = 0.05

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_reset(text: str) -> float:
    """Seconds in a reset header: "7.66s", "12ms", "1m0s", "2h3m4.5s" (Go durations) or "5".

    Raises ValueError on anything else.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"bad duration {text!r}")
        return value
    total = 0.0
    pos = 0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            raise ValueError(f"bad duration {text!r}")
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"bad duration {text!r}")
    return total


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (delta-seconds); None if absent.

    An HTTP-date retry-after is not interpreted (it needs the wall clock): None.
    """
    lowered = _lower(headers, ("retry-after-ms", "retry-after"))
    ms = lowered.get("retry-after-ms")
    if ms is not None:
        try:
            v = float(ms)
        except ValueError:
            v = math.nan
        if math.isfinite(v) and v >= 0:
            return v / 1000.0
    sec = lowered.get("retry-after")
    if sec is not None:
        try:
            v = float(sec)
        except ValueError:
            return None
        if math.isfinite(v) and v >= 0:
            return v
    return None


def _lower(headers: Mapping[str, str], wanted: tuple[str, ...]) -> dict[str, str]:
    """The wanted headers by lower-case name, whether or not the mapping is case-insensitive."""
    out: dict[str, str] = {}
    for k, v in headers.items():
        lk = k.lower()
        if lk in wanted:
            out[lk] = v
    return out


_RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)


def int_or_none(v: str | None) -> int | None:
    """A header's integer value (a float is truncated); None if absent or not a number."""
    if v is None:
        return None
    try:
        return int(float(v))
    except ValueError:
        return None


def reset_at(v: str | None, now: float) -> float | None:
    """When a reset header's window ends (`now` + its duration); None if absent or unreadable."""
    if v is None:
        return None
    try:
        return now + parse_reset(v)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Headroom:
    """What a provider last told us about its limits; None means unknown (treated as ample).

    `limit_*` / `remaining_*` requests and tokens are the short window a provider enforces
    per minute (or per second: Together); `*_output_tokens` a separate budget of generated
    tokens (Fireworks); `daily_*` a requests-per-day bucket (Groq's request headers), which
    is not the binding per-minute window. `window_s` is the window's length where the
    provider sends no reset time, so the projection still refills.
    """

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_at: float | None = None
    reset_tokens_at: float | None = None
    cooldown_until: float | None = None
    observed_at: float | None = None
    limit_output_tokens: int | None = None
    remaining_output_tokens: int | None = None
    daily_limit_requests: int | None = None
    daily_remaining_requests: int | None = None
    daily_reset_at: float | None = None
    window_s: float | None = None

    @classmethod
    def from_headers(
        cls, headers: Mapping[str, str], now: float, previous: Headroom | None = None
    ) -> Headroom:
        """Read OpenAI's `x-ratelimit-*` headers; fields a response omits keep the previous value.

        Malformed values are ignored rather than raised: a provider's odd header must never
        fail a request that already succeeded. A cool-down in `previous` is kept.
        """
        h = _lower(headers, _RATE_HEADERS)
        base = previous if previous is not None else cls()
        if not h:
            return base
        return base.updated(
            now,
            limit_requests=int_or_none(h.get("x-ratelimit-limit-requests")),
            limit_tokens=int_or_none(h.get("x-ratelimit-limit-tokens")),
            remaining_requests=int_or_none(h.get("x-ratelimit-remaining-requests")),
            remaining_tokens=int_or_none(h.get("x-ratelimit-remaining-tokens")),
            reset_requests_at=reset_at(h.get("x-ratelimit-reset-requests"), now),
            reset_tokens_at=reset_at(h.get("x-ratelimit-reset-tokens"), now),
        )

    def updated(self, now: float, **fields: float | int | None) -> Headroom:
        """A copy observed at `now` with the given fields set; None values keep the old ones."""
        changes = {k: v for k, v in fields.items() if v is not None}
        return replace(self, observed_at=now, **changes)  # type: ignore[arg-type]

    def cooling_down(self, now: float) -> bool:
        """True while a 429's retry-after has not passed."""
        return self.cooldown_until is not None and now < self.cooldown_until

    def _reset(self, reset_at: float | None) -> float | None:
        if reset_at is not None or self.window_s is None or self.observed_at is None:
            return reset_at
        return self.observed_at + self.window_s

    def projected_remaining_tokens(self, now: float) -> float | None:
        """Remaining tokens now, assuming the bucket refills linearly until its reset time."""
        return _project(
            self.remaining_tokens,
            self.limit_tokens,
            self.observed_at,
            self._reset(self.reset_tokens_at),
            now,
        )

    def projected_remaining_requests(self, now: float) -> float | None:
        """Remaining requests now, assuming linear refill until the reset time."""
        return _project(
            self.remaining_requests,
            self.limit_requests,
            self.observed_at,
            self._reset(self.reset_requests_at),
            now,
        )

    def projected_remaining_output_tokens(self, now: float) -> float | None:
        """Remaining generated-token budget now (linear refill over the window)."""
        return _project(
            self.remaining_output_tokens,
            self.limit_output_tokens,
            self.observed_at,
            self._reset(None),
            now,
        )

    def projected_daily_remaining(self, now: float) -> float | None:
        """Requests left today (Groq refills its daily bucket gradually: its reset says when full)."""
        return _project(
            self.daily_remaining_requests,
            self.daily_limit_requests,
            self.observed_at,
            self.daily_reset_at,
            now,
        )


@dataclass(frozen=True, slots=True)
class OwnUsage:
    """What the gateway itself sent one provider over the last minute (its own estimate)."""

    requests_per_min: float = 0.0
    prompt_tokens_per_min: float = 0.0
    output_tokens_per_min: float = 0.0


@dataclass(frozen=True, slots=True)
class KnownLimits:
    """Per-minute limits an operator knows but the provider does not send (Groq's RPM)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


def with_own_usage(h: Headroom, own: OwnUsage, known: KnownLimits | None = None) -> Headroom:
    """Fill in what the provider does not say from the gateway's own traffic.

    A limit without a remaining count (Fireworks sends only its limits; an operator's
    `rate_limits` for Groq's unsent requests per minute) becomes `limit - own use in the
    last minute`. Counts the provider does send win: they include other clients.
    """
    limit_requests, limit_tokens = h.limit_requests, h.limit_tokens
    remaining_requests, remaining_tokens = h.remaining_requests, h.remaining_tokens
    if known is not None and remaining_requests is None and known.requests_per_minute:
        limit_requests = known.requests_per_minute
    if known is not None and remaining_tokens is None and known.tokens_per_minute:
        limit_tokens = known.tokens_per_minute
    if remaining_requests is None and limit_requests is not None:
        remaining_requests = max(0, int(limit_requests - own.requests_per_min))
    if remaining_tokens is None and limit_tokens is not None:
        used = own.prompt_tokens_per_min
        if h.limit_output_tokens is None:  # one budget for prompt and output tokens
            used += own.output_tokens_per_min
        remaining_tokens = max(0, int(limit_tokens - used))
    remaining_output = h.remaining_output_tokens
    if remaining_output is None and h.limit_output_tokens is not None:
        remaining_output = max(0, int(h.limit_output_tokens - own.output_tokens_per_min))
    if (limit_requests, remaining_requests, limit_tokens, remaining_tokens, remaining_output) == (
        h.limit_requests,
        h.remaining_requests,
        h.limit_tokens,
        h.remaining_tokens,
        h.remaining_output_tokens,
    ):
        return h
    return replace(
        h,
        limit_requests=limit_requests,
        remaining_requests=remaining_requests,
        limit_tokens=limit_tokens,
        remaining_tokens=remaining_tokens,
        remaining_output_tokens=remaining_output,
        # Derived from our own rate: it holds "now", not at the last header.
        reset_requests_at=None if h.remaining_requests is None else h.reset_requests_at,
        reset_tokens_at=None if h.remaining_tokens is None else h.reset_tokens_at,
    )


def _project(
    remaining: int | None,
    limit: int | None,
    observed_at: float | None,
    reset_at: float | None,
    now: float,
) -> float | None:
    if remaining is None:
        return None
    if reset_at is None:
        return float(remaining)
    if now >= reset_at:
        # Past the reset the window is full again; without a limit we only know "not less".
        return float(limit) if limit is not None else math.inf
    if limit is None or observed_at is None or reset_at <= observed_at or limit <= remaining:
        return float(remaining)
    frac = (now - observed_at) / (reset_at - observed_at)
    return remaining + (limit - remaining) * (frac if frac > 0 else 0.0)


def mark_429(
    headroom: Headroom,
    retry_after_s: float | None,
    now: float,
    default_s: float = DEFAULT_COOLDOWN_S,
) -> Headroom:
    """The headroom after a 429: no use before `now + retry_after_s` (or a default)."""
    wait = retry_after_s if retry_after_s is not None and retry_after_s > 0 else default_s
    until = now + wait
    if headroom.cooldown_until is not None and headroom.cooldown_until > until:
        until = headroom.cooldown_until
    return replace(headroom, cooldown_until=until, observed_at=now)


def near_limit(
    headroom: Headroom,
    request_tokens: int,
    now: float,
    *,
    reserve_fraction: float = DEFAULT_RESERVE_FRACTION,
    output_tokens: int | None = None,
) -> bool:
    """True if this request would take the provider into the last `reserve_fraction` of a limit.

    Cooling down after a 429 also counts. Unknown limits never count as near. A separate
    output budget (Fireworks) is checked against `output_tokens` (the request's whole
    `request_tokens` when not given); a daily request bucket only when it is all but spent.
    """
    if headroom.cooldown_until is not None and now < headroom.cooldown_until:
        return True
    checks = (
        (headroom.projected_remaining_tokens(now), headroom.limit_tokens, request_tokens),
        (headroom.projected_remaining_requests(now), headroom.limit_requests, 1),
        (
            headroom.projected_remaining_output_tokens(now),
            headroom.limit_output_tokens,
            request_tokens if output_tokens is None else output_tokens,
        ),
    )
    for remaining, limit, need in checks:
        if remaining is not None:
            reserve = reserve_fraction * limit if limit else 0.0
            if remaining - need < reserve:
                return True
    daily = headroom.projected_daily_remaining(now)
    return daily is not None and daily < 1
