"""One request's attempts over the ranked backends: failover only before the first byte reaches the client."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

from adapters.base import AttemptTimeouts, Backend, UpstreamResponse
from gateway.errors import (
    GatewayError,
    NoBackendAvailable,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
)


@dataclass(slots=True)
class Attempt:
    """A started attempt: which backend, which try, and the open response."""

    backend: str
    backend_model: str
    number: int
    response: UpstreamResponse
    first_event: bytes | None  # streams: the first event, read before committing to the client
    events: AsyncIterator[bytes] | None  # streams: the same iterator, to read the rest from
    started: float  # loop time the attempt began


@dataclass(frozen=True, slots=True)
class AttemptPlan:
    """One ranked candidate turned into what the forwarder needs."""

    backend: Backend
    backend_model: str
    body: bytes
    timeouts: AttemptTimeouts


def is_retryable(exc: GatewayError) -> bool:
    """Whether another backend might succeed where this attempt failed."""
    if isinstance(exc, UpstreamStatus):
        return exc.retryable
    return isinstance(exc, UpstreamError)


async def first_attempt_that_answers(
    plans: Sequence[AttemptPlan],
    *,
    path: str,
    headers: Mapping[str, str],
    stream: bool,
    deadline: float,
    on_failure: Callable[[str, GatewayError, float], None],
    may_retry: Callable[[], bool],
    max_attempts: int = 3,
) -> Attempt:
    """Try the plans in order until one answers; raise the last error once they are spent.

    A stream counts as answered once its first event arrived, so a stream that
    breaks before its first event still fails over.
    """
    loop = asyncio.get_running_loop()
    last: GatewayError | None = None
    for number, plan in enumerate(plans[:max_attempts]):
        if number > 0:
            if not may_retry():
                break
            if last is not None and last.retry_after_s is not None and len(plans) == 1:
                break
            await asyncio.sleep(_backoff(number))
        started = loop.time()
        remaining = deadline - started
        if remaining <= 0:
            last = last or UpstreamTimeout("the request's deadline passed before an answer")
            break
        timeouts = _within(plan.timeouts, remaining)
        try:
            response = await plan.backend.open(path, plan.body, headers, timeouts)
            if not stream:
                return Attempt(
                    plan.backend.name, plan.backend_model, number, response, None, None, started
                )
            events = response.events()
            first = await _first_event(response, events, plan.backend.name, timeouts.first_byte_s)
            return Attempt(
                plan.backend.name, plan.backend_model, number, response, first, events, started
            )
        except GatewayError as exc:
            on_failure(plan.backend.name, exc, loop.time() - started)
            if not is_retryable(exc):
                raise
            last = exc
    if last is None:
        raise NoBackendAvailable("no backend can serve this model right now", should_retry=False)
    last.should_retry = False
    raise last


async def _first_event(
    response: UpstreamResponse, events: AsyncIterator[bytes], backend: str, first_byte_s: float
) -> bytes:
    try:
        async with asyncio.timeout(first_byte_s):
            return await anext(events)
    except StopAsyncIteration:
        pass
    except TimeoutError as exc:
        response.close()
        raise UpstreamTimeout(f"backend {backend} sent no stream event in time") from exc
    except GatewayError:
        response.close()
        raise
    response.close()
    raise UpstreamProtocolError(f"backend {backend} closed the stream before any event")


def _within(t: AttemptTimeouts, remaining: float) -> AttemptTimeouts:
    return AttemptTimeouts(
        connect_s=min(t.connect_s, remaining),
        first_byte_s=min(t.first_byte_s, remaining),
        idle_s=t.idle_s,
        total_s=min(t.total_s, remaining),
    )


def _backoff(number: int) -> float:
    """Full jitter over a small exponential base: failover should be quick, not synchronized."""
    return random.uniform(0, min(0.25, 0.01 * (2**number)))
