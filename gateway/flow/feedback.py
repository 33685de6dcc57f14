"""Routing's feedback loop: each attempt's leave to go out, and what its outcome teaches the live state.

The forwarder asks `Feedback` (its `AttemptHooks`) for a gate slot, a breaker's
leave and a unit of the retry budget, and reports failures; the request path
reports the answer's start (`on_start`) and its `AttemptOutcome` (`on_end`), which
update in-flight counts, rate-limit headroom, breakers, latency estimates and
the cost model's error that the next decision reads. One per config, over the
config's `LiveState`; the gate, retry budget and local-room wake-ups it uses
live as long as the process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from gateway.errors import GatewayError, UpstreamStatus
from gateway.flow.backpressure import Gate
from gateway.flow.reliability import Reliability
from gateway.flow.retryable import is_retryable
from gateway.flow.slo_budgets import SloBudgetView, SloOutcome
from gateway.metering.outcome import AttemptOutcome
from gateway.metrics import GatewayMetrics
from gateway.state.live import LiveState, LocalRoom
from policies.latency import LatencySample, sample_from_server_timings
from policies.types import RouteDecision, RouteRequest


class Feedback:
    """What attempts report to the live state, and the leave each one needs."""

    def __init__(
        self,
        live: LiveState,
        metrics: GatewayMetrics,
        reliability: Reliability,
        room: LocalRoom,
        budgets: SloBudgetView,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.live = live
        self._metrics = metrics
        self._reliability = reliability
        self._room = room
        self._budgets = budgets
        self._clock = clock

    @property
    def gate(self) -> Gate:
        """The gateway's concurrency gate (one per process)."""
        return self._reliability.gate

    def on_request(self) -> None:
        """One client request: it earns its share of retries."""
        self._reliability.on_request()

    def on_routed(self, req: RouteRequest) -> None:
        """The request is being routed: one more of its model's class (`policies.budget`)."""
        self._budgets.count(req.model, req.slo_class)

    def on_unanswered(self, req: RouteRequest | None, elapsed_s: float, exc: BaseException) -> None:
        """A routed request (`req`; None: it never was) ended `elapsed_s` after it arrived,
        before any answer began, on `exc`. No backend, every attempt failed, an upstream
        error or 429 passed on, a timeout: a miss of its class. The client's doing (it
        left; the upstream refused what it asked, passed through as a 4xx): a miss only if
        a bound had already passed, else it leaves the class's window unjudged."""
        if req is None:
            return
        clients = isinstance(exc, asyncio.CancelledError) or (
            isinstance(exc, UpstreamStatus) and exc.passes_through
        )
        self._budgets.unanswered(
            req.model, req.slo_class, req.stream, elapsed_s, clients_doing=clients
        )

    # --- the forwarder's AttemptHooks ---------------------------------------------------

    def admit(self, backend: str) -> bool:
        """The breaker's leave for one attempt (in half_open: the one probe)."""
        live = self.live.backends[backend]
        allowed = live.breaker.allow(self._clock())
        if not allowed:
            self._metrics.backend(backend).healthy.set(0)
        else:
            live.starting += 1  # on its way: the next decision must see it (see _started)
        return allowed

    def on_failure(self, backend: str, exc: GatewayError, elapsed: float) -> None:
        now = self._clock()
        self._metrics.upstream_errors.labels(backend, exc.code).inc()
        self._started(backend)
        breaker = self.live.backends[backend].breaker
        if isinstance(exc, UpstreamStatus) and exc.upstream_status == 429:
            # A 429 is the provider's limit, not ill health: cool down, don't eject.
            self.live.observe_429(backend, exc.retry_after_s, now)
            breaker.on_release(now)
        elif is_retryable(exc):
            breaker.on_failure(now)
        else:
            breaker.on_success(now)  # it answered: a client mistake is not ill health
        self._metrics.backend(backend).healthy.set(1 if breaker.available(now) else 0)

    def on_abandon(self, backend: str) -> None:
        """An admitted attempt ended without a verdict: free a half-open probe slot."""
        self._started(backend)
        self.live.backends[backend].breaker.on_release(self._clock())

    def may_retry(self) -> bool:
        return self._reliability.try_retry()

    def on_retry(self, backend: str) -> None:
        self._metrics.retries.labels(backend).inc()

    def _started(self, backend: str) -> None:
        """An admitted attempt answered, failed or was dropped: it is no longer starting."""
        live = self.live.backends[backend]
        if live.starting > 0:
            live.starting -= 1

    # --- the answer -----------------------------------------------------------------------

    def on_start(
        self,
        backend: str,
        headers: Mapping[str, str],
        prompt_tokens: int,
        decision: RouteDecision | None = None,
    ) -> float:
        """The attempt answered (first byte): count it in flight and read the provider's headroom.

        Returns the expected misses charged to the decision's SLO budget (`SloBudgets.charge`);
        hand it back to `on_end` in its `SloOutcome`.
        """
        now = self._clock()
        local_gpu = self.live.backends[backend].gpu is not None
        charge = self._budgets.charge(decision, backend, local_gpu)
        self._started(backend)
        live = self.live.backends[backend]
        live.inflight += 1
        if live.gpu is not None:
            live.prompt_rate = live.prompt_rate.add(prompt_tokens, now)
            live.request_rate = live.request_rate.add(1, now)
            live.prompt_sq_rate = live.prompt_sq_rate.add(float(prompt_tokens) ** 2, now)
        else:
            live.sent_requests = live.sent_requests.add(1, now)
            live.sent_prompt = live.sent_prompt.add(prompt_tokens, now)
        live.breaker.on_success(now)
        self._metrics.backend(backend).healthy.set(1)
        self.live.observe_headers(backend, headers, now)
        self._metrics.backend(backend).inflight.set(live.inflight)
        return charge

    def on_end(self, outcome: AttemptOutcome, *, slo: SloOutcome | None = None) -> None:
        """A started attempt ended: latency samples, and the cost model's error on local GPUs.

        The provider's own timings (Groq) give the sample where present; otherwise the
        gateway's measured TTFT and mean inter-token gap do. `slo`, the request's decision
        and budget charge: whether it met its class's SLO goes into the class's miss budget
        (an answer that broke is a miss: `gateway.flow.slo_budgets`).
        """
        backend, model = outcome.backend, outcome.model
        live = self.live.backends[backend]
        if slo is not None:
            self._budgets.settle(outcome, live.gpu is not None, slo)
        live.inflight -= 1
        self._metrics.backend(backend).inflight.set(live.inflight)
        tokens = outcome.completion_tokens
        if live.gpu is None and tokens:
            live.sent_output = live.sent_output.add(tokens, self._clock())
        sample: LatencySample | None = None
        timings = outcome.timings
        if timings is not None:
            sample = sample_from_server_timings(
                timings.queue_s, timings.prompt_s, timings.completion_s, tokens
            )
            if timings.queue_s is not None and timings.queue_s >= 0:
                self.live.observe_queue(backend, model, timings.queue_s)
        ttft = outcome.ttft_s
        if sample is None and ttft is not None:
            itl = (outcome.total_s - ttft) / (tokens - 1) if tokens > 1 else None
            sample = LatencySample(ttft_s=ttft, itl_s=itl, prompt_tokens=outcome.prompt_tokens)
        elif sample is not None:
            sample = replace(sample, prompt_tokens=outcome.prompt_tokens)
        predicted = outcome.predicted
        if sample is not None:
            self.live.observe_latency(backend, model, sample)
            if live.gpu is not None and predicted is not None:
                self.live.observe_prediction(
                    backend,
                    model,
                    (predicted.predicted_ttft_s, predicted.predicted_itl_s),
                    (sample.ttft_s, sample.itl_s),
                    self._clock(),
                )
        if live.spec.is_local:
            self._room.freed()
