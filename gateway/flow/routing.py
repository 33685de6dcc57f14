"""Live routing: snapshots of every candidate backend, the pure policy's decision, and the attempt plan.

Also the feedback loop: each attempt's outcome updates latency estimates,
rate-limit headroom and the circuit breaker that the next decision reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from adapters.base import AttemptTimeouts, Backend
from gateway.config import GatewayConfig, ModelSpec
from gateway.errors import GatewayError, NoBackendAvailable, UpstreamStatus
from gateway.flow.breaker import CircuitBreaker
from gateway.flow.estimate import Estimate
from gateway.flow.forward import AttemptPlan, is_retryable
from gateway.flow.reliability import Reliability
from gateway.http.auth import Tenant
from gateway.http.client_headers import DEADLINE_HEADER, SLO_HEADER
from gateway.http.inbound import InboundRequest, upstream_body
from gateway.metrics import GatewayMetrics
from gateway.state.live import LiveState
from policies.budget import MissBudget
from policies.latency import LatencySample, sample_from_groq_usage
from policies.select import MAX_REASON, Policy, compile_policy, select
from policies.types import Candidate, RouteDecision, RouteRequest, Slo


def _explain_spill(decision: RouteDecision, locals_: frozenset[str]) -> RouteDecision:
    """Say why local workers were passed over when an external backend was chosen.

    The policy's reason names the winner; a spill is only explained by what the local
    workers (`locals_`, the model's local backends) lacked (predicted ITL or TTFT past
    the SLO, ill health, a cap), so that goes into the reason the response header carries.
    """
    chosen = decision.chosen
    if not locals_ or chosen is None or chosen.backend in locals_:
        return decision
    why = [
        f"{c.backend} {c.reason}" for c in decision.candidates if c.backend in locals_ and c.reason
    ]
    why += [f"{name} {r}" for name, r in decision.rejected if name in locals_]
    if not why:
        return decision
    return replace(
        decision, reason=_clip(f"{decision.reason}; local passed over: {', '.join(why)}")
    )


def _clip(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."


@dataclass(frozen=True, slots=True)
class SloOutcome:
    """What `Router.on_end` needs to score a finished request against its class's SLO."""

    decision: RouteDecision
    # What `Router.on_start` charged the decision's budget class.
    charge: float = 0.0
    # A streamed answer's first byte is its first token; a whole answer's is its last.
    streamed: bool = True


def met_slo(slo: Slo, ttft_s: float | None, total_s: float, completion_tokens: int) -> bool:
    """Did a request meet its class's SLO (times from arrival)? TTFT and ITL are judged
    only when the first token's time is known (`ttft_s`, a streamed answer); the mean ITL
    is the time after the first token over the tokens after it."""
    if slo.max_total_s is not None and total_s > slo.max_total_s:
        return False
    if ttft_s is None:
        return True
    if slo.max_ttft_s is not None and ttft_s > slo.max_ttft_s:
        return False
    n = completion_tokens
    return not (
        slo.max_itl_s is not None and n > 1 and (total_s - ttft_s) / (n - 1) > slo.max_itl_s
    )


