"""Circuit breaker: ejection by consecutive failures and by rate, growing intervals, one half-open probe."""

from __future__ import annotations

import pytest

from gateway.state.breaker import BreakerBoard, BreakerConfig, CircuitBreaker

CFG = BreakerConfig(
    consecutive_failures=5,
    failure_rate=0.5,
    min_requests=20,
    window_s=10.0,
    buckets=10,
    base_ejection_s=5.0,
    max_ejection_s=30.0,
    ejection_multiplier=2.0,
    reset_after_s=60.0,
    probe_timeout_s=3.0,
)


def fail_n(b: CircuitBreaker, n: int, now: float) -> None:
    for _ in range(n):
        assert b.allow(now)
        b.on_failure(now)


def test_consecutive_failures_open_the_breaker() -> None:
    b = CircuitBreaker(CFG)
    fail_n(b, 4, 100.0)
    assert b.snapshot(100.0).state == "closed"
    assert b.snapshot(100.0).consecutive_failures == 4
    b.on_failure(100.5)
    s = b.snapshot(100.5)
    assert (s.state, s.open_until, s.ejections, s.ejections_total) == ("open", 105.5, 1, 1)
    assert not b.allow(101.0)
    assert not b.available(105.4)


def test_a_success_resets_the_consecutive_count() -> None:
    b = CircuitBreaker(BreakerConfig(consecutive_failures=5, min_requests=1000))
    for i in range(10):
        fail_n(b, 4, float(i))
        b.on_success(float(i))
    s = b.snapshot(9.0)
    assert s.state == "closed"
    assert s.consecutive_failures == 0


def test_failure_rate_over_the_window_opens_once_min_requests_seen() -> None:
    b = CircuitBreaker(CFG)
    # Alternating outcomes never reach 5 in a row; the 20th outcome makes the rate rule apply.
    for i in range(19):
        if i % 2:
            b.on_failure(0.0)
        else:
            b.on_success(0.0)
    s = b.snapshot(0.0)
    assert (s.state, s.window_requests) == ("closed", 19)
    assert s.failure_rate == pytest.approx(9 / 19)
    b.on_failure(0.0)
    assert b.snapshot(0.0).state == "open"


def test_a_high_rate_below_min_requests_does_not_open() -> None:
    b = CircuitBreaker(BreakerConfig(consecutive_failures=100, min_requests=20))
    for _ in range(19):
        b.on_failure(0.0)
    s = b.snapshot(0.0)
    assert s.state == "closed"
    assert s.failure_rate == 1.0


def test_old_outcomes_leave_the_window() -> None:
    b = CircuitBreaker(CFG)
    for _ in range(10):
        b.on_success(0.0)
        b.on_failure(0.0)
        b.on_success(0.0)
    assert b.snapshot(0.0).window_requests == 30
    # 10 s later the first bucket has aged out: the window is empty again.
    s = b.snapshot(10.0)
    assert (s.window_requests, s.failure_rate) == (0, 0.0)
    for _ in range(4):
        b.on_failure(10.0)
    assert b.snapshot(10.0).state == "closed"  # 4 failures of 4 requests: under min_requests


def test_half_open_lets_exactly_one_probe_through() -> None:
    b = CircuitBreaker(CFG)
    fail_n(b, 5, 0.0)
    assert not b.allow(4.9)
    assert b.available(5.0)
    assert b.snapshot(5.0).state == "half_open"
    assert b.available(5.0)  # asking does not take the probe
    assert b.allow(5.0)
    assert not b.allow(5.1)
    assert not b.available(5.1)
    b.on_success(5.2)
    s = b.snapshot(5.2)
    assert (s.state, s.consecutive_failures, s.open_until) == ("closed", 0, None)
    assert b.allow(5.3) and b.allow(5.3)


def test_failed_probes_grow_the_ejection_up_to_the_cap() -> None:
    b = CircuitBreaker(CFG)
    fail_n(b, 5, 0.0)
    now, intervals = 0.0, []
    for _ in range(5):
        until = b.snapshot(now).open_until
        assert until is not None
        intervals.append(until - now)
        now = until
        assert b.allow(now)
        b.on_failure(now)
    assert intervals == [5.0, 10.0, 20.0, 30.0, 30.0]
    assert b.snapshot(now).ejections == 6


def test_sustained_success_resets_the_ejection_growth() -> None:
    b = CircuitBreaker(CFG)
    fail_n(b, 5, 0.0)
    assert b.allow(5.0)
    b.on_success(5.0)
    fail_n(b, 5, 6.0)
    assert b.snapshot(6.0).open_until == 16.0  # second ejection in a row: doubled
    assert b.allow(16.0)
    b.on_success(16.0)
    assert b.snapshot(75.9).ejections == 2
    assert b.snapshot(76.0).ejections == 0  # closed for reset_after_s
    fail_n(b, 5, 80.0)
    s = b.snapshot(80.0)
    assert (s.open_until, s.ejections, s.ejections_total) == (85.0, 1, 3)


def test_an_unreported_probe_stops_blocking_after_the_probe_timeout() -> None:
    b = CircuitBreaker(CFG)
    fail_n(b, 5, 0.0)
    assert b.allow(5.0)
    assert not b.allow(7.9)
    assert b.allow(8.0)


def test_release_frees_the_probe_slot_without_a_verdict() -> None:
    b = CircuitBreaker(CFG)
    fail_n(b, 5, 0.0)
    assert b.allow(5.0)
    b.on_release(5.5)
    assert b.snapshot(5.5).state == "half_open"
    assert b.allow(5.5)
    b.on_release(6.0)
    b.on_release(6.0)  # releasing twice, or in closed state, is harmless
    assert b.allow(6.0)


def test_late_outcomes_while_open_change_nothing() -> None:
    b = CircuitBreaker(CFG)
    fail_n(b, 5, 0.0)
    b.on_success(1.0)
    b.on_failure(2.0)
    s = b.snapshot(2.0)
    assert (s.state, s.open_until, s.ejections) == ("open", 5.0, 1)


def test_state_codes_for_the_gauge() -> None:
    b = CircuitBreaker(CFG)
    assert b.snapshot(0.0).code == 0
    fail_n(b, 5, 0.0)
    assert b.snapshot(0.0).code == 2
    assert b.snapshot(5.0).code == 1


def test_board_keeps_one_breaker_per_backend_and_survives_reload() -> None:
    strict = BreakerConfig(consecutive_failures=1)
    board = BreakerBoard(CFG, {"groq": strict})
    assert board.get("local") is board.get("local")
    board.get("groq").on_failure(0.0)
    board.get("local").on_failure(0.0)
    snaps = board.snapshots(0.0)
    assert list(snaps) == ["groq", "local"]
    assert (snaps["groq"].state, snaps["local"].state) == ("open", "closed")
    local = board.get("local")
    board.reconfigure(["groq", "local"], CFG, {"groq": CFG})
    assert board.get("local") is local  # unchanged config: state kept
    assert board.get("groq").snapshot(0.0).state == "closed"  # new config: a fresh breaker
    board.reconfigure(["groq"])
    assert list(board.snapshots(0.0)) == ["groq"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"consecutive_failures": 0},
        {"failure_rate": 0.0},
        {"failure_rate": 1.5},
        {"window_s": 0.0},
        {"base_ejection_s": 10.0, "max_ejection_s": 5.0},
        {"ejection_multiplier": 0.5},
    ],
)
def test_bad_configs_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerConfig(**kwargs)  # type: ignore[arg-type]
