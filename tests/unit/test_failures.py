"""Repeated failures: one line when a streak starts, a reminder now and then, one on recovery."""

from __future__ import annotations

import logging

import pytest

from gateway.state.failures import FailureStreak


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_streak_is_logged_once_then_reminded_then_closed_with_its_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="t")
    clock = Clock()
    streak = FailureStreak(
        logging.getLogger("t"), "poller", expected=(OSError,), remind_s=60, clock=clock
    )
    streak.succeeded()  # nothing to report
    for _ in range(100):  # 50 s of failures every 0.5 s
        streak.failed(ConnectionRefusedError("refused"))
        clock.t += 0.5
    assert [r.getMessage() for r in caplog.records] == [
        "poller failing: ConnectionRefusedError: refused (logged once until it recovers)"
    ]
    assert caplog.records[0].exc_info is None  # an expected outage: no traceback
    for _ in range(40):  # past a minute: one reminder with the count
        streak.failed(ConnectionRefusedError("refused"))
        clock.t += 0.5
    assert caplog.records[-1].getMessage() == (
        "poller still failing: 121 failures in 60s, last ConnectionRefusedError: refused"
    )
    streak.succeeded()
    assert caplog.records[-1].getMessage() == "poller recovered after 140 failures in 70.0s"
    assert len(caplog.records) == 3 and not streak.failing


def test_an_unexpected_failure_gets_its_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="t")
    streak = FailureStreak(logging.getLogger("t"), "poller", expected=(OSError,))
    for _ in range(5):
        try:
            raise KeyError("bug")
        except KeyError as exc:
            streak.failed(exc)
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None
