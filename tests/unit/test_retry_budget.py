"""Retry budget: retries capped at a share of recent traffic, with a floor, over a sliding window."""

from __future__ import annotations

import pytest

from gateway.flow.retry_budget import RetryBudget, RetryBudgetConfig

CFG = RetryBudgetConfig(ratio=0.2, min_retries=10, window_s=10.0, buckets=10)


def test_the_floor_allows_a_few_retries_on_a_quiet_gateway() -> None:
    b = RetryBudget(CFG)
    assert [b.try_spend(0.0) for _ in range(11)] == [True] * 10 + [False]
    s = b.snapshot(0.0)
    assert (s.requests, s.retries, s.allowance, s.denied_total) == (0, 10, 10.0, 1)


def test_retries_are_capped_at_the_ratio_of_requests() -> None:
    b = RetryBudget(CFG)
    for _ in range(1000):
        b.on_request(1.0)
    spent = sum(b.try_spend(1.0) for _ in range(300))
    assert spent == 200
    assert b.snapshot(1.0).allowance == 200.0


def test_spent_retries_and_requests_age_out_of_the_window() -> None:
    b = RetryBudget(CFG)
    for _ in range(100):
        b.on_request(0.0)
    assert sum(b.try_spend(1.0) for _ in range(30)) == 20
    assert not b.try_spend(9.9)
    # At t=10 the bucket of t=0 has left the window (the floor applies again) but the
    # retries spent at t=1 still count; at t=11 they are gone too.
    s = b.snapshot(10.0)
    assert (s.requests, s.retries, s.allowance) == (0, 20, 10.0)
    assert not b.try_spend(10.0)
    assert b.snapshot(11.0).retries == 0
    assert b.try_spend(11.0)


def test_an_outage_stays_under_a_quarter_of_extra_upstream_traffic() -> None:
    # 20 requests/s for 120 s, every one of which would like a retry (its backend is down).
    b = RetryBudget(CFG)
    requests = retries = 0
    for tick in range(120 * 20):
        now = tick / 20
        b.on_request(now)
        requests += 1
        retries += b.try_spend(now)
    assert (requests + retries) / requests < 1.25
    assert retries > 0.15 * requests  # the budget is used, not starved


@pytest.mark.parametrize(
    "kwargs", [{"ratio": -0.1}, {"min_retries": -1}, {"window_s": 0.0}, {"buckets": 0}]
)
def test_bad_configs_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryBudgetConfig(**kwargs)  # type: ignore[arg-type]
