"""Admission: budgets with reservations, GCRA rate limits, retry-after, seeding, settlement."""

from __future__ import annotations

import asyncio
import calendar
from decimal import Decimal

import pytest

from gateway.flow.admission import Admission, AdmissionRejected, TenantLimits
from gateway.metering.ledger.reports import TenantSpend
from gateway.state.limits import MemoryLimitStore

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


# --- pinned by mutation testing (make mutation): exact values at the boundaries ------------

DAY = 86_400.0
TODAY = "2025-06-15"


def test_limits_from_the_config_specs_keep_every_field() -> None:
    from gateway.config import BudgetSpec, RateLimitSpec

    budgets = BudgetSpec(
        usd_per_day=1.0,
        usd_per_month=2.0,
        usd_total=3.0,
        tokens_per_day=4,
        tokens_per_month=5,
        tokens_total=6,
    )
    rates = RateLimitSpec(requests_per_minute=7, tokens_per_minute=8)
    assert TenantLimits.from_specs(budgets, rates) == TenantLimits(
        1_000_000_000, 2_000_000_000, 3_000_000_000, 4, 5, 6, 7, 8
    )


def test_a_rejection_reads_as_its_message() -> None:
    exc = AdmissionRejected("usd_total", "over budget", None)
    assert str(exc) == "over budget" and exc.args == ("over budget",)


def test_a_counter_expires_at_its_deadline_not_after() -> None:
    store = MemoryLimitStore()
    from gateway.state.limits import CounterCheck

    asyncio.run(store.seed([CounterCheck("k", 5, None, 10.0)], 100.0))
    assert store.value("k", 109.999) == 5 and store.has("k", 109.999)
    assert store.value("k", 110.0) == 0 and not store.has("k", 110.0)
    assert store.value("missing", 0.0) == 0


async def test_seeding_fills_only_absent_or_empty_counters_with_their_ttl() -> None:
    from gateway.state.limits import CounterCheck

    store = MemoryLimitStore()
    await store.seed([CounterCheck("a", 7, None, 60.0), CounterCheck("forever", 3, None, None)], 0)
    await store.seed([CounterCheck("a", 99, None, 60.0)], 1.0)  # present and non-zero: kept
    assert store.value("a", 1.0) == 7
    assert store.has("a", 59.9) and not store.has("a", 60.0)
    assert store.has("forever", 1e12) and store.value("forever", 1e12) == 3
    await store.seed([CounterCheck("z", 0, None, 60.0)], 0)
    await store.seed([CounterCheck("z", 4, None, 60.0)], 1.0)  # present but zero: seeded again
    assert store.value("z", 1.0) == 4 and not store.has("z", 61.0)


async def test_applied_counters_keep_their_expiry_until_it_passes() -> None:
    from gateway.state.limits import CounterCheck

    store = MemoryLimitStore()
    assert await store.reserve([CounterCheck("k", 2, 10, 100.0)], [], 0.0) is None
    await store.adjust([CounterCheck("k", 3, None, 100.0)], [], 50.0)  # expiry stays at 100
    assert store.value("k", 99.0) == 5 and not store.has("k", 100.0)
    # Expired exactly now: the counter starts again from the delta with a fresh expiry.
    await store.adjust([CounterCheck("k", 1, None, 100.0)], [], 100.0)
    assert store.value("k", 100.0) == 1 and store.has("k", 199.0) and not store.has("k", 200.0)
    await store.adjust([CounterCheck("n", 1, None, None)], [], 0.0)
    assert store.has("n", 1e12)


async def test_settling_a_rate_moves_its_timestamp_by_cost_times_interval() -> None:
    from gateway.state.limits import RateCheck

    store = MemoryLimitStore()
    assert await store.reserve([], [RateCheck("r", 10, 0.5)], 100.0) is None
    assert store.tat("r") == 105.0  # 10 units x 0.5 s after now
    await store.adjust([], [RateCheck("r", -4, 0.5)], 101.0)
    assert store.tat("r") == 103.0
    await store.adjust([], [RateCheck("unknown", 4, 0.5)], 101.0)  # no timestamp: nothing
    assert store.tat("unknown") is None


