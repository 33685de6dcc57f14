"""Live routing: snapshots of every candidate backend, the pure policy's decision, and the attempt plan.

The feedback loop that keeps the snapshots true (each attempt's leave and outcome)
is `gateway.flow.feedback`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from adapters.base import AttemptTimeouts, Backend
from gateway.config import GatewayConfig, ModelSpec
from gateway.errors import NoBackendAvailable
from gateway.flow.attempt import AttemptPlan
from gateway.flow.estimate import Estimate
from gateway.flow.slo_budgets import SloBudgets, SloBudgetView
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


class Router:
    """Chooses backends for each request over the live state, and plans its attempts (one per config)."""

    def __init__(
        self,
        config: GatewayConfig,
        backends: Mapping[str, Backend],
        live: LiveState,
        *,
        room: LocalRoom | None = None,
        budgets: SloBudgetView | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._backends = backends
        self._specs = {b.name: b for b in config.backends}
        self.live = live
        self._room = room if room is not None else LocalRoom()
        self._clock = clock
        self._slos = {name: Slo.from_spec(spec) for name, spec in config.slo_classes.items()}
        # The population SLO budget per class (policies.budget): the process's, seen through
        # this config's view (shared with `Feedback`); a router of its own keeps its own.
        if budgets is None:
            store = SloBudgets(clock)
            budgets = store.view(self._slos, (m.name for m in config.models))
            store.adopt(budgets)
        self.budgets = budgets
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
        return self.budgets.of(model).get(slo_class, MissBudget())

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
        self, req: RouteRequest, inbound: InboundRequest, model: ModelSpec, tenant: Tenant
    ) -> tuple[list[AttemptPlan], RouteDecision]:
        """Decide for `req` (`route_request`; the caller counts it in its class's SLO budget),
        wait for local headroom where the request tolerates it, and build the attempts."""
        if inbound.endpoint == "embeddings":
            model = self._embedding_models.get(model.name, model)
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
