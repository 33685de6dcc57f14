"""Admission: budgets with reservations, GCRA rate limits, retry-after, seeding, settlement."""

from __future__ import annotations

import asyncio
import calendar
from decimal import Decimal

import pytest

from gateway.admission import (
    Admission,
    AdmissionRejected,
    MemoryLimitStore,
    TenantLimits,
    TenantSpend,
)

# 2025-06-15 12:00:00 UTC
NOON = float(calendar.timegm((2025, 6, 15, 12, 0, 0)))


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def admission(clock: Clock, **limits: float | int | None) -> Admission:
    return Admission({"acme": TenantLimits.of(**limits)}, MemoryLimitStore(), clock=clock)  # type: ignore[arg-type]


async def test_unknown_or_unlimited_tenant_is_admitted() -> None:
    adm = Admission({"free": TenantLimits()}, clock=Clock())
    r = await adm.reserve("free", 1000, 1.0)
    await adm.reserve("nobody", 1000, 1.0)
    assert adm.outstanding == 2
    await adm.settle(r, 10, 0.01)
    assert adm.outstanding == 1


async def test_two_concurrent_reservations_race_one_budget() -> None:
    adm = admission(Clock(), usd_per_day=1.0)
    results = await asyncio.gather(
        adm.reserve("acme", 100, 0.6), adm.reserve("acme", 100, 0.6), return_exceptions=True
    )
    admitted = [r for r in results if not isinstance(r, BaseException)]
    rejected = [r for r in results if isinstance(r, AdmissionRejected)]
    assert len(admitted) == 1 and len(rejected) == 1
    assert rejected[0].limit == "usd_per_day"


async def test_settlement_returns_unused_reservation() -> None:
    adm = admission(Clock(), usd_per_day=1.0)
    r = await adm.reserve("acme", 100, 0.9)
    with pytest.raises(AdmissionRejected):
        await adm.reserve("acme", 100, 0.2)
    await adm.settle(r, 50, 0.1)  # the request cost far less than estimated
    await adm.reserve("acme", 100, 0.8)
    with pytest.raises(AdmissionRejected):
        await adm.reserve("acme", 100, 0.2)


async def test_settling_twice_counts_once() -> None:
    adm = admission(Clock(), tokens_per_day=1000)
    r = await adm.reserve("acme", 500, 0)
    await adm.settle(r, 100, 0)
    await adm.settle(r, 100, 0)  # a repeat must not hand the estimate back a second time
    assert adm.outstanding == 0
    # Counted once, 100 tokens are spent: 901 more is one over the day's 1000...
    with pytest.raises(AdmissionRejected) as exc:
        await adm.reserve("acme", 901, 0)
    assert exc.value.limit == "tokens_per_day"
    await adm.reserve("acme", 900, 0)  # ...and 100 + 900 fits exactly


async def test_overspend_from_real_usage_blocks_later_requests() -> None:
    adm = admission(Clock(), tokens_total=1000)
    r = await adm.reserve("acme", 100, 0)
    await adm.settle(r, 1500, 0)  # real usage beyond the estimate is still charged
    with pytest.raises(AdmissionRejected) as exc:
        await adm.reserve("acme", 1, 0)
    assert exc.value.limit == "tokens_total"
    assert exc.value.retry_after_s is None  # waiting never helps a total budget


async def test_daily_budget_resets_at_utc_midnight_and_says_when() -> None:
    clock = Clock(NOON)
    adm = admission(clock, usd_per_day=1.0)
    await adm.reserve("acme", 10, 1.0)
    with pytest.raises(AdmissionRejected) as far:
        await adm.reserve("acme", 10, 0.5)
    assert far.value.retry_after_s is None  # 12 h away: not worth a retry-after
    assert "2025-06-16T00:00:00Z" in far.value.message
    clock.now = NOON + 11.5 * 3600  # 23:30
    with pytest.raises(AdmissionRejected) as near:
        await adm.reserve("acme", 10, 0.5)
    assert near.value.retry_after_s == pytest.approx(1800)
    clock.now = NOON + 12 * 3600 + 1  # next day
    await adm.reserve("acme", 10, 0.5)


