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
out are tried locally in order of density — what each cost where the start sent it (under a
TPM limit often a dearer provider than its cheapest) per GPU-second it needs locally
(`bound_local.gpu_seconds`), the bound's greedy order — in chunks that double while the
whole trace still meets the target and gets cheaper. A chunk that breaks the target is tried
again with the local requests that newly missed moved out, each on arrival to the cheapest
provider that meets its SLO and has the tokens (its own members that missed are left for
later), if they cost less outside than the rest of the chunk saves; failing that, once more
with the local requests that already missed from its first change on moved out too. The
miss budget, not GPU time, is what runs out first (on 70b-vs-groq every trial after the
first dozen that adds a single miss breaks it), and a request that misses is usually a
cheaper one than the one that pushed it over. (The old misses in the first retry instead:
better on the 70B pair at 100 runs' worth, worse on tpm-limited-8b and with every candidate
tried; measured 2026-12-06, `docs/benchmarks.md`.) Failing that, a chunk halves (a single
request stays out). When
every candidate has been tried and the budget is not spent, those still outside are tried
again, pass after pass while a pass moves any (what moved out since may have made room).

Each trial runs the whole trace, but only from the last snapshot of the best routing's run
before the first request it changes (`Trials`; the same run, event for event, as from the
start), and stops as soon as a class can no longer meet the target. `runs` caps the
simulation done, in whole-trace runs, so the schedule is the best found within that budget,
not the best there is. A request sent local is dispatched on arrival to the least-loaded
worker; every other request goes where and when the policy sent it (its worker, or its
provider, so a TPM-limited provider's bucket drains as in the policy's run; until 2026-12-06
they went to the least-loaded worker and the cheapest provider, and under a TPM limit the
replayed start could miss the target where the policy met it), the others and then the
workers after it on a refusal.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Self

from loadtest.simulate.bound_external import external_options
from loadtest.simulate.bound_local import decode_token_cost, gpu_seconds
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
# Rounds of moving a rejected request's new misses outside with it (`search`).
REPAIRS = 2
# Snapshots of the best routing's run a trial may resume from (`Trials`).
CHECKPOINTS = 32


@dataclass(frozen=True, slots=True)
class Schedule:
    """The best routing the search found, and how hard it looked."""

    result: PolicyResult
    start_cost_per_million: float
    runs: float  # the simulation done, in whole-trace runs (the replay of the start is 1)
    trials: int  # routings tried (the start not counted)
    tried: int  # requests the start sent out that were tried locally
    candidates: int  # requests the start sent out that could be local
    moved: int  # of them, now local
    moved_out: int = 0  # requests the start served locally, now outside
    passes: int = 1  # over the candidates (another while the last one moved any)

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


class TargetMissed(Exception):
    """A planned run can no longer meet the target: a class has already missed too often."""


class PlannedEngine(Engine):
    """The simulation engine with its routing step replaced by a fixed plan.

    It counts misses as requests end; given a `target`, it stops (`TargetMissed`) as soon as
    a class has missed so often that even if every request still running met its SLO the
    class would end below the target: a trial the search would reject anyway ends there,
    with the same verdict as a full run (misses only grow)."""

    def __init__(
        self,
        scenario: Scenario,
        trace: Trace,
        seed: int,
        plan: Plan,
        providers_by_request: Sequence[tuple[str, ...]],
        target: float | None = None,
    ) -> None:
        super().__init__(scenario, trace, _Planned(), seed)
        self.plan = plan
        self.providers_by_request = providers_by_request
        self.target = target
        self.class_sizes = Counter(tr.slo_class for tr in trace.requests)
        self.misses = dict.fromkeys(self.class_sizes, 0)
        self.missed: list[int] = []

    def fork(self) -> Self:
        new = super().fork()
        new.misses = dict(self.misses)
        new.missed = list(self.missed)
        return new

    def _settle(self, r: SimRequest, now: float) -> None:
        super()._settle(r, now)
        cls = r.tr.slo_class
        if meets_slo(r, self.sc.slo_classes[cls]):
            return
        self.missed.append(r.i)
        self.misses[cls] += 1
        n = self.class_sizes[cls]
        if self.target is not None and (n - self.misses[cls]) / n < self.target:
            raise TargetMissed

    def _route(self, r: SimRequest, now: float, *, may_wait: bool) -> None:
        gpus = sorted(self.gpus, key=lambda n: self.inflight[n])
        ext = list(self.providers_by_request[r.i])
        # A request moved out goes at once: its start-routing dispatch time was for a worker.
        at = self.plan.dispatch_at.get(r.i, now) if r.i in self.plan.local else now
        sent = self.plan.sent.get(r.i)
        if sent is not None and (sent[0] in self.gpus) == (r.i in self.plan.local):
            # Where the start routing sent it, when: the same worker (their queues stay as in
            # that run), the same provider (a TPM bucket drains as it did; a 429 there took
            # nothing from it).
            first, at = sent
            gpus = [first, *(g for g in gpus if g != first)] if first in self.gpus else gpus
            ext = [first, *(p for p in ext if p != first)] if first not in self.gpus else ext
        elif r.i not in self.plan.local:
            # Moved out: the cheapest provider that meets its SLO and has the tokens now (with
            # hindsight no 429 and no failover delay), the others after it.
            tr = r.tr
            ext.sort(
                key=lambda p: not self.providers[p].has_room(tr.prompt_tokens, tr.max_tokens, now)
            )
        r.order = tuple(gpus + ext) if r.i in self.plan.local else tuple(ext + gpus)
        if at > now:
            self._push(at, "retry", (r, 0))
        else:
            self._attempt(r, 0, now)


