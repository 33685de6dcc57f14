"""What one request's attempts are made of: plans, options, hooks, sent and started attempts.

`gateway.flow.forward` runs the attempts; routing builds the `AttemptPlan`s, `Feedback`
is the `AttemptHooks`, and the request path relays and meters the `Attempt` that
answered (and every `SentAttempt` that did not).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from adapters.base import AttemptTimeouts, Backend, UpstreamResponse
from gateway.errors import GatewayError
from gateway.flow.hedging import HedgeConfig


class AttemptHooks(Protocol):
    """What the forwarder reports to, and asks of, the live routing state (`Feedback`)."""

    def admit(self, backend: str) -> bool:
        """The breaker's leave for one attempt (consumes the half-open probe)."""
        ...

    def on_failure(self, backend: str, exc: GatewayError, elapsed: float) -> None: ...

    def on_abandon(self, backend: str) -> None:
        """An admitted attempt ended without a verdict (cancelled, lost a hedge)."""
        ...

    def may_retry(self) -> bool:
        """Spend one unit of the retry budget."""
        ...

    def on_retry(self, backend: str) -> None: ...


@dataclass(frozen=True, slots=True)
class SentAttempt:
    """An attempt whose request went out: a cancelled one (a lost hedge, or a client that
    left before any answer) still had the prompt, so it is metered."""

    backend: str
    backend_model: str
    number: int


@dataclass(frozen=True, slots=True)
class ForwardOptions:
    """How hard one request tries."""

    max_attempts: int = 3
    queue_wait_s: float = 0.0  # the first attempt's wait for a gate slot
    hedge: HedgeConfig = field(default_factory=HedgeConfig)


@dataclass(frozen=True, slots=True)
class AttemptPlan:
    """One ranked candidate turned into what the forwarder needs."""

    backend: Backend
    backend_model: str
    body: bytes
    timeouts: AttemptTimeouts
    ttft_s: float | None = None  # predicted, for the hedge delay
    ttft_spread_s: float | None = None


@dataclass(slots=True)
class Attempt:
    """A started attempt: which backend, which try, and the open response."""

    backend: str
    backend_model: str
    number: int
    response: UpstreamResponse
    first_event: bytes | None  # streams: the first event, read before committing to the client
    events: AsyncIterator[bytes] | None  # streams: the rest, bounded by the attempt's deadline
    started: float  # loop time the attempt began
    timeouts: AttemptTimeouts | None = None  # as applied (already cut to the request's deadline)
    hedged: tuple[SentAttempt, ...] = ()  # cancelled hedges: the operator's cost
    answer: dict[str, Any] | None = None  # a buffered answer, parsed once (for metering)
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        """Give back the gate slot this attempt holds; safe to call more than once."""
        if self._release is not None:
            self._release()
