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


def _int_or_none(v: str | None) -> int | None:
    if v is None:
        return None
    try:
        return int(float(v))
    except ValueError:
        return None


def _reset_at(v: str | None, now: float) -> float | None:
    if v is None:
        return None
    try:
        return now + parse_reset(v)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Headroom:
    """What a provider last told us about its limits; None means unknown (treated as ample)."""

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_at: float | None = None
    reset_tokens_at: float | None = None
    cooldown_until: float | None = None
    observed_at: float | None = None

    @classmethod
    def from_headers(
        cls, headers: Mapping[str, str], now: float, previous: Headroom | None = None
    ) -> Headroom:
        """Read `x-ratelimit-*` headers; fields a response omits keep the previous value.

        Malformed values are ignored rather than raised: a provider's odd header must never
        fail a request that already succeeded. A cool-down in `previous` is kept.
        """
        h = _lower(headers, _RATE_HEADERS)
        base = previous if previous is not None else cls()
        if not h:
            return base
        lr = _int_or_none(h.get("x-ratelimit-limit-requests"))
        lt = _int_or_none(h.get("x-ratelimit-limit-tokens"))
        rr = _int_or_none(h.get("x-ratelimit-remaining-requests"))
        rt = _int_or_none(h.get("x-ratelimit-remaining-tokens"))
        ar = _reset_at(h.get("x-ratelimit-reset-requests"), now)
        at = _reset_at(h.get("x-ratelimit-reset-tokens"), now)
        return cls(
            limit_requests=lr if lr is not None else base.limit_requests,
            limit_tokens=lt if lt is not None else base.limit_tokens,
            remaining_requests=rr if rr is not None else base.remaining_requests,
            remaining_tokens=rt if rt is not None else base.remaining_tokens,
            reset_requests_at=ar if ar is not None else base.reset_requests_at,
            reset_tokens_at=at if at is not None else base.reset_tokens_at,
            cooldown_until=base.cooldown_until,
            observed_at=now,
        )

    def cooling_down(self, now: float) -> bool:
        """True while a 429's retry-after has not passed."""
        return self.cooldown_until is not None and now < self.cooldown_until

    def projected_remaining_tokens(self, now: float) -> float | None:
        """Remaining tokens now, assuming the bucket refills linearly until its reset time."""
        return _project(
            self.remaining_tokens, self.limit_tokens, self.observed_at, self.reset_tokens_at, now
        )

    def projected_remaining_requests(self, now: float) -> float | None:
        """Remaining requests now, assuming linear refill until the reset time."""
        return _project(
            self.remaining_requests,
            self.limit_requests,
            self.observed_at,
            self.reset_requests_at,
            now,
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
) -> bool:
    """True if this request would take the provider into the last `reserve_fraction` of a limit.

    Cooling down after a 429 also counts. Unknown limits never count as near.
    """
    if headroom.cooldown_until is not None and now < headroom.cooldown_until:
        return True
    if headroom.remaining_tokens is not None:
        rt = headroom.projected_remaining_tokens(now)
        if rt is not None:
            reserve = reserve_fraction * headroom.limit_tokens if headroom.limit_tokens else 0.0
            if rt - request_tokens < reserve:
                return True
    if headroom.remaining_requests is not None:
        rr = headroom.projected_remaining_requests(now)
        if rr is not None:
            reserve = reserve_fraction * headroom.limit_requests if headroom.limit_requests else 0.0
            if rr - 1 < reserve:
                return True
    return False