async def test_the_store_forgets_expired_entries_every_4096_writes() -> None:
    from gateway.state.limits import CounterCheck, RateCheck

    store = MemoryLimitStore()
    await store.reserve([CounterCheck("old", 1, None, 1.0)], [RateCheck("r", 1, 1.0)], 0.0)
    for _ in range(4094):  # at 1.0 everything above has expired: only the sweep's turn is missing
        await store.adjust([CounterCheck("live", 1, None, None)], [], 1.0)
    assert "old" in store._counters and "r" in store._tat  # 4095 writes: not swept yet
    await store.adjust([CounterCheck("live", 1, None, None)], [], 1.0)  # the 4096th, at 1.0
    assert "old" not in store._counters and "r" not in store._tat  # expired exactly at 1.0
    assert store.value("live", 1.0) == 4095


async def test_admission_uses_the_store_it_is_given() -> None:
    store = MemoryLimitStore()
    limits = {"acme": TenantLimits.of(tokens_per_day=100)}
    adm = Admission(limits, store, clock=Clock())
    assert adm.store is store and adm.limits is limits
    r = await adm.reserve("acme", 40, 0)
    assert r.tenant == "acme" and r.tokens == 40
    assert store.value(f"acme:tok:d:{TODAY}", NOON) == 40
    free = await adm.reserve("nobody", 5, 0)
    assert free.tenant == "nobody" and free.tokens == 5
    new = {"acme": TenantLimits.of(tokens_per_day=10)}
    adm.update_limits(new)
    assert adm.limits is new


async def test_budget_counters_are_keyed_by_utc_period_and_expire() -> None:
    store = MemoryLimitStore()
    adm = Admission(
        {"acme": TenantLimits.of(usd_per_day=1, usd_per_month=1, usd_total=1, tokens_total=9)},
        store,
        clock=Clock(),
    )
    await adm.reserve("acme", 3, 0.25)
    # Kept two days (a day's counter outlives its day) and 33 days from the first write.
    for key, value, expires in (
        (f"acme:usd:d:{TODAY}", 250_000_000, NOON + 2 * DAY),
        ("acme:usd:m:2025-06", 250_000_000, NOON + 33 * DAY),
        ("acme:usd:t", 250_000_000, None),
        ("acme:tok:t", 3, None),
    ):
        assert store.value(key, NOON) == value, key
        if expires is None:
            assert store.has(key, 1e12), key
        else:
            assert store.has(key, expires - 1) and not store.has(key, expires), key


@pytest.mark.parametrize(
    ("now", "until"),
    [
        (NOON, "2025-07-01T00:00:00Z"),
        (float(calendar.timegm((2025, 12, 31, 23, 0, 0))), "2026-01-01T00:00:00Z"),
        (float(calendar.timegm((2025, 11, 30, 23, 0, 0))), "2025-12-01T00:00:00Z"),
    ],
)
async def test_a_monthly_budget_says_when_the_month_ends(now: float, until: str) -> None:
    adm = admission(Clock(now), tokens_per_month=10)
    await adm.reserve("acme", 10, 0)
    with pytest.raises(AdmissionRejected) as exc:
        await adm.reserve("acme", 1, 0)
    assert exc.value.limit == "tokens_per_month"
    assert (
        exc.value.message
        == f"tenant 'acme' has used its tokens_per_month budget of 10 tokens until {until}"
    )


async def test_budget_messages_name_the_amount_and_the_period() -> None:
    adm = admission(Clock(), usd_per_day=0.5, usd_total=2)
    await adm.reserve("acme", 1, 0.5)
    with pytest.raises(AdmissionRejected) as day:
        await adm.reserve("acme", 1, 0.01)
    assert day.value.message == (
        "tenant 'acme' has used its usd_per_day budget of 0.5 USD until 2025-06-16T00:00:00Z"
    )
    adm = admission(Clock(), usd_total=2)
    await adm.reserve("acme", 1, 2)
    with pytest.raises(AdmissionRejected) as total:
        await adm.reserve("acme", 1, 0.01)
    assert total.value.message == "tenant 'acme' has used its usd_total budget of 2 USD"
    assert total.value.retry_after_s is None


