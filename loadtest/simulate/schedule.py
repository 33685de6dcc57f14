"""The hindsight schedule: the cheapest routing found offline, knowing the whole trace and how
every choice plays out. It brackets the optimum from above, as the bound does from below.

The bound (`simulate.bound`) is a fluid relaxation: it sees GPU-seconds, not the queue, so on
a fleet whose GPUs the work can fill to ~100% it puts nearly everything local, where no
routing that meets the SLO can (a FIFO prefill queue at full load breaks the TTFT bound).
When the cost policy is far above the bound, the gap is then part the policy's and part the
bound's, and nothing in the bound tells which. The schedule is a routing that really runs
(the same engine, workers and providers) and meets the SLO target in every class, so the
least-cost routing at the SLO lies between the bound and it:

    bound <= optimum <= schedule <= the policy it started from

It is found by a local search over which requests go local, from the cost policy's own
routing (replayed exactly: same backend, same dispatch time): the requests the policy sent
out are tried locally in order of density — the cheapest external price that meets their
SLO per GPU-second they need locally (`bound_local.gpu_seconds`), the bound's own greedy
order — in chunks that double while the whole trace still meets the target and get cheaper,
and halve when it does not (a single request that breaks it is left out). Each trial
re-runs the whole trace; `runs` caps them, so the schedule is the best found within that
budget, not the best there is. A request sent local is dispatched on arrival to the
least-loaded worker; every other request goes where and when the policy sent it (its
worker, or its provider, so a TPM-limited provider's bucket drains as in the policy's run;
until 2026-12-06 they went to the least-loaded worker and the cheapest provider, and under a
TPM limit the replayed start could miss the target where the policy met it), the others and
then the workers after it on a refusal.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from loadtest.simulate.bound_external import external_options
from loadtest.simulate.bound_local import gpu_seconds
from loadtest.simulate.engine import Engine, request_noise
from loadtest.simulate.results import PolicyResult, SimRequest, meets_slo
from loadtest.simulate.routers import Choice
from loadtest.simulate.scenario import Scenario
from loadtest.simulate.traces import Trace
from policies.types import BackendSnapshot, RouteRequest

DEFAULT_RUNS = 100
# The first chunk: this share of the requests the start routing sent out.
FIRST_CHUNK = 1 / 16
# A request moved local is blamed for a miss of a request that arrives this soon after it.
BLAME_S = 30.0


@dataclass(frozen=True, slots=True)
class Schedule:
    """The best routing the search found, and how hard it looked."""

    result: PolicyResult
    start_cost_per_million: float
    runs: int  # whole-trace runs made (the replay of the start included)
    tried: int  # requests the start sent out that were tried locally
    candidates: int  # requests the start sent out that could be local
    moved: int  # of them, now local

    @property
    def cost_per_million_tokens(self) -> float:
        return self.result.cost_per_million_tokens

    @property
    def exhausted(self) -> bool:
        """Every candidate was tried (else the run budget ended the search)."""
        return self.tried >= self.candidates


@dataclass(frozen=True, slots=True)
class Plan:
    """Which requests go local, and when those the start routing delayed are dispatched;
    `sent`: the backend that served each request in the start routing, and when."""

    local: frozenset[int]
    dispatch_at: Mapping[int, float]
    sent: Mapping[int, tuple[str, float]] = field(default_factory=dict)


class _Planned:
    """Stands in for a policy: the planned engine never asks one."""

    name = "hindsight-schedule"

    def choose(
        self, request: RouteRequest, snapshots: Sequence[BackendSnapshot], now: float
    ) -> Choice:
        raise AssertionError("a planned run routes by its plan")


class PlannedEngine(Engine):
    """The simulation engine with its routing step replaced by a fixed plan."""

    def __init__(
        self,
        scenario: Scenario,
        trace: Trace,
        seed: int,
        plan: Plan,
        providers_by_request: Sequence[tuple[str, ...]],
    ) -> None:
        super().__init__(scenario, trace, _Planned(), seed)
        self.plan = plan
        self.providers_by_request = providers_by_request

    def _route(self, r: SimRequest, now: float, *, may_wait: bool) -> None:
        gpus = sorted(self.gpus, key=lambda n: self.inflight[n])
        ext = list(self.providers_by_request[r.i])
        at = self.plan.dispatch_at.get(r.i, now)
        sent = self.plan.sent.get(r.i)
        if sent is not None and (sent[0] in self.gpus) == (r.i in self.plan.local):
            # Where the start routing sent it, when: the same worker (their queues stay as in
            # that run), the same provider (a TPM bucket drains as it did; a 429 there took
            # nothing from it).
            first, at = sent
            gpus = [first, *(g for g in gpus if g != first)] if first in self.gpus else gpus
            ext = [first, *(p for p in ext if p != first)] if first not in self.gpus else ext
        r.order = tuple(gpus + ext) if r.i in self.plan.local else tuple(ext + gpus)
        if at > now:
            self._push(at, "retry", (r, 0))
        else:
            self._attempt(r, 0, now)


def meets_every_class(result: PolicyResult, target: float) -> bool:
    """Does the routing meet the SLO target in every class (the bound's condition)?"""
    return min(result.slo_attainment.values(), default=1.0) >= target


def start_plan(engine: Engine) -> Plan:
    """A finished run's routing as a plan: its local requests, dispatched when they were."""
    local = [r for r in engine.reqs if r.backend in engine.gpus]
    sent = {r.i: (r.backend, r.dispatched_at) for r in engine.reqs if r.backend is not None}
    return Plan(frozenset(r.i for r in local), {r.i: r.dispatched_at for r in local}, sent)


def search(
    sc: Scenario,
    trace: Trace,
    seed: int,
    start: Plan,
    target: float,
    runs: int = DEFAULT_RUNS,
) -> Schedule | None:
    """The cheapest routing found from `start` (None: the start, replayed, misses `target`)."""
    noise = request_noise(len(trace.requests), seed, sc.prefill_noise_sigma)
    names = [p.name for p in sc.providers]
    order: list[tuple[str, ...]] = []
    density: list[float] = []
    for tr, (z, prefill_noise) in zip(trace.requests, noise, strict=True):
        slo = sc.slo_classes[tr.slo_class]
        options = sorted(external_options(sc, tr, slo, z), key=lambda o: o.usd)
        first = tuple(o.provider for o in options)
        order.append(first + tuple(n for n in names if n not in first))
        need = min((gpu_seconds(g.physics, tr, slo, prefill_noise) for g in sc.locals), default=0)
        if not sc.locals or math.isinf(need):
            density.append(-1.0)  # cannot be local within its SLO
        elif not options or need <= 0.0:
            density.append(math.inf)  # local is its only way to meet the SLO, or free
        else:
            density.append(options[0].usd / need)

    def run(plan: Plan) -> tuple[PolicyResult, set[int]]:
        engine = PlannedEngine(sc, trace, seed, plan, order)
        result = engine.run()
        missed = {r.i for r in engine.reqs if not meets_slo(r, sc.slo_classes[r.tr.slo_class])}
        return result, missed

    best, best_missed = run(start)
    used = 1
    if not meets_every_class(best, target):
        return None
    start_cost = best.cost_per_million_tokens
    out = sorted(
        (i for i in range(len(trace.requests)) if i not in start.local and density[i] >= 0.0),
        key=lambda i: -density[i],
    )
    local = set(start.local)
    todo, later = deque(out), deque[int]()
    k = max(1, int(len(out) * FIRST_CHUNK))
    moved = rejected = 0
    while (todo or later) and used < runs:
        if not todo:
            todo, later, k = later, deque(), 1
        chunk = [todo.popleft() for _ in range(min(k, len(todo)))]
        trial, missed = run(Plan(frozenset(local.union(chunk)), start.dispatch_at, start.sent))
        used += 1
        if (
            meets_every_class(trial, target)
            and trial.cost_per_million_tokens < best.cost_per_million_tokens
        ):
            best, best_missed = trial, missed
            local.update(chunk)
            moved += len(chunk)
            k *= 2
        elif len(chunk) == 1:
            rejected += 1
        else:
            # Retry at once the part no new miss follows closely; the rest later, one by one.
            kept = _clear_of(chunk, missed - best_missed, trace)
            if kept and len(kept) < len(chunk):
                later.extend(i for i in chunk if i not in kept)
                todo.extendleft(reversed(kept))
                k = len(kept)
            else:
                todo.extendleft(reversed(chunk))
                k = max(1, len(chunk) // 2)
    return Schedule(best, start_cost, used, moved + rejected, len(out), moved)


def _clear_of(chunk: Sequence[int], new_misses: set[int], trace: Trace) -> list[int]:
    """The requests of `chunk` that arrived more than BLAME_S before every new miss, or after it."""
    times = sorted(trace.requests[i].t for i in new_misses)
    kept = []
    for i in chunk:
        t = trace.requests[i].t
        j = bisect_left(times, t)
        if j == len(times) or times[j] - t > BLAME_S:
            kept.append(i)
    return kept
