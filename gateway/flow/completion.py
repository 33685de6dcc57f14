"""What the gateway knows about one request while it runs: `Completion`, filled in along the flow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.flow.admission import Reservation
from gateway.flow.estimate import Estimate
from gateway.http.inbound import InboundRequest
from gateway.metering.money import UnitPrices
from gateway.metering.outcome import AttemptOutcome
from gateway.metering.stream_meter import StreamMeter
from gateway.metering.usage import Usage

if TYPE_CHECKING:
    from gateway.flow.attempt import Attempt, SentAttempt
    from policies.types import Candidate, RouteDecision


@dataclass(slots=True)
class Completion:
    """What the gateway knows about one request while it runs."""

    rid: str
    tenant: str
    inbound: InboundRequest
    estimate: Estimate
    reservation: Reservation | None
    arrived: float
    decision: RouteDecision | None = None
    backend: str | None = None
    backend_model: str | None = None
    attempt: int = 0
    batch_seen: int = 0
    prices: UnitPrices | None = None  # captured when the attempt started: the price in force
    first_byte_at: float | None = None
    usage: Usage | None = None
    client_request_id: str | None = None
    # Hedged attempts that lost the race, with the prices and batch in force for each.
    hedge_losers: tuple[tuple[SentAttempt, UnitPrices, int], ...] = ()
    outcome: AttemptOutcome | None = None  # set once, when the answering attempt ended
    _meter: StreamMeter | None = field(default=None)

    def attach(self, attempt: Attempt, batch_seen: int, prices: UnitPrices) -> None:
        self.backend = attempt.backend
        self.backend_model = attempt.backend_model
        self.attempt = attempt.number
        self.batch_seen = batch_seen
        self.prices = prices

    def stream_meter(self) -> StreamMeter:
        self._meter = StreamMeter()
        return self._meter

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_byte_at is None else self.first_byte_at - self.arrived

    @property
    def completion_tokens(self) -> int:
        return self.usage.completion_tokens if self.usage is not None else 0

    def candidate(self) -> Candidate | None:
        """Routing's candidate for the backend that answered (None: not a routed candidate)."""
        decision = self.decision
        if decision is None:
            return None
        return next((c for c in decision.candidates if c.backend == self.backend), None)

    def end(self, status: str, now: float) -> AttemptOutcome:
        """The answering attempt ended at `now` (monotonic): its outcome, kept on the completion."""
        assert self.backend is not None
        usage = self.usage
        self.outcome = AttemptOutcome(
            backend=self.backend,
            model=self.inbound.model,
            status=status,
            ttft_s=self.ttft_s,
            total_s=now - self.arrived,
            prompt_tokens=self.estimate.prompt_tokens,
            completion_tokens=self.completion_tokens,
            timings=usage.upstream_timings if usage is not None else None,
            predicted=self.candidate(),
        )
        return self.outcome