async def test_retry_after_only_when_the_request_fits_an_empty_budget_and_the_reset_is_near() -> (
    None
):
    # 23:00 UTC: the day resets in exactly 3600 s, which is not "near" (< RETRY_AFTER_MAX_S).
    eleven = float(calendar.timegm((2025, 6, 15, 23, 0, 0)))
    adm = admission(Clock(eleven), tokens_per_day=10)
    await adm.reserve("acme", 1, 0)
    with pytest.raises(AdmissionRejected) as exc:
        await adm.reserve("acme", 10, 0)
    assert exc.value.retry_after_s is None
    later = Clock(eleven + 1)  # 3599 s left; a request of exactly the whole budget fits it
    adm = admission(later, tokens_per_day=10)
    await adm.reserve("acme", 1, 0)
    with pytest.raises(AdmissionRejected) as fits:
        await adm.reserve("acme", 10, 0)
    assert fits.value.retry_after_s == 3599.0
    with pytest.raises(AdmissionRejected) as too_big:
        await adm.reserve("acme", 11, 0)
    assert too_big.value.retry_after_s is None


async def test_a_request_of_exactly_the_tpm_limit_is_admitted_one_more_is_refused() -> None:
    adm = admission(Clock(), tokens_per_minute=100)
    with pytest.raises(AdmissionRejected) as exc:
        await adm.reserve("acme", 101, 0)
    assert exc.value.limit == "tokens_per_minute" and exc.value.retry_after_s is None
    assert exc.value.message == (
        "request needs ~101 tokens, more than the tenant's limit of 100 tokens per minute"
    )
    await adm.reserve("acme", 100, 0)
    with pytest.raises(AdmissionRejected) as rate:
        await adm.reserve("acme", 100, 0)
    assert rate.value.message == "tenant 'acme' is over its limit of 100 tokens per minute"


async def test_release_hands_back_every_token_and_nano_dollar() -> None:
    adm = admission(Clock(), tokens_per_day=100, usd_per_day=1)
    r = await adm.reserve("acme", 100, 1)
    await adm.release(r)
    assert adm.outstanding == 0
    await adm.reserve("acme", 100, 1)  # the whole budget again: nothing was kept


async def test_a_settlement_after_the_period_ended_expires_with_it() -> None:
    store = MemoryLimitStore()
    clock = Clock()
    adm = Admission({"acme": TenantLimits.of(tokens_per_day=100)}, store, clock=clock)
    r = await adm.reserve("acme", 50, 0)
    clock.now = NOON + 3 * DAY  # the day's counter has expired
    await adm.settle(r, 10, 0)
    key = f"acme:tok:d:{TODAY}"
    assert store.has(key, clock.now) and not store.has(key, clock.now + 2 * DAY)


async def test_budget_tokens_are_held_instead_of_the_rate_estimate() -> None:
    store = MemoryLimitStore()
    adm = Admission({"acme": TenantLimits.of(tokens_per_day=100)}, store, clock=Clock())
    r = await adm.reserve("acme", 10, 0, budget_tokens=60)
    assert r.tokens == 60 and store.value(f"acme:tok:d:{TODAY}", NOON) == 60
    with pytest.raises(AdmissionRejected):
        await adm.reserve("acme", 10, 0, budget_tokens=41)


async def test_seeded_spend_expires_with_its_period() -> None:
    store = MemoryLimitStore()
    adm = Admission({"acme": TenantLimits.of(tokens_per_day=100)}, store, clock=Clock())
    await adm.seed({"acme": TenantSpend(day_nusd=5, day_tokens=7, total_tokens=9)})
    for key in (f"acme:usd:d:{TODAY}", f"acme:tok:d:{TODAY}"):
        assert store.has(key, NOON + 2 * DAY - 1) and not store.has(key, NOON + 2 * DAY), key
    assert store.value(f"acme:tok:d:{TODAY}", NOON) == 7
    assert store.has("acme:tok:t", 1e12) and store.value("acme:tok:t", NOON) == 9


def test_rates_can_be_seeded_with_their_timestamps() -> None:
    store = MemoryLimitStore()
    store.seed_rates({"acme:rpm": 123.5})
    assert store.tat("acme:rpm") == 123.5
