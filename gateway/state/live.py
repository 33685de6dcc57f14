"""Live backend state: in-flight counts, latency estimates, rate-limit headroom, worker metrics, health.

The request path and the background pollers write here; the router reads it
into frozen `BackendSnapshot`s for the pure policy. Times are wall-clock
seconds (`time.time()`), so state can be shared between replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from adapters.dialects import Dialect, dialect_for
from adapters.worker_metrics import WorkerMetrics, WorkerSignals, worker_signals
from gateway.config import BackendSpec, PriceSpec
from gateway.state.breaker import BreakerConfig, CircuitBreaker
from policies.costmodel import GpuModel
from policies.headroom import Headroom, KnownLimits, OwnUsage, mark_429, with_own_usage
from policies.latency import (
    ITL_REL_FLOOR_S,
    DecayingRate,
    LatencyEstimate,
    LatencySample,
    RelativeError,
    update,
)
from policies.pricebook import Price, PriceBook, SkippedRow
from policies.types import BackendSnapshot
from policies.worker_signals import provider_ttft, under_pressure

# Priors until traffic is measured: a local worker is judged by its cost model,
# an external provider by a typical hosted-API first token.
_REMOTE_PRIOR = LatencyEstimate.prior(ttft_s=0.35, itl_s=0.004)
# Samples before a provider's prompt-aware TTFT fit is trusted over its plain mean.
_FIT_MIN_SAMPLES = 20
# Weight of the newest sample in a provider's recent queue-time average.
_FAST_ALPHA = 0.5


@dataclass
class BackendLive:
    """Everything the gateway knows about one backend right now."""

    spec: BackendSpec
    gpu: GpuModel | None
    breaker: CircuitBreaker
    inflight: int = 0
    # Attempts admitted but not answered yet: counted from the moment they are sent, so a
    # burst that is routed before any of it answers still sees itself (the "instant" count).
    starting: int = 0
    pending_prefill: int = 0
    headroom: Headroom = field(default_factory=Headroom)
    worker: WorkerMetrics | None = None
    latency: dict[str, LatencyEstimate] = field(default_factory=dict)
    # Prompt tokens per second the gateway sends this worker (prefill load on its decode).
    prompt_rate: DecayingRate = field(default_factory=DecayingRate)
    # Requests per second sent it: the arrivals a long prefill would hold up.
    request_rate: DecayingRate = field(default_factory=DecayingRate)
    # Their squared prompt sizes per second: the size-biased mean prompt (prefill bursts).
    prompt_sq_rate: DecayingRate = field(default_factory=DecayingRate)
    # Local workers, per model: how far the cost model's TTFT and ITL predictions fell short.
    errors: dict[str, tuple[RelativeError, RelativeError]] = field(default_factory=dict)
    # What we sent a provider over about the last minute: stands in for the remaining
    # counts a provider does not send (Fireworks' limits, Groq's unsent requests/minute).
    sent_requests: DecayingRate = field(default_factory=lambda: DecayingRate(tau_s=60.0))
    sent_prompt: DecayingRate = field(default_factory=lambda: DecayingRate(tau_s=60.0))
    sent_output: DecayingRate = field(default_factory=lambda: DecayingRate(tau_s=60.0))
    # What the last two scrapes of a local worker say (queue time, preemptions, cache hits).
    signals: WorkerSignals = field(default_factory=WorkerSignals)
    # A provider's reported queue time per model (Groq `queue_time`): long-run and recent EWMA.
    queue_s: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def dialect(self) -> Dialect:
        return dialect_for(self.spec.kind)

    def headroom_now(self, now: float) -> Headroom:
        """The provider's headroom with our own last-minute traffic filling in what it omits."""
        h = self.headroom
        limits = self.spec.rate_limits
        known = (
            None
            if limits is None
            else KnownLimits(limits.requests_per_minute, limits.tokens_per_minute)
        )
        if known is None and h.limit_tokens is None and h.limit_output_tokens is None:
            return h
        own = OwnUsage(
            self.sent_requests.value(now) * 60.0,
            self.sent_prompt.value(now) * 60.0,
            self.sent_output.value(now) * 60.0,
        )
        return with_own_usage(h, own, known)

    def estimate(self, model: str) -> LatencyEstimate:
        est = self.latency.get(model)
        if est is None:
            if self.gpu is not None:
                itl = self.gpu.itl_s(1)
                est = LatencyEstimate.prior(ttft_s=self.gpu.prefill_time_s(512) + itl, itl_s=itl)
            else:
                est = _REMOTE_PRIOR
        return est


