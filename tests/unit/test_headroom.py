"""Rate-limit headers to headroom, 429 cool-downs, and the near-limit predicate."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from policies.headroom import (
    Headroom,
    mark_429,
    near_limit,
    parse_reset,
    parse_retry_after,
)

GROQ_HEADERS = {
    "x-ratelimit-limit-requests": "14400",
    "x-ratelimit-limit-tokens": "18000",
    "x-ratelimit-remaining-requests": "14370",
    "x-ratelimit-remaining-tokens": "17997",
    "x-ratelimit-reset-requests": "2m59.56s",
    "x-ratelimit-reset-tokens": "7.66s",
}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7.66s", 7.66),
        ("12ms", 0.012),
        ("1m0s", 60.0),
        ("2h3m4.5s", 7384.5),
        ("6m0.5s", 360.5),
        ("0s", 0.0),
        ("5", 5.0),
        (" 1.5 ", 1.5),
        ("250us", 0.00025),
    ],
)
def test_parse_reset(text: str, seconds: float) -> None:
    assert parse_reset(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "1x", "1m 2s", "-3s", "inf", "nan", "1s2"])
def test_parse_reset_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_reset(text)


def test_from_headers_reads_groq_headers_case_insensitively() -> None:
    h = Headroom.from_headers(CIMultiDict({k.upper(): v for k, v in GROQ_HEADERS.items()}), 100.0)
    assert (h.limit_requests, h.limit_tokens) == (14400, 18000)
    assert (h.remaining_requests, h.remaining_tokens) == (14370, 17997)
    assert h.reset_requests_at == pytest.approx(279.56)
    assert h.reset_tokens_at == pytest.approx(107.66)
    assert (h.cooldown_until, h.observed_at) == (None, 100.0)


def test_from_headers_keeps_what_a_response_omits_and_ignores_garbage() -> None:
    first = Headroom.from_headers(GROQ_HEADERS, 100.0)
    later = Headroom.from_headers(
        {"X-RateLimit-Remaining-Tokens": "900", "x-ratelimit-reset-tokens": "soon"}, 101.0, first
    )
    assert later.remaining_tokens == 900
    assert later.limit_tokens == 18000 and later.remaining_requests == 14370
    assert later.reset_tokens_at == first.reset_tokens_at
    assert Headroom.from_headers({"content-type": "x"}, 5.0, first) is first


def test_retry_after_parsing() -> None:
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert parse_retry_after({}) is None


def test_429_cool_down() -> None:
    h = mark_429(Headroom(), 4.0, now=10.0)
    assert h.cooling_down(13.9) and not h.cooling_down(14.0)
    assert near_limit(h, 1, 12.0)
    # No retry-after: a default short cool-down; a shorter second 429 never shortens it.
    assert mark_429(Headroom(), None, now=0.0).cooldown_until == 1.0
    assert mark_429(h, 1.0, now=11.0).cooldown_until == 14.0
    # Fresh headers after the cool-down keep it until it expires.
    assert Headroom.from_headers(GROQ_HEADERS, 11.0, h).cooldown_until == 14.0


def test_near_limit_on_tokens_and_requests() -> None:
    h = Headroom.from_headers(GROQ_HEADERS, 100.0)
    assert not near_limit(h, 1000, 100.0)
    # 17997 - 17500 = 497 left, below 5% of 18000 (900).
    assert near_limit(h, 17_500, 100.0)
    few_requests = Headroom(limit_requests=30, remaining_requests=2, observed_at=0.0)
    assert near_limit(few_requests, 10, 0.0)
    assert not near_limit(Headroom(remaining_requests=2), 10, 0.0)  # no limit known: 1 is spare
    assert not near_limit(Headroom(), 10**9, 0.0)


def test_near_limit_projects_refill_until_reset() -> None:
    h = Headroom(limit_tokens=10_000, remaining_tokens=0, reset_tokens_at=10.0, observed_at=0.0)
    assert near_limit(h, 100, 0.0)
    # Linear refill: half way to the reset, half the window is back.
    assert h.projected_remaining_tokens(5.0) == pytest.approx(5000)
    assert not near_limit(h, 1000, 5.0)
    assert not near_limit(h, 9000, 10.0)
    assert near_limit(h, 9999, 10.0)  # past reset: the full window, minus the 5% reserve
