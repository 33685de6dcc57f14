"""Metering glue: one `Completion` per request, turned into usage, cost, a ledger row and metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from gateway.estimate import Estimate
from gateway.inbound import InboundRequest
from gateway.metrics import GatewayMetrics
from gateway.tokenizer import Tokenizer
from gateway.usage import StreamMeter, Usage, usage_from_response

if TYPE_CHECKING:
    from policies.types import RouteDecision

    from gateway.forward import Attempt
    from gateway.limits import Reservation


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
    first_byte_at: float | None = None
    usage: Usage | None = None
    _meter: StreamMeter | None = field(default=None)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_byte_at is None else self.first_byte_at - self.arrived

    @property
    def completion_tokens(self) -> int:
        return self.usage.completion_tokens if self.usage is not None else 0

    @property
    def groq_usage(self) -> dict[str, object] | None:
        u = self.usage
        t = u.upstream_timings if u is not None else None
        if t is None:
            return None
        return {
            "queue_time": t.queue_s,
            "prompt_time": t.prompt_s,
            "completion_time": t.completion_s,
            "total_time": t.total_s,
        }

    def attach(self, attempt: Attempt, batch_seen: int) -> None:
        self.backend = attempt.backend
        self.backend_model = attempt.backend_model
        self.attempt = attempt.number
        self.batch_seen = batch_seen

    def stream_meter(self) -> StreamMeter:
        self._meter = StreamMeter()
        return self._meter


class Meter:
    """Turns finished requests into usage and metrics (ledger and budgets are wired by the app)."""

    def __init__(self, tokenizer: Tokenizer, metrics: GatewayMetrics) -> None:
        self._tokenizer = tokenizer
        self._metrics = metrics

    async def abandon(self, completion: Completion) -> None:
        """A request that never reached a backend: release what it reserved."""
        del completion

    async def finish(
        self,
        completion: Completion,
        *,
        outcome: str,
        body: bytes | None = None,
        meter: StreamMeter | None = None,
    ) -> Usage | None:
        usage: Usage | None = None
        if meter is not None:
            usage = meter.finish(
                outcome == "ok", self._tokenizer, completion.estimate.prompt_tokens
            )
        elif body is not None:
            usage = self._usage_of_body(completion, body)
        completion.usage = usage
        backend = completion.backend or "none"
        model = completion.inbound.model
        m = self._metrics
        m.requests.labels(backend, model, outcome).inc()
        now = time.monotonic()
        m.duration.labels(backend, model).observe(now - completion.arrived)
        if completion.first_byte_at is not None:
            m.ttft.labels(backend, model).observe(completion.first_byte_at - completion.arrived)
        if usage is not None:
            m.tokens.labels(backend, model, "prompt").inc(usage.prompt_tokens)
            m.tokens.labels(backend, model, "completion").inc(usage.completion_tokens)
        return usage

    def _usage_of_body(self, completion: Completion, body: bytes) -> Usage | None:
        try:
            parsed: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(parsed, dict):
            return None
        return usage_from_response(
            parsed, tokenizer=None, prompt_tokens_estimate=completion.estimate.prompt_tokens
        )
