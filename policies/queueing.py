"""Wait for local GPU headroom or spill now: the pure half of the gateway's bounded queue.

A request that tolerates delay (an SLO class with `max_queue_wait_s`, or an explicit
deadline) may wait for a local worker instead of paying an external price. This
module only decides how long that wait is worth; the gateway's queue does it, and
spills to the decision's candidates when the time is up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from policies.predict import local_load, predict
from policies.types import BackendSnapshot, RouteRequest, Slo

DEFAULT_SPREAD_SIGMAS = 2.0


def tolerates_delay(request: RouteRequest) -> bool:
    """True if the request's class or deadline allows queueing."""
    return request.slo.max_queue_wait_s > 0 or request.deadline is not None


def wait_budget(request: RouteRequest, now: float, service_s: float) -> float | None:
    """Seconds the request can wait and still finish a `service_s` job in time; None: none."""
    budget = request.slo.max_queue_wait_s if request.slo.max_queue_wait_s > 0 else math.inf
    if request.deadline is not None:
        budget = min(budget, request.deadline - now - service_s)
    if request.slo.max_total_s is not None:
        budget = min(budget, request.slo.max_total_s - service_s)
    if not math.isfinite(budget) or budget <= 0:
        return None
    return budget


def guard_for(request: RouteRequest, protect_class: str | None, protect: Slo | None) -> Slo | None:
    """The protected class's SLO if it applies to this request (delay-tolerant, other class)."""
    if protect is None or request.slo_class == protect_class or not tolerates_delay(request):
        return None
    return protect


def wait_decision(
    request: RouteRequest,
    snapshots: Sequence[BackendSnapshot],
    now: float,
    *,
    spread_sigmas: float = DEFAULT_SPREAD_SIGMAS,
    guard: Slo | None = None,
    miss_budget: float = 0.0,
) -> float | None:
    """How long to wait for a local worker before spilling, or None to route now.

    None when the request does not tolerate delay, when a healthy local worker can take
    it now within its SLO (and the `guard`, see `predict`), when there is no healthy local
    worker, or when no worker is predicted to have room within the budget.
    """
    if not tolerates_delay(request):
        return None
    out = request.expected_output_tokens
    best_service = math.inf
    best_eta = math.inf
    for s in snapshots:
        gpu = s.gpu
        if not s.is_local or gpu is None or not s.healthy:
            continue
        at_cap = s.max_concurrency is not None and s.inflight >= s.max_concurrency
        c = predict(request, s, now, spread_sigmas, guard, budget=miss_budget)
        if c.meets_slo and not at_cap:
            return None
        cap = gpu.max_batch
        if s.max_concurrency is not None and s.max_concurrency < cap:
            cap = s.max_concurrency
        # Once admitted: own prefill plus decoding in a full batch (the pessimistic case).
        service = gpu.prefill_time_s(request.prompt_tokens) + out * gpu.itl_s(cap)
        # Room appears as requests ahead of us finish, at the full batch's completion rate.
        excess = max(local_load(s) + 1 - cap, 0)
        eta = excess * max(out, 1) / gpu.throughput(cap)
        # Queued prefill drains at the prefill speed; a slow ITL has no such estimate (it
        # eases when traffic does), so it does not extend the wait.
        for bound in (request.slo.max_ttft_s, None if guard is None else guard.max_ttft_s):
            if bound is not None and c.predicted_ttft_s > bound:
                eta = max(eta, c.predicted_ttft_s - bound)
        best_service = min(best_service, service)
        best_eta = min(best_eta, eta)
    if not math.isfinite(best_service):
        return None
    budget = wait_budget(request, now, best_service)
    if budget is None or best_eta > budget:
        return None
    return budget