class Router:
    """Chooses backends for each request and keeps the live state routing depends on."""

    def __init__(
        self,
        config: GatewayConfig,
        backends: Mapping[str, Backend],
        live: LiveState,
        metrics: GatewayMetrics,
        *,
        clock: Callable[[], float] = time.time,
        reliability: Reliability | None = None,
    ) -> None:
        self._backends = backends
        self._specs = {b.name: b for b in config.backends}
        self.live = live
        self._metrics = metrics
        self._clock = clock
        self._slos = {name: Slo.from_spec(spec) for name, spec in config.slo_classes.items()}
        # The population SLO budget per class (policies.budget): this process's requests.
        self._miss = {name: MissBudget() for name in self._slos}
        self._policies: dict[str, Policy] = {
            m.name: compile_policy(m.policy, config.slo_classes) for m in config.models
        }
        self._tenant_policies: dict[str, Policy] = {
            t.name: compile_policy(t.policy, config.slo_classes)
            for t in config.tenants
            if t.policy is not None
        }
        # Embeddings of a model are served from one vector space only: the backends whose
        # embedding model is the first backend's (never by cost across spaces).
        self._embedding_models = {
            m.name: m.model_copy(
                update={
                    "backends": [
                        b
                        for b in m.backends
                        if self._specs[b].embedding_space(m.name)
                        == self._specs[m.backends[0]].embedding_space(m.name)
                    ]
                }
            )
            for m in config.models
        }
        self._locals = {  # each model's local backends, for explaining a spill
            m.name: frozenset(b for b in m.backends if self._specs[b].is_local)
            for m in config.models
        }
        self._stale_after = config.routing.metrics_stale_after_s
        self._queue_max = config.routing.queue_max
        self._recheck_s = config.routing.scrape_interval_s
        self._waiting = 0
        self._freed = asyncio.Event()
        self.reliability = reliability or Reliability.from_config(config)
        breaker_config = self.reliability.settings.breaker
        for live_backend in live.backends.values():
            if live_backend.breaker.config != breaker_config:
                live_backend.breaker = CircuitBreaker(breaker_config)
        self._timeouts = {
            name: AttemptTimeouts(
                connect_s=s.timeouts.connect_s,
                first_byte_s=s.timeouts.first_byte_s,
                idle_s=s.timeouts.idle_s,
                total_s=s.timeouts.total_s,
            )
            for name, s in self._specs.items()
        }

    def route_request(
        self,
        inbound: InboundRequest,
        tenant: Tenant,
        estimate: Estimate,
        headers: Mapping[str, str],
    ) -> RouteRequest:
        # The request path checked both headers (gateway.http.client_headers); the admin
        # route explainer passes its own, so an unusable value still falls back here.
        slo_class = headers.get(SLO_HEADER) or tenant.slo_class
        if slo_class not in self._slos:
            slo_class = tenant.slo_class
        deadline: float | None = None
        asked = headers.get(DEADLINE_HEADER)
        if asked:
            try:
                deadline = self._clock() + max(0.0, float(asked))
            except ValueError:
                deadline = None
        return RouteRequest(
            model=inbound.model,
            prompt_tokens=estimate.prompt_tokens,
            max_output_tokens=estimate.max_output_tokens,
            expected_output_tokens=estimate.expected_output_tokens,
            stream=inbound.stream,
            slo_class=slo_class,
            slo=self._slos[slo_class],
            deadline=deadline,
            tenant=tenant.name,
            miss_budgets=self.miss_budgets(),
        )

    def miss_budget(self, slo_class: str) -> MissBudget:
        """One SLO class's miss budget as it stands (what routing was told and measured)."""
        return self._miss[slo_class]

    def miss_budgets(self) -> Mapping[str, float]:
        """What each SLO class's miss budget has left now (`policies.budget`)."""
        now = self._clock()
        return MappingProxyType({c: b.left(now) for c, b in self._miss.items()})

    def decide(self, req: RouteRequest, model: ModelSpec, tenant: Tenant | None) -> RouteDecision:
        """The pure policy's decision over fresh snapshots of the model's backends."""
        now = self._clock()
        snaps = [
            self.live.snapshot(b, model.name, now, self._stale_after, req.prompt_tokens)
            for b in model.backends
        ]
        policy = (tenant and self._tenant_policies.get(tenant.name)) or self._policies[model.name]
        decision = select(req, snaps, policy, now, rng_value=random.random())
        return _explain_spill(decision, self._locals.get(model.name, frozenset()))

    async def plan(
        self,
        inbound: InboundRequest,
        model: ModelSpec,
        tenant: Tenant,
        estimate: Estimate,
        headers: Mapping[str, str],
    ) -> tuple[list[AttemptPlan], RouteDecision]:
        """Decide, wait for local headroom where the request tolerates it, and build the attempts."""
        if inbound.endpoint == "embeddings":
            model = self._embedding_models.get(model.name, model)
        self.reliability.on_request()
        req = self.route_request(inbound, tenant, estimate, headers)
        self._miss[req.slo_class] = self._miss[req.slo_class].count(self._clock())
        decision = self.decide(req, model, tenant)
        if decision.wait_for_local and self._waiting < self._queue_max:
            decision = await self._wait_for_local(req, model, tenant, decision)
        if not decision.candidates:
            reasons = "; ".join(f"{b}: {why}" for b, why in decision.rejected)
            raise NoBackendAvailable(
                f"no backend can serve {model.name} now ({reasons})",
                should_retry=True,  # every candidate is cooling down: waiting helps
                retry_after_s=self._back_in_s(model.backends),
            )
        plans = []
        for cand in decision.candidates:
            backend_model = self._specs[cand.backend].models[model.name]
            est = self.live.backends[cand.backend].estimate(model.name)
            plans.append(
                AttemptPlan(
                    self._backends[cand.backend],
                    backend_model,
                    upstream_body(inbound, backend_model),
                    self._timeouts[cand.backend],
                    ttft_s=cand.predicted_ttft_s,
                    ttft_spread_s=est.ttft.spread,
                )
            )
        return plans, decision

    def _back_in_s(self, names: list[str]) -> float:
        """Seconds until the first of `names` leaves its 429 cool-down or ejection (1 s if unknown)."""
        now = self._clock()
        waits = []
        for name in names:
            live = self.live.backends[name]
            cooldown = live.headroom.cooldown_until
            if cooldown is not None and cooldown > now:
                waits.append(cooldown - now)
            ejected = live.breaker.snapshot(now).open_until
            if ejected is not None:
                waits.append(ejected - now)
        return max(0.1, min(waits)) if waits else 1.0

    async def _wait_for_local(
        self, req: RouteRequest, model: ModelSpec, tenant: Tenant, decision: RouteDecision
    ) -> RouteDecision:
        """Queue for local GPU headroom instead of paying an external price, up to the wait budget."""
        assert decision.wait_for_local is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        until = start + decision.wait_for_local
        self._waiting += 1
        try:
            while True:
                remaining = until - loop.time()
                if remaining <= 0:
                    return self._spill(req, model, tenant)
                # Also look again every scrape: a slot freed by a request of our own may
                # still show as running in the last scrape when the wake-up comes, and
                # room made by other clients of the worker shows only in its metrics.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), min(remaining, self._recheck_s))
                fresh = self.decide(req, model, tenant)
                if fresh.wait_for_local is None:
                    waited = loop.time() - start
                    chosen = fresh.chosen
                    if chosen is not None and self._specs[chosen.backend].is_local:
                        why = f"waited {waited:.1f}s for local headroom; "
                    else:  # no room in time for the budget or deadline left
                        why = f"spilled after queue wait {waited:.1f}s; "
                    return replace(fresh, reason=_clip(why + fresh.reason))
        finally:
            self._waiting -= 1

    def _spill(self, req: RouteRequest, model: ModelSpec, tenant: Tenant) -> RouteDecision:
        """The wait budget is spent: route now, without waiting again."""
        no_wait = replace(req, deadline=None, slo=replace(req.slo, max_queue_wait_s=0.0))
        decision = self.decide(no_wait, model, tenant)
        return replace(decision, reason=_clip("spilled after queue wait; " + decision.reason))

    # --- feedback from attempts -------------------------------------------------------

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

    def may_retry(self) -> bool:
        return self.reliability.try_retry()

    def admit(self, backend: str) -> bool:
        """The breaker's leave for one attempt (in half_open: the one probe)."""
        live = self.live.backends[backend]
        allowed = live.breaker.allow(self._clock())
        if not allowed:
            self._metrics.backend(backend).healthy.set(0)
        else:
            live.starting += 1  # on its way: the next decision must see it (see _started)
        return allowed

    def _started(self, backend: str) -> None:
        """An admitted attempt answered, failed or was dropped: it is no longer starting."""
        live = self.live.backends[backend]
        if live.starting > 0:
            live.starting -= 1

    def on_abandon(self, backend: str) -> None:
        """An admitted attempt ended without a verdict: free a half-open probe slot."""
        self._started(backend)
        self.live.backends[backend].breaker.on_release(self._clock())

    def on_retry(self, backend: str) -> None:
        self._metrics.retries.labels(backend).inc()

    def on_start(
        self,
        backend: str,
        headers: Mapping[str, str],
        prompt_tokens: int,
        decision: RouteDecision | None = None,
    ) -> float:
        """The attempt answered (first byte): count it in flight and read the provider's headroom.

        Returns the expected misses charged to the decision's SLO budget: a local first
        choice's predicted miss probability, calibrated (0 for anything else); hand it
        back to `on_end`.
        """
        now = self._clock()
        charge = 0.0
        chosen = None if decision is None else decision.chosen
        if (
            decision is not None
            and chosen is not None
            and chosen.backend == backend
            and chosen.miss_probability > 0.0
            and decision.budget_class in self._miss
            and self.live.backends[backend].gpu is not None
        ):
            budget = self._miss[decision.budget_class]
            charge = budget.charge(chosen.miss_probability)
            self._miss[decision.budget_class] = budget.admit(charge)
        self._started(backend)
        live = self.live.backends[backend]
        live.inflight += 1
        if live.gpu is not None:
            live.prompt_rate = live.prompt_rate.add(prompt_tokens, now)
        else:
            live.sent_requests = live.sent_requests.add(1, now)
            live.sent_prompt = live.sent_prompt.add(prompt_tokens, now)
        live.breaker.on_success(now)
        self._metrics.backend(backend).healthy.set(1)
        self.live.observe_headers(backend, headers, now)
        self._metrics.backend(backend).inflight.set(live.inflight)
        return charge

    def on_end(
        self,
        backend: str,
        model: str,
        ttft_s: float | None,
        total_s: float,
        completion_tokens: int,
        groq_usage: Mapping[str, object] | None,
        prompt_tokens: int | None = None,
        predicted: Candidate | None = None,
        *,
        slo: SloOutcome | None = None,
    ) -> None:
        """A finished attempt: latency samples, and the cost model's error on local GPUs.

        `predicted` is routing's candidate for this backend (its predicted TTFT and ITL);
        `slo`, the request's decision and budget charge: whether it met its class's SLO
        (times from arrival) goes into the class's miss budget.
        """
        live = self.live.backends[backend]
        if slo is not None:
            self._settle(backend, slo, ttft_s, total_s, completion_tokens)
        live.inflight -= 1
        self._metrics.backend(backend).inflight.set(live.inflight)
        if live.gpu is None and completion_tokens:
            live.sent_output = live.sent_output.add(completion_tokens, self._clock())
        sample: LatencySample | None = None
        if groq_usage is not None:
            sample = sample_from_groq_usage(groq_usage, completion_tokens)
            queue = groq_usage.get("queue_time")
            if isinstance(queue, float | int) and not isinstance(queue, bool) and queue >= 0:
                self.live.observe_queue(backend, model, float(queue))
        if sample is None and ttft_s is not None:
            itl = (total_s - ttft_s) / (completion_tokens - 1) if completion_tokens > 1 else None
            sample = LatencySample(ttft_s=ttft_s, itl_s=itl, prompt_tokens=prompt_tokens)
        elif sample is not None and prompt_tokens is not None:
            sample = replace(sample, prompt_tokens=prompt_tokens)
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
            self._notify_freed()

    def _settle(
        self,
        backend: str,
        slo: SloOutcome,
        ttft_s: float | None,
        total_s: float,
        completion_tokens: int,
    ) -> None:
        """A finished request's measured SLO outcome and its charge back into the budgets."""
        d = slo.decision
        own = d.slo_class
        if own not in self._miss:
            return
        now = self._clock()
        if slo.streamed and ttft_s is None:
            missed = True  # a stream that never sent its first token
        else:
            known = ttft_s if slo.streamed else None
            missed = not met_slo(self._slos[own], known, total_s, completion_tokens)
        chosen = d.chosen
        local = self.live.backends[backend].gpu is not None
        if local and d.budget_class == own:
            p = chosen.miss_probability if chosen is not None and chosen.backend == backend else 0.0
            self._miss[own] = self._miss[own].settle(now, slo.charge, missed, predicted=p)
            return
        if slo.charge > 0.0 and d.budget_class in self._miss:
            judged = self._miss[d.budget_class]
            self._miss[d.budget_class] = judged.settle(now, slo.charge, False)
        self._miss[own] = self._miss[own].settle(now, 0.0, missed)

    def _notify_freed(self) -> None:
        """Wake every request queued for local headroom; each re-decides."""
        if self._waiting:
            freed, self._freed = self._freed, asyncio.Event()
            freed.set()

    def batch_seen(self, backend: str) -> int:
        """The batch a request joins on a local worker: what it reports running, or our own count."""
        live = self.live.backends[backend]
        worker = live.worker
        own = live.inflight
        if worker is not None and worker.is_fresh(self._clock(), self._stale_after):
            return max(own, worker.running + 1)
        return own + 1

    def any_healthy(self, names: list[str]) -> bool:
        now = self._clock()
        return any(self.live.backends[n].breaker.available(now) for n in names)