class PriceBoard:
    """The price book in force; every change makes a new version."""

    def __init__(self, specs: Mapping[str, BackendSpec], now: float) -> None:
        updates: dict[str | tuple[str, str], Price] = {}
        for spec in specs.values():
            if spec.price is not None:
                updates[spec.name] = _price(spec.price, now)
            for model, p in spec.model_prices.items():
                updates[(spec.name, model)] = _price(p, now)
        self.book = PriceBook().with_prices(updates)
        # Rows of the last feed poll that could not be priced (shown in /admin/prices).
        self.feed_skipped: tuple[SkippedRow, ...] = ()

    def set(self, backend: str, price: Price, model: str | None = None) -> int:
        self.book = self.book.with_price(backend, price, model)
        return self.book.version

    def set_many(self, updates: Mapping[str | tuple[str, str], Price]) -> int:
        """Merge a feed's prices; the version moves only if a rate changed."""
        self.book = self.book.with_prices(updates)
        return self.book.version


def _price(p: PriceSpec, now: float) -> Price:
    return Price.per_million(
        p.input_per_million,
        p.output_per_million,
        p.cached_input_per_million,
        source="config",
        updated_at=now,
    )


class LiveState:
    """Live state of every configured backend."""

    def __init__(
        self,
        specs: Mapping[str, BackendSpec],
        now: float,
        *,
        alpha: float = 0.2,
        breaker: BreakerConfig | None = None,
        previous: LiveState | None = None,
    ) -> None:
        self.alpha = alpha
        self.prices = PriceBoard(specs, now)
        if previous is not None:
            # Reload: the config's prices apply, under a version past every one already used.
            self.prices.book = replace(self.prices.book, version=previous.prices.book.version + 1)
        self.backends: dict[str, BackendLive] = {}
        for name, spec in specs.items():
            old = previous.backends.get(name) if previous is not None else None
            if old is not None and old.spec.base_url == spec.base_url:
                # Same upstream: what we learned about it still holds, and its counters
                # are the same objects, so requests that started before the reload still
                # count down what they counted up.
                live = old
                if old.spec.gpu != spec.gpu:
                    live.gpu = GpuModel.from_spec(spec.gpu) if spec.gpu is not None else None
                live.spec = spec
            else:
                live = BackendLive(
                    spec=spec,
                    gpu=GpuModel.from_spec(spec.gpu) if spec.gpu is not None else None,
                    breaker=CircuitBreaker(breaker),
                )
            self.backends[name] = live

    def use_breakers(self, config: BreakerConfig) -> None:
        """Breakers at `config`: one configured otherwise starts afresh (a reload that changed
        the breaker settings); one already at it keeps its state."""
        for live in self.backends.values():
            if live.breaker.config != config:
                live.breaker = CircuitBreaker(config)

    def observe_latency(self, backend: str, model: str, sample: LatencySample) -> None:
        live = self.backends[backend]
        live.latency[model] = update(live.estimate(model), sample, self.alpha)

    def observe_prediction(
        self,
        backend: str,
        model: str,
        predicted: tuple[float, float],
        measured: tuple[float | None, float | None],
        now: float,
    ) -> None:
        """A local worker's (TTFT, ITL) as the cost model predicted them and as measured."""
        live = self.backends[backend]
        ttft_err, itl_err = live.errors.get(model, (RelativeError(), RelativeError()))
        if measured[0] is not None:
            ttft_err = ttft_err.update(predicted[0], measured[0], now, self.alpha)
        if measured[1] is not None:
            itl_err = itl_err.update(predicted[1], measured[1], now, self.alpha, ITL_REL_FLOOR_S)
        live.errors[model] = (ttft_err, itl_err)

    def observe_worker(self, backend: str, metrics: WorkerMetrics) -> None:
        """A new scrape of a local worker, and the signals of the window since the last one."""
        live = self.backends[backend]
        live.signals = worker_signals(live.worker, metrics, live.signals)
        live.worker = metrics

    def observe_queue(self, backend: str, model: str, queue_s: float) -> None:
        """A provider's reported queue time for one request (Groq usage `queue_time`)."""
        live = self.backends[backend]
        old = live.queue_s.get(model)
        if old is None:
            live.queue_s[model] = (queue_s, queue_s)
            return
        slow, fast = old
        live.queue_s[model] = (
            slow + self.alpha * (queue_s - slow),
            fast + _FAST_ALPHA * (queue_s - fast),
        )

    def observe_headers(self, backend: str, headers: Mapping[str, str], now: float) -> None:
        """Fold a response's rate-limit headers in, as the backend's dialect reads them."""
        live = self.backends[backend]
        live.headroom = live.dialect.headroom(headers, now, live.headroom)

    def observe_429(self, backend: str, retry_after_s: float | None, now: float) -> None:
        live = self.backends[backend]
        live.headroom = mark_429(live.headroom, retry_after_s, now)

    def snapshot(
        self,
        backend: str,
        model: str,
        now: float,
        metrics_max_age_s: float,
        prompt_tokens: int = 0,
    ) -> BackendSnapshot:
        """The frozen view of one backend that the pure policy reads (prices at the tier
        a prompt of `prompt_tokens` reaches)."""
        live = self.backends[backend]
        spec = live.spec
        est = live.estimate(model)
        book = self.prices.book
        price = book.get(backend, model)
        if price is not None and price.tiers:
            price = price.at_prompt(prompt_tokens)
        worker = live.worker
        fresh = worker is not None and worker.is_fresh(now, metrics_max_age_s)
        ttft, ttft_slope, ttft_spread = est.ttft.mean, 0.0, est.ttft.spread
        itl_spread, ttft_rel, itl_rel = est.itl.spread, 0.0, 0.0
        fit = est.ttft_fit
        if live.gpu is None and fit.count >= _FIT_MIN_SAMPLES:
            # A provider's TTFT grows with the prompt: use the fitted line, not one mean.
            ttft, ttft_slope, ttft_spread = fit.intercept, fit.slope, fit.spread
        elif live.gpu is not None:
            # The cost model predicts a local worker's latency for each request; its margin
            # is the model's relative error, fading while the worker gets no traffic (a
            # spread of raw TTFT samples mixes prompt sizes and never recovers when idle).
            ttft_spread = itl_spread = 0.0
            errors = live.errors.get(model)
            if errors is not None:
                ttft_rel, itl_rel = errors[0].spread(now), errors[1].spread(now)
        queue = live.queue_s.get(model)
        if live.gpu is None and queue is not None:
            ttft = provider_ttft(ttft, *queue)
        signals = live.signals
        return BackendSnapshot(
            name=backend,
            backend_model=spec.models[model],
            is_local=spec.is_local,
            healthy=live.breaker.available(now),
            price_in_per_token=price.input_per_token if price else 0.0,
            price_out_per_token=price.output_per_token if price else 0.0,
            price_cached_in_per_token=price.cached_input_per_token if price else None,
            price_version=book.version,
            ttft_s=ttft,
            ttft_spread_s=ttft_spread,
            ttft_per_prompt_token_s=ttft_slope,
            itl_s=est.itl.mean,
            itl_spread_s=itl_spread,
            ttft_rel_spread=ttft_rel,
            itl_rel_spread=itl_rel,
            headroom=live.headroom_now(now) if live.gpu is None else live.headroom,
            running=worker.running if fresh and worker else 0,
            queued=worker.waiting if fresh and worker else 0,
            kv_usage=worker.kv_usage if fresh and worker else None,
            metrics_fresh=fresh,
            queue_wait_s=signals.queue_mean_s if fresh else None,
            preempting=fresh
            and under_pressure(
                signals.preemptions_per_s, worker.waiting_for_capacity if worker else None
            ),
            inflight=live.inflight + live.starting,
            pending_prefill_tokens=live.pending_prefill,
            # The cap check in `select` keeps counting answered requests only: the gate counts
            # from admission and enforces the cap with its bounded queue, so an attempt still
            # waiting for its first byte must not make the backend look rejected outright.
            max_concurrency=spec.max_concurrency + live.starting,
            gpu=live.gpu,
            recent_prompt_tokens_per_s=live.prompt_rate.value(now) if live.gpu else 0.0,
            recent_requests_per_s=live.request_rate.value(now) if live.gpu else 0.0,
            recent_prompt_sq_tokens_per_s=live.prompt_sq_rate.value(now) if live.gpu else 0.0,
        )


class LocalRoom:
    """Requests queued for local GPU headroom, and their wake-up when a local attempt ends.

    One per process: a request queued under one config is woken by an attempt that
    ends under the next.
    """

    __slots__ = ("_freed", "waiting")

    def __init__(self) -> None:
        self.waiting = 0
        self._freed = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        """Until a local attempt ends or `timeout_s` passes (the caller counts itself in `waiting`)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._freed.wait(), timeout_s)

    def freed(self) -> None:
        """A local attempt ended: wake every queued request; each decides again."""
        if self.waiting:
            freed, self._freed = self._freed, asyncio.Event()
            freed.set()