@dataclass(slots=True)
class Trial:
    """One trial's outcome: its result (None: stopped once it could not meet the target), the
    requests that missed (up to where it stopped), its run, and the snapshots of that run to
    keep if it becomes the best routing."""

    result: PolicyResult | None
    missed: set[int]
    engine: PlannedEngine
    snapshots: list[PlannedEngine]


class Trials:
    """Runs the search's trials, each resumed from a snapshot of the best routing's run.

    A trial routes differently only requests arriving at or after some time t; its run up to
    the last event before t is the best routing's run. The best routing's run is snapshotted
    (`Engine.fork`) at CHECKPOINTS times, evenly spread over the arrivals, and a trial goes
    on from a fork of the latest one before t: the same events in the same order as a full
    run, so the same outcome to the last request and cent (tested). A trial that becomes
    the best keeps the snapshots before t and its own after. `work` counts the events
    handled, in whole-trace runs (the events of the start's replay); forks are not counted
    (a fork costs ~1/2,000 of a whole run on the shipped scenarios: `Engine.fork`)."""

    def __init__(
        self,
        sc: Scenario,
        trace: Trace,
        seed: int,
        start: Plan,
        providers_by_request: Sequence[tuple[str, ...]],
        target: float,
    ) -> None:
        self.target = target
        n = len(trace.requests)
        arrivals = sorted(tr.t for tr in trace.requests)
        self.times = [
            -math.inf,
            *sorted({arrivals[n * j // CHECKPOINTS] for j in range(1, CHECKPOINTS)}),
        ]
        engine = PlannedEngine(sc, trace, seed, start, providers_by_request)
        engine.start()
        self.snapshots: list[PlannedEngine] = []
        for t in self.times:
            engine.advance(t)
            self.snapshots.append(engine.fork())
        engine.advance()
        self.result = engine.finish()
        self.missed = set(engine.missed)
        self.spent = [r.cost_usd for r in engine.reqs]  # each request's price in the start
        self.full = max(engine.handled, 1)
        self.work = 1.0
        self.count = 0

    def run(self, plan: Plan, first: float) -> Trial:
        """Run `plan`, which routes as the best routing every request arriving before `first`."""
        j = bisect_right(self.times, first) - 1
        base = self.snapshots[j]
        engine = base.fork()
        engine.plan, engine.target = plan, self.target
        snapshots = self.snapshots[: j + 1]
        result: PolicyResult | None = None
        try:
            for t in self.times[j + 1 :]:
                engine.advance(t)
                snapshots.append(engine.fork())
            engine.advance()
            result = engine.finish()
        except TargetMissed:
            pass
        self.work += (engine.handled - base.handled) / self.full
        self.count += 1
        return Trial(result, set(engine.missed), engine, snapshots)

    def keep(self, trial: Trial) -> None:
        """`trial` is the best routing now: later trials resume from its snapshots."""
        self.snapshots = trial.snapshots


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
    runs: float = DEFAULT_RUNS,
) -> Schedule | None:
    """The cheapest routing found from `start` (None: the start, replayed, misses `target`)."""
    noise = request_noise(len(trace.requests), seed, sc.prefill_noise_sigma)
    names = [p.name for p in sc.providers]
    order: list[tuple[str, ...]] = []
    need: list[float] = []  # GPU-seconds it needs locally (inf: cannot be local in its SLO)
    outside: list[float] = []  # the cheapest price outside that meets its SLO
    # Once per worker and class, not per request: the hull is most of `gpu_seconds`'s time
    # (tpm-limited-8b: 16.9 s a search before 2026-12-06, 0.07 s now; the same values).
    per_token = {
        (g.name, c): decode_token_cost(g.physics, slo.max_itl_s)
        for g in sc.locals
        for c, slo in sc.slo_classes.items()
    }
    for tr, (z, prefill_noise) in zip(trace.requests, noise, strict=True):
        slo = sc.slo_classes[tr.slo_class]
        options = sorted(external_options(sc, tr, slo, z), key=lambda o: o.usd)
        first = tuple(o.provider for o in options)
        order.append(first + tuple(n for n in names if n not in first))
        outside.append(options[0].usd if options else math.inf)
        need.append(
            min(
                gpu_seconds(g.physics, tr, slo, prefill_noise, per_token[g.name, tr.slo_class])
                for g in sc.locals
            )
            if sc.locals
            else math.inf
        )
    trials = Trials(sc, trace, seed, start, order, target)
    best, best_missed = trials.result, trials.missed
    if not meets_every_class(best, target):
        return None
    start_cost = best.cost_per_million_tokens

    def better(trial: Trial) -> bool:
        return (
            trial.result is not None
            and meets_every_class(trial.result, target)
            and trial.result.cost_per_million_tokens < best.cost_per_million_tokens
        )

    def earliest(changed: Iterable[int]) -> float:
        return min(trace.requests[i].t for i in changed)

    # What moving a request local saves: what it cost where the start sent it (under a TPM
    # limit that may be a dearer provider than its cheapest), per GPU-second it needs there.
    saves = [spent if spent > 0.0 else outside[i] for i, spent in enumerate(trials.spent)]
    density = [
        -1.0  # cannot be local within its SLO
        if math.isinf(n)
        else math.inf  # local is its only way to meet the SLO, or free
        if math.isinf(outside[i]) or n <= 0.0
        else saves[i] / n
        for i, n in enumerate(need)
    ]
    out = sorted(
        (i for i in range(len(trace.requests)) if i not in start.local and density[i] >= 0.0),
        key=lambda i: -density[i],
    )
    local = set(start.local)
    todo, later = deque(out), deque[int]()
    k = max(1, int(len(out) * FIRST_CHUNK))
    tried: set[int] = set()
    passes, moved_in_pass = 1, 0
    while trials.work < runs:
        if not todo:
            again = [i for i in out if i not in local]
            if later:
                todo, later, k = later, deque(), 1
            elif moved_in_pass and again:
                # Another pass over those still outside: what moved since may have made room.
                todo, k = deque(again), max(1, int(len(again) * FIRST_CHUNK))
                passes, moved_in_pass = passes + 1, 0
            else:
                break
        chunk = [todo.popleft() for _ in range(min(k, len(todo)))]
        plan = Plan(frozenset(local.union(chunk)), start.dispatch_at, start.sent)
        trial = trials.run(plan, earliest(chunk))
        opening = trial
        # Broke the target: again with the local requests that newly missed moved out (its own
        # members that missed left for later), if that costs less than the rest saves.
        moving, victims = chunk, set[int]()
        for n in range(REPAIRS):
            if better(trial) or trials.work >= runs:
                break
            new = trial.missed - best_missed - victims
            if not new or any(m not in plan.local or math.isinf(outside[m]) for m in new):
                break
            if n:
                # The misses it already had from its first change on go too, where they can.
                t0 = earliest(moving)
                new |= {
                    m
                    for m in trial.missed & best_missed
                    if m in plan.local and trace.requests[m].t >= t0 and not math.isinf(outside[m])
                } - victims
            staying = [i for i in moving if i not in new]
            out_too = victims | (new - set(moving))
            if not staying or sum(outside[m] for m in out_too) >= sum(saves[i] for i in staying):
                break
            moving, victims = staying, out_too
            plan = Plan(frozenset(local.union(moving) - victims), start.dispatch_at, start.sent)
            trial = trials.run(plan, earliest([*moving, *victims]))
        if better(trial):
            trials.keep(trial)
            assert trial.result is not None
            best, best_missed = trial.result, trial.missed
            local = set(plan.local)
            tried.update(moving)
            moved_in_pass += len(moving)
            later.extend(i for i in chunk if i not in moving)
            k *= 2
        elif len(chunk) == 1:
            tried.add(chunk[0])
        else:
            # Retry at once the part no new miss follows closely; the rest later, one by one.
            kept = _clear_of(chunk, opening.missed - best_missed, trace)
            if kept and len(kept) < len(chunk):
                later.extend(i for i in chunk if i not in kept)
                todo.extendleft(reversed(kept))
                k = len(kept)
            else:
                todo.extendleft(reversed(chunk))
                k = max(1, len(chunk) // 2)
    return Schedule(
        best,
        start_cost,
        trials.work,
        trials.count,
        len(tried),
        len(out),
        len(local - start.local),
        len(start.local - local),
        passes,
    )


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