async def test_monthly_budget_spans_days() -> None:
    clock = Clock(NOON)
    adm = admission(clock, usd_per_month=Decimal("2"))
    await adm.reserve("acme", 1, 1.5)
    clock.now += 86_400
    with pytest.raises(AdmissionRejected) as exc:
        await adm.reserve("acme", 1, 1.0)
    assert exc.value.limit == "usd_per_month"
    clock.now = float(calendar.timegm((2025, 7, 1, 0, 0, 1)))
    await adm.reserve("acme", 1, 1.0)


async def test_requests_per_minute_gcra_with_exact_retry_after() -> None:
    clock = Clock()
    adm = admission(clock, requests_per_minute=60)
    for _ in range(60):  # a full minute's burst is allowed at once
        await adm.reserve("acme", 1, 0)
    with pytest.raises(AdmissionRejected) as exc:
        await adm.reserve("acme", 1, 0)
    assert exc.value.limit == "requests_per_minute"
    assert exc.value.retry_after_s == pytest.approx(1.0)
    clock.now += 1.0
    await adm.reserve("acme", 1, 0)


async def test_tokens_per_minute_settles_to_real_tokens() -> None:
    clock = Clock()
    adm = admission(clock, tokens_per_minute=1000)
    r = await adm.reserve("acme", 800, 0)
    with pytest.raises(AdmissionRejected) as exc:
        await adm.reserve("acme", 300, 0)
    assert exc.value.limit == "tokens_per_minute"
    assert exc.value.retry_after_s == pytest.approx(6.0)  # 100 tokens at 1000/min
    await adm.settle(r, 200, 0)
    await adm.reserve("acme", 800, 0)


async def test_request_larger_than_tpm_can_never_pass() -> None:
    adm = admission(Clock(), tokens_per_minute=100)
    with pytest.raises(AdmissionRejected) as exc:
        await adm.reserve("acme", 101, 0)
    assert exc.value.retry_after_s is None


async def test_rejected_reservation_takes_nothing() -> None:
    adm = admission(Clock(), usd_per_day=1.0, requests_per_minute=2)
    await adm.reserve("acme", 1, 0.9)
    with pytest.raises(AdmissionRejected):
        await adm.reserve("acme", 1, 0.5)  # budget refuses: no rate credit is consumed
    await adm.reserve("acme", 1, 0.05)  # the second request of the minute still fits


async def test_budget_is_reported_before_rate_limit() -> None:
    adm = admission(Clock(), tokens_total=10, requests_per_minute=1)
    await adm.reserve("acme", 10, 0)
    with pytest.raises(AdmissionRejected) as exc:
        await adm.reserve("acme", 1, 0)
    assert exc.value.limit == "tokens_total"


async def test_seed_from_ledger_spend() -> None:
    adm = admission(Clock(), usd_per_day=1.0, tokens_per_month=10_000)
    await adm.seed({"acme": TenantSpend(day_nusd=900_000_000, day_tokens=10, month_tokens=9_990)})
    with pytest.raises(AdmissionRejected) as exc:
        await adm.reserve("acme", 5, 0.2)
    assert exc.value.limit == "usd_per_day"
    with pytest.raises(AdmissionRejected) as exc2:
        await adm.reserve("acme", 11, 0.01)
    assert exc2.value.limit == "tokens_per_month"
    await adm.reserve("acme", 10, 0.1)


def test_limits_from_config_specs() -> None:
    from gateway.config import BudgetSpec, RateLimitSpec

    lim = TenantLimits.from_specs(
        BudgetSpec(usd_per_day=2.5, tokens_total=10), RateLimitSpec(requests_per_minute=5)
    )
    assert lim.nusd_per_day == 2_500_000_000
    assert lim.tokens_total == 10 and lim.requests_per_minute == 5
    assert not lim.unlimited
    assert TenantLimits().unlimited
