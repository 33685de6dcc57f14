"""Live routing: snapshots of every candidate backend, the pure policy's decision, and the attempt plan.

The feedback loop that keeps the snapshots true (each attempt's leave and outcome)
is `gateway.flow.feedback`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from adapters.base import AttemptTimeouts, Backend
from gateway.config import GatewayConfig, ModelSpec
from gateway.errors import NoBackendAvailable
from gateway.flow.attempt import AttemptPlan
from gateway.flow.estimate import Estimate
from gateway.http.auth import Tenant
from gateway.http.client_headers import DEADLINE_HEADER, SLO_HEADER
from gateway.http.inbound import InboundRequest, upstream_body
from gateway.state.live import LiveState, LocalRoom
from policies.budget import MissBudget
from policies.select import MAX_REASON, Policy, compile_policy, select
from policies.types import RouteDecision, RouteRequest, Slo


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
    """What `Feedback.on_end` needs to score a finished request against its class's SLO."""

    decision: RouteDecision
    # What `Feedback.on_start` charged the decision's budget class.
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


class SloBudgets:
    """Each public model's SLO classes' population miss budgets (`policies.budget`) over one
    config's requests: counted when routed (`Router.plan`), charged when a local first choice
    answers and settled when it ends (`Feedback.on_start` / `on_end`). Per model: one model's
    easy traffic (an 8B fleet) must not fund another's misses (a 70B pair), nor its
    calibration hide them."""

    def __init__(self, slos: Mapping[str, Slo], clock: Callable[[], float] = time.time) -> None:
        self._slos = slos
        self._clock = clock
        self._by_model: dict[str, dict[str, MissBudget]] = {}

    def of(self, model: str) -> dict[str, MissBudget]:
        """The model's budget per SLO class (created on first use)."""
        miss = self._by_model.get(model)
        if miss is None:
            miss = self._by_model[model] = {name: MissBudget() for name in self._slos}
        return miss

    def left(self, model: str) -> Mapping[str, float]:
        """What each of the model's class budgets has left now."""
        now = self._clock()
        return MappingProxyType({c: b.left(now) for c, b in self.of(model).items()})

    def count(self, model: str, slo_class: str) -> None:
        """One more request of the model and class was routed."""
        miss = self.of(model)
        miss[slo_class] = miss[slo_class].count(self._clock())

    def charge(self, decision: RouteDecision | None, backend: str, local_gpu: bool) -> float:
        """The expected misses charged when `backend` answered: a local first choice's
        predicted miss probability, calibrated (0 for anything else)."""
        chosen = None if decision is None else decision.chosen
        if (
            decision is None
            or chosen is None
            or chosen.backend != backend
            or chosen.miss_probability <= 0.0
            or not local_gpu
            or decision.budget_class not in self.of(decision.model)
        ):
            return 0.0
        miss = self.of(decision.model)
        budget = miss[decision.budget_class]
        charge = budget.charge(chosen.miss_probability)
        miss[decision.budget_class] = budget.admit(charge)
        return charge

    def settle(
        self,
        backend: str,
        local_gpu: bool,
        slo: SloOutcome,
        ttft_s: float | None,
        total_s: float,
        completion_tokens: int,
    ) -> None:
        """A finished request's measured SLO outcome and its charge back into the budgets."""
        d = slo.decision
        own = d.slo_class
        miss = self.of(d.model)
        if own not in miss:
            return
        now = self._clock()
        if slo.streamed and ttft_s is None:
            missed = True  # a stream that never sent its first token
        else:
            known = ttft_s if slo.streamed else None
            missed = not met_slo(self._slos[own], known, total_s, completion_tokens)
        chosen = d.chosen
        if local_gpu and d.budget_class == own:
            p = chosen.miss_probability if chosen is not None and chosen.backend == backend else 0.0
            miss[own] = miss[own].settle(now, slo.charge, missed, predicted=p)
            return
        if slo.charge > 0.0 and d.budget_class in miss:
            miss[d.budget_class] = miss[d.budget_class].settle(now, slo.charge, False)
        miss[own] = miss[own].settle(now, 0.0, missed)


class Router:
    """Chooses backends for each request over the live state, and plans its attempts (one per config)."""

    def __init__(
        self,
        config: GatewayConfig,
        backends: Mapping[str, Backend],
        live: LiveState,
        *,
        room: LocalRoom | None = None,
        budgets: SloBudgets | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._backends = backends
        self._specs = {b.name: b for b in config.backends}
        self.live = live
        self._room = room if room is not None else LocalRoom()
        self._clock = clock
        self._slos = {name: Slo.from_spec(spec) for name, spec in config.slo_classes.items()}
        # The population SLO budget per class (policies.budget), shared with `Feedback`.
        self.budgets = budgets if budgets is not None else SloBudgets(self._slos, clock)
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
            miss_budgets=self.budgets.left(inbound.model),
        )

    def miss_budget(self, model: str, slo_class: str) -> MissBudget:
        """One model's SLO class's miss budget as it stands (what routing was told and measured)."""
        return self.budgets.of(model)[slo_class]

    def miss_budgets(self, model: str) -> Mapping[str, float]:
        """What each SLO class's miss budget has left now for this model (`policies.budget`)."""
        return self.budgets.left(model)

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
        req = self.route_request(inbound, tenant, estimate, headers)
        self.budgets.count(req.model, req.slo_class)
        decision = self.decide(req, model, tenant)
        if decision.wait_for_local and self._room.waiting < self._queue_max:
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
        self._room.waiting += 1
        try:
            while True:
                remaining = until - loop.time()
                if remaining <= 0:
                    return self._spill(req, model, tenant)
                # Also look again every scrape: a slot freed by a request of our own may
                # still show as running in the last scrape when the wake-up comes, and
                # room made by other clients of the worker shows only in its metrics.
                await self._room.wait(min(remaining, self._recheck_s))
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
            self._room.waiting -= 1

    def _spill(self, req: RouteRequest, model: ModelSpec, tenant: Tenant) -> RouteDecision:
        """The wait budget is spent: route now, without waiting again."""
        no_wait = replace(req, deadline=None, slo=replace(req.slo, max_queue_wait_s=0.0))
        decision = self.decide(no_wait, model, tenant)
        return replace(decision, reason=_clip("spilled after queue wait; " + decision.reason))

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
