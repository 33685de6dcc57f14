"""First-byte hedging: when an attempt is slow to answer, start another; the first answer wins.

Off by default. The pure part (`HedgeConfig`, `hedge_delay`) says whether and
when to hedge; `hedge_first_byte` runs the race. The losers are cancelled and
returned by index so the caller can record them as the operator's cost, never
the tenant's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class HedgeConfig:
    """Whether to hedge and how long to wait for the first byte before doing so."""

    enabled: bool = False
    delay_s: float | None = None  # fixed delay; None derives it from the TTFT estimate
    spread_sigmas: float = 2.0  # derived delay: mean + sigmas * spread (a high quantile)
    min_delay_s: float = 0.05
    max_delay_s: float = 2.0
    max_attempts: int = 2

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or not 0 <= self.min_delay_s <= self.max_delay_s:
            raise ValueError("max_attempts must be >= 1 and 0 <= min_delay_s <= max_delay_s")


def hedge_delay(
    config: HedgeConfig,
    *,
    candidates: int,
    ttft_mean_s: float | None = None,
    ttft_spread_s: float | None = None,
) -> float | None:
    """The delay before the second attempt, or None when this request should not hedge.

    A hedge only makes sense with a second candidate to send it to; the derived
    delay sits at a high quantile of the expected TTFT so that only the slow
    tail pays for a duplicate request.
    """
    if not config.enabled or config.max_attempts < 2 or candidates < 2:
        return None
    if config.delay_s is not None:
        delay = config.delay_s
    elif ttft_mean_s is None:
        delay = config.max_delay_s
    else:
        delay = ttft_mean_s + config.spread_sigmas * (ttft_spread_s or 0.0)
    return min(config.max_delay_s, max(config.min_delay_s, delay))


@dataclass(frozen=True, slots=True)
class Hedged(Generic[T]):
    """The outcome of a race: the winner, and what the others cost."""

    winner: int  # index passed to `start_attempt` of the attempt that answered
    value: T
    losers: tuple[int, ...]  # started, then cancelled or discarded: the operator's cost
    failed: tuple[tuple[int, BaseException], ...]  # attempts that raised before the winner


async def hedge_first_byte(
    start_attempt: Callable[[int], Awaitable[T]],
    delay_s: float,
    max_attempts: int = 2,
    *,
    may_start: Callable[[int], bool] | None = None,
    discard: Callable[[T], None] | None = None,
) -> Hedged[T]:
    """Race up to `max_attempts` attempts; the first to return wins.

    Attempt 0 starts at once. Attempt k+1 starts when no attempt has answered
    `delay_s` after attempt k started, or at once when an attempt fails (a
    failure frees its place in the race). `may_start(k)` is asked before each
    attempt k >= 1 (tie it to the retry budget); when it says no, the race goes
    on with the attempts already running. The losers are cancelled and awaited,
    so `start_attempt` must close its upstream response on `CancelledError`. A
    loser that returned a value anyway (both answered at once) is handed to
    `discard`. When every attempt fails, the last failure is raised.
    Cancelling the caller cancels every attempt.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    loop = asyncio.get_running_loop()
    running: dict[asyncio.Future[T], int] = {}
    failed: list[tuple[int, BaseException]] = []
    started = 0
    next_at = loop.time()

    def start_next() -> bool:
        nonlocal started, next_at
        if started >= max_attempts or (started > 0 and may_start and not may_start(started)):
            started = max_attempts  # no more attempts: the budget said no or all are out
            return False
        running[asyncio.ensure_future(start_attempt(started))] = started
        started += 1
        next_at = loop.time() + delay_s
        return True

    try:
        start_next()
        while True:
            if not running and not start_next():
                raise failed[-1][1]
            wait = None if started >= max_attempts else max(0.0, next_at - loop.time())
            done, _ = await asyncio.wait(running, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                start_next()
                continue
            answered = []
            for fut in sorted(done, key=running.__getitem__):
                index = running.pop(fut)
                exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
                if exc is None:
                    answered.append((index, fut.result()))
                else:
                    failed.append((index, exc))
            if answered:
                winner, value = answered[0]
                losers = [i for i, _ in answered[1:]]
                for _, extra in answered[1:]:
                    if discard is not None:
                        discard(extra)
                try:
                    losers += await _cancel_all(running, discard)
                except BaseException:
                    if discard is not None:
                        discard(value)  # cancelled while cleaning up: the winner is ours to close
                    raise
                return Hedged(winner, value, tuple(sorted(losers)), tuple(failed))
            if started < max_attempts:
                start_next()  # a failure frees its place: hedge now, not after the delay
    except BaseException:
        await _cancel_all(running, discard)
        raise


async def _cancel_all(
    running: dict[asyncio.Future[T], int], discard: Callable[[T], None] | None
) -> list[int]:
    """Cancel the attempts still running and wait for their cleanup; return their indices."""
    if not running:
        return []
    for fut in running:
        fut.cancel()
    futs = list(running)
    indices = [running[f] for f in futs]
    running.clear()
    results = await asyncio.gather(*futs, return_exceptions=True)
    for result in results:
        if not isinstance(result, BaseException) and discard is not None:
            discard(result)  # it ignored the cancellation and answered anyway
    return indices
