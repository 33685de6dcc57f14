"""First-byte hedging: the delay policy, and the race with real asyncio tasks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from gateway.flow.hedging import HedgeConfig, hedge_delay, hedge_first_byte

ON = HedgeConfig(enabled=True, min_delay_s=0.05, max_delay_s=2.0)


def test_hedging_is_off_by_default_and_needs_a_second_candidate() -> None:
    assert hedge_delay(HedgeConfig(), candidates=3, ttft_mean_s=0.2) is None
    assert hedge_delay(ON, candidates=1, ttft_mean_s=0.2) is None
    assert hedge_delay(HedgeConfig(enabled=True, max_attempts=1), candidates=3) is None


def test_the_delay_sits_at_a_high_quantile_of_the_ttft_estimate() -> None:
    assert hedge_delay(ON, candidates=2, ttft_mean_s=0.3, ttft_spread_s=0.1) == pytest.approx(0.5)
    assert hedge_delay(ON, candidates=2, ttft_mean_s=0.01) == 0.05  # clamped up
    assert hedge_delay(ON, candidates=2, ttft_mean_s=5.0) == 2.0  # clamped down
    assert hedge_delay(ON, candidates=2) == 2.0  # no estimate: the most patient delay
    fixed = HedgeConfig(enabled=True, delay_s=0.25)
    assert hedge_delay(fixed, candidates=2, ttft_mean_s=1.0) == 0.25


@dataclass
class Upstream:
    """Attempts with scripted first-byte delays; records starts, cancellations and closes."""

    delays: dict[int, float]
    fail: set[int] = field(default_factory=set)
    started: dict[int, float] = field(default_factory=dict)
    cancelled: list[int] = field(default_factory=list)

    async def attempt(self, i: int) -> str:
        loop = asyncio.get_running_loop()
        self.started[i] = loop.time()
        try:
            await asyncio.sleep(self.delays[i])
        except asyncio.CancelledError:
            self.cancelled.append(i)  # where a real attempt closes its upstream response
            raise
        if i in self.fail:
            raise ConnectionError(f"attempt {i} failed")
        return f"answer {i}"


async def test_a_fast_first_attempt_wins_alone() -> None:
    up = Upstream({0: 0.0, 1: 0.0})
    out = await hedge_first_byte(up.attempt, 0.2)
    assert (out.winner, out.value, out.losers, out.failed) == (0, "answer 0", (), ())
    assert list(up.started) == [0]


async def test_a_slow_first_attempt_is_hedged_after_the_delay_and_cancelled() -> None:
    up = Upstream({0: 5.0, 1: 0.01})
    out = await hedge_first_byte(up.attempt, 0.05)
    assert (out.winner, out.value, out.losers) == (1, "answer 1", (0,))
    assert up.started[1] - up.started[0] >= 0.05
    assert up.cancelled == [0]


async def test_a_failed_attempt_starts_the_next_at_once() -> None:
    up = Upstream({0: 0.0, 1: 0.0}, fail={0})
    out = await hedge_first_byte(up.attempt, 5.0)
    assert (out.winner, out.losers) == (1, ())
    assert [i for i, _ in out.failed] == [0]
    assert isinstance(out.failed[0][1], ConnectionError)
    assert up.started[1] - up.started[0] < 1.0  # not after the 5 s delay


async def test_when_every_attempt_fails_the_last_failure_is_raised() -> None:
    up = Upstream({0: 0.0, 1: 0.0, 2: 0.0}, fail={0, 1, 2})
    with pytest.raises(ConnectionError, match="attempt 2"):
        await hedge_first_byte(up.attempt, 0.01, max_attempts=3)


async def test_may_start_can_refuse_the_hedge() -> None:
    up = Upstream({0: 0.1, 1: 0.0})
    asked: list[int] = []

    def may_start(i: int) -> bool:
        asked.append(i)
        return False

    out = await hedge_first_byte(up.attempt, 0.01, may_start=may_start)
    assert (out.winner, out.losers) == (0, ())
    assert asked == [1]
    assert list(up.started) == [0]


async def test_one_attempt_means_no_hedge() -> None:
    up = Upstream({0: 0.1})
    out = await hedge_first_byte(up.attempt, 0.01, max_attempts=1)
    assert out.winner == 0


async def test_cancelling_the_caller_cancels_every_attempt() -> None:
    up = Upstream({0: 5.0, 1: 5.0})
    task = asyncio.create_task(hedge_first_byte(up.attempt, 0.01))
    while len(up.started) < 2:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(up.cancelled) == [0, 1]


async def test_a_loser_that_answered_too_is_discarded() -> None:
    go = asyncio.Event()
    closed: list[str] = []

    async def attempt(i: int) -> str:
        await go.wait()
        return f"answer {i}"

    async def release_both() -> None:
        await asyncio.sleep(0.05)
        go.set()

    releaser = asyncio.create_task(release_both())
    out = await hedge_first_byte(attempt, 0.0, discard=closed.append)
    await releaser
    assert (out.winner, out.value, out.losers) == (0, "answer 0", (1,))
    assert closed == ["answer 1"]


async def test_bad_max_attempts_is_refused() -> None:
    up = Upstream({0: 0.0})
    with pytest.raises(ValueError):
        await hedge_first_byte(up.attempt, 0.1, max_attempts=0)


async def test_a_failed_hedge_frees_its_place_while_others_still_run() -> None:
    up = Upstream({0: 5.0, 1: 0.0, 2: 0.0}, fail={1})
    out = await hedge_first_byte(up.attempt, 0.3, max_attempts=3)
    assert (out.winner, out.losers) == (2, (0,))
    assert up.started[2] - up.started[1] < 0.2  # at once, not after another 0.3 s delay
