"""The simulator as referee: every scenario, the cost policy against baselines and a hindsight bound.

Per scenario: neogate's cost policy; no GPUs (the cheapest provider only, GPU cost
removed: the fleet without its GPUs); all-local; spill@N (the best N of a sweep, chosen
in hindsight); least-loaded; round-robin; and the hindsight lower bound. The targets:
the cost policy is the cheapest online policy on the fleet that meets the interactive
SLO target (ties within 1%), and within 10% of the bound. Whether the fleet should own
its GPUs at all is a separate verdict: no GPUs against the bound.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.simulate.bound import Bound, hindsight_bound
from loadtest.simulate.engine import Engine
from loadtest.simulate.results import PolicyResult
from loadtest.simulate.routers import (
    AlwaysLocalUntilError,
    CheapestExternal,
    LeastLoaded,
    RoundRobin,
    SelectPolicy,
    SimPolicy,
    SpillAt,
)
from loadtest.simulate.scenario import Scenario
from loadtest.simulate.scenario_file import LoadedScenario, load_scenario
from loadtest.simulate.schedule import (
    DEFAULT_RUNS,
    Schedule,
    meets_every_class,
    search,
    start_plan,
)
from loadtest.simulate.traces import Trace
from policies.select import compile_policy

SLO_TARGET = 0.99
TIE = 0.01
BOUND_GAP = 0.10
SPILL_SWEEP = (2, 4, 8, 16, 32, 64, 128)
SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"


def attainment(r: PolicyResult) -> float:
    """Interactive SLO attainment (the lowest class's when there is no interactive class)."""
    att = r.slo_attainment
    if "interactive" in att:
        return att["interactive"]
    return min(att.values(), default=1.0)


def meets(r: PolicyResult) -> bool:
    """Does this policy meet the SLO target?"""
    return attainment(r) >= SLO_TARGET


def local_share(r: PolicyResult, sc: Scenario) -> float:
    """Share of served tokens that local GPUs served."""
    return sum(r.token_share.get(g.name, 0.0) for g in sc.locals)


@dataclass
class Outcome:
    """One scenario's results and verdict."""

    name: str
    description: str
    trace: Trace
    scenario: Scenario
    results: list[PolicyResult]
    spill_sweep: list[PolicyResult]
    bound: Bound
    notes: list[str] = field(default_factory=list)
    # The cost policy's reasons for passing over an idle local GPU ("gpu: reason" -> count)
    # and how many routing decisions it made.
    idle_passed: dict[str, int] = field(default_factory=dict)
    decisions: int = 0
    # The cheapest routing found offline from the cost policy's (`simulate.schedule`), where
    # the cost policy meets the SLO in every class and is not within BOUND_GAP of the bound.
    schedule: Schedule | None = None

    def by(self, policy: str) -> PolicyResult:
        return next(r for r in self.results if r.policy == policy)

    @property
    def cost(self) -> PolicyResult:
        return self.by("cost")

    @property
    def best_other(self) -> PolicyResult | None:
        """The cheapest online baseline on the same fleet meeting the SLO target.

        Not `no-gpus`: that is another fleet (a provisioning choice, not a routing one);
        `gpus_lose` compares with it.
        """
        ok = [r for r in self.results if r.policy not in ("cost", "no-gpus") and meets(r)]
        return min(ok, key=lambda r: r.cost_per_million_tokens, default=None)

    @property
    def best_attainment(self) -> PolicyResult:
        """The same-fleet policy (ours, a baseline or any N of the spill sweep) with the
        highest interactive SLO attainment."""
        same_fleet = [r for r in self.results if r.policy != "no-gpus"] + self.spill_sweep
        return max(same_fleet, key=attainment)

    @property
    def feasible(self) -> bool:
        """Does any online policy on this fleet meet the SLO target? When none does, the
        first target cannot be met by anyone: the table says so beside its NO."""
        return meets(self.best_attainment)

    @property
    def cheapest_ok(self) -> bool:
        """Target 1: the cost policy meets the SLO and no baseline that does is >1% cheaper."""
        other = self.best_other
        if not meets(self.cost):
            return False
        return other is None or (
            self.cost.cost_per_million_tokens <= other.cost_per_million_tokens * (1.0 + TIE)
        )

    @property
    def bound_gap(self) -> float:
        """How far above the hindsight bound the cost policy is (0.05 = 5%; inf where no
        routing can meet the SLO target, so there is no bound to compare with)."""
        if not self.bound.feasible:
            return math.inf
        return self.cost.cost_per_million_tokens / self.bound.cost_per_million_tokens - 1.0

    @property
    def within_bound(self) -> bool:
        """Target 2: the cost policy meets the SLO and is within BOUND_GAP of the bound. The
        bound is a lower bound only of routings that meet the SLO: one that misses it may sit
        anywhere against it (below, or far above where no routing can meet it), so it counts
        as a miss of this target too."""
        return meets(self.cost) and self.bound_gap <= BOUND_GAP

    @property
    def gpus_lose(self) -> bool:
        """Even a perfect router on this fleet pays more than no GPUs at all."""
        return (
            self.bound.feasible
            and self.by("no-gpus").cost_per_million_tokens < self.bound.cost_per_million_tokens
        )

    def as_json(self) -> dict[str, Any]:
        other = self.best_other
        return {
            "description": self.description,
            "requests": len(self.trace.requests),
            "duration_s": self.trace.duration_s,
            "gpu_cost_per_hour": self.scenario.gpu_cost_per_hour(),
            "policies": {
                r.policy: {**r.as_json(), "local_share": local_share(r, self.scenario)}
                for r in self.results
            },
            "spill_sweep": {
                r.policy: {
                    "cost_per_million_tokens": r.cost_per_million_tokens,
                    "slo_attainment": attainment(r),
                }
                for r in self.spill_sweep
            },
            "bound": {
                "feasible": self.bound.feasible,
                "total_cost_usd": _finite(self.bound.total_usd),
                "gpu_cost_usd": _finite(self.bound.gpu_usd),
                "external_cost_usd": _finite(self.bound.external_usd),
                "cost_per_million_tokens": _finite(self.bound.cost_per_million_tokens),
                "local_share": self.bound.local_token_share,
                "never_local_requests": self.bound.never_local,
            },
            "schedule": None if self.schedule is None else _schedule_json(self.schedule, self),
            "verdict": {
                "cost_meets_slo": meets(self.cost),
                "best_other_meeting_slo": None if other is None else other.policy,
                "cost_is_cheapest_meeting_slo": self.cheapest_ok,
                "some_policy_meets_slo": self.feasible,
                "cost_above_bound": _finite(self.bound_gap),
                "cost_above_schedule": None
                if self.schedule is None
                else self.cost.cost_per_million_tokens / self.schedule.cost_per_million_tokens
                - 1.0,
                "within_bound_target": self.within_bound,
                "gpus_lose_to_no_gpus": self.gpus_lose,
            },
            "notes": self.notes,
            "idle_gpu_passed_over": {"decisions": self.decisions, "reasons": self.idle_passed},
        }


def _finite(x: float) -> float | None:
    """JSON has no infinity: None where the bound does not exist."""
    return None if math.isinf(x) else x


def _schedule_json(s: Schedule, o: Outcome) -> dict[str, Any]:
    return {
        "cost_per_million_tokens": s.cost_per_million_tokens,
        "total_cost_usd": s.result.total_cost_usd,
        "slo_attainment_by_class": s.result.slo_attainment,
        "local_share": local_share(s.result, o.scenario),
        "start_cost_per_million_tokens": s.start_cost_per_million,
        "runs": s.runs,
        "trials": s.trials,
        "moved_local": s.moved,
        "moved_out": s.moved_out,
        "passes": s.passes,
        "tried": s.tried,
        "candidates": s.candidates,
        "exhausted": s.exhausted,
    }


def _run(sc: Scenario, trace: Trace, policy: SimPolicy, seed: int) -> PolicyResult:
    return Engine(sc, trace, policy, seed).run()


def run_scenario(
    loaded: LoadedScenario,
    duration_s: float | None = None,
    schedule_runs: int = DEFAULT_RUNS,
) -> Outcome:
    """Every policy and the bound over one scenario (shortened to `duration_s` if given);
    the hindsight schedule where it is looked for (`schedule_runs` 0: never)."""
    sc, seed = loaded.scenario, loaded.seed
    trace = loaded.trace(duration_s)
    cost = SelectPolicy("cost", compile_policy(sc.cost_policy, sc.slo_classes), random.Random(seed))
    cost_run = Engine(sc, trace, cost, seed)
    results = [
        cost_run.run(),
        _run(sc.without_gpus(), trace, CheapestExternal("no-gpus"), seed),
        _run(sc, trace, AlwaysLocalUntilError("all-local"), seed),
    ]
    sweep = [_run(sc, trace, SpillAt(n), seed) for n in SPILL_SWEEP]
    ok = [r for r in sweep if meets(r)]
    best = (
        min(ok, key=lambda r: r.cost_per_million_tokens)
        if ok
        else max(sweep, key=lambda r: (attainment(r), -r.cost_per_million_tokens))
    )
    results.append(best)
    results.append(_run(sc, trace, LeastLoaded(), seed))
    results.append(_run(sc, trace, RoundRobin(), seed))
    out = Outcome(
        loaded.name,
        loaded.spec.description,
        trace,
        sc,
        results,
        sweep,
        hindsight_bound(sc, trace, seed),
        idle_passed=dict(cost.idle_passed.most_common()),
        decisions=cost.routed,
    )
    if (
        schedule_runs > 0
        and out.bound.feasible
        and out.bound_gap > BOUND_GAP
        and meets_every_class(out.cost, SLO_TARGET)
    ):
        out.schedule = search(sc, trace, seed, start_plan(cost_run), SLO_TARGET, schedule_runs)
    out.notes = explain(out)
    return out


def scenario_files(directory: Path = SCENARIO_DIR) -> list[Path]:
    """The shipped scenario files, in name order."""
    return sorted(directory.glob("*.yaml"))


def run_suite(
    paths: Sequence[Path] | None = None,
    duration_s: float | None = None,
    schedule_runs: int = DEFAULT_RUNS,
) -> list[Outcome]:
    """Every scenario in `paths` (default: the shipped ones)."""
    return [
        run_scenario(load_scenario(p), duration_s, schedule_runs)
        for p in (paths or scenario_files())
    ]


def explain(o: Outcome) -> list[str]:
    """Plain sentences on where the cost policy stands and why."""
    cost, notes = o.cost, []
    other = o.best_other
    nogpu = o.by("no-gpus")
    if o.gpus_lose:
        notes.append(
            f"owning the GPUs loses: no GPUs at all costs ${nogpu.cost_per_million_tokens:.4f}/M, "
            f"below even the hindsight bound with them (${o.bound.cost_per_million_tokens:.4f}/M)"
        )
    elif nogpu.cost_per_million_tokens < cost.cost_per_million_tokens:
        notes.append(
            f"no GPUs (${nogpu.cost_per_million_tokens:.4f}/M) beats the cost policy here "
            "although the GPUs could pay (bound below it)"
        )
    if not meets(cost):
        notes.append(f"cost policy misses the SLO target: {attainment(cost):.2%} interactive")
    if not o.feasible:
        best = o.best_attainment
        notes.append(
            f"no policy on this fleet reaches {SLO_TARGET:.0%} interactive (best: "
            f"{best.policy} at {attainment(best):.2%})"
        )
    if not o.bound.feasible:
        notes.append(
            f"no routing on this fleet can meet {SLO_TARGET:.0%} in every SLO class: the "
            "hindsight bound's relaxation has no solution"
        )
    if other is not None and meets(cost) and not o.cheapest_ok:
        gap = cost.cost_per_million_tokens / other.cost_per_million_tokens - 1.0
        notes.append(f"{other.policy} is {gap:.1%} cheaper than the cost policy at the SLO target")
    if not meets(cost) and o.bound.feasible:
        notes.append("the bound holds only for routings at the SLO target: not compared")
    elif o.bound_gap > BOUND_GAP:
        notes.append(f"cost policy is {o.bound_gap:.1%} above the hindsight bound")
    if o.schedule is not None:
        sch = o.schedule
        above = cost.cost_per_million_tokens / sch.cost_per_million_tokens - 1.0
        notes.append(
            f"a routing found offline with the whole trace known (the hindsight schedule: "
            f"{sch.moved} of {sch.candidates} requests the policy sent out moved local"
            f"{f' and {sch.moved_out} it served locally moved out' if sch.moved_out else ''}, "
            f"{sch.trials} trials in {sch.runs:.0f} runs' worth of simulation"
            f"{'' if sch.exhausted else ', search cut short'}) costs "
            f"${sch.cost_per_million_tokens:.4f}/M at the SLO: the least-cost routing lies "
            f"between the bound and it; the cost policy is {above:.1%} above it"
        )
    passed = sum(o.idle_passed.values())
    if passed and (notes or passed >= 0.01 * max(o.decisions, 1)):
        top, n = next(iter(o.idle_passed.items()))
        notes.append(
            f"the router passed over an idle local GPU {passed} times in {o.decisions} "
            f"decisions, most often '{top}' ({n}x): its prediction plus the learned error margin"
            " misses the SLO on an empty GPU"
        )
    return notes


def _fmt_policy(r: PolicyResult) -> str:
    return f"{r.cost_per_million_tokens:.4f} ({attainment(r):.1%})"


def _fmt_bound(o: Outcome) -> str:
    return f"{o.bound.cost_per_million_tokens:.4f}" if o.bound.feasible else "none at SLO"


def _fmt_gap(o: Outcome) -> str:
    return f"{o.bound_gap:+.1%}" if o.bound.feasible else "-"


def _fmt_schedule(s: Schedule | None) -> str:
    return "-" if s is None else f"{s.cost_per_million_tokens:.4f}"


def summary_table(outcomes: Sequence[Outcome]) -> str:
    """One row per scenario: $/M (interactive SLO) per policy, the bound and the verdict."""
    head = (
        "| scenario | cost | no GPUs | all-local | spill@N (best) | least-loaded | round-robin "
        "| bound | schedule | cost local share | cost vs bound | cheapest at SLO? |"
    )
    rows = [head, "|" + "---|" * 12]
    for o in outcomes:
        spill = next(r for r in o.results if r.policy.startswith("spill@"))
        verdict = "yes" if o.cheapest_ok else "NO" if o.feasible else "NO (no policy at SLO)"
        if o.gpus_lose:
            verdict += "; GPUs lose to no GPUs"
        rows.append(
            f"| {o.name} | {_fmt_policy(o.cost)} | {_fmt_policy(o.by('no-gpus'))} | "
            f"{_fmt_policy(o.by('all-local'))} | {spill.policy}: {_fmt_policy(spill)} | "
            f"{_fmt_policy(o.by('least-loaded'))} | {_fmt_policy(o.by('round-robin'))} | "
            f"{_fmt_bound(o)} | {_fmt_schedule(o.schedule)} | "
            f"{local_share(o.cost, o.scenario):.0%} | "
            f"{_fmt_gap(o)} | {verdict} |"
        )
    return "\n".join(rows)


def detail_table(outcomes: Sequence[Outcome]) -> str:
    """Every policy of every scenario: total $, $/M, SLO per class, local share."""
    rows = [
        "| scenario | policy | total $ | GPU $ | external $ | $/M | interactive SLO | "
        "batch SLO | local share | failed |",
        "|" + "---|" * 10,
    ]
    for o in outcomes:
        for r in o.results:
            att = r.slo_attainment
            rows.append(
                f"| {o.name} | {r.policy} | {r.total_cost_usd:.3f} | {r.gpu_cost_usd:.3f} | "
                f"{r.external_cost_usd:.3f} | {r.cost_per_million_tokens:.4f} | "
                f"{att.get('interactive', math.nan):.2%} | {att.get('batch', math.nan):.2%} | "
                f"{local_share(r, o.scenario):.0%} | {r.failed} |"
            )
        b = o.bound
        if not b.feasible:
            rows.append(f"| {o.name} | hindsight bound | none: no routing meets the SLO target |")
            continue
        rows.append(
            f"| {o.name} | hindsight bound | {b.total_usd:.3f} | {b.gpu_usd:.3f} | "
            f"{b.external_usd:.3f} | {b.cost_per_million_tokens:.4f} | (all) | (all) | "
            f"{b.local_token_share:.0%} | 0 |"
        )
    return "\n".join(rows)


def suite_json(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """{scenario: {policies, spill_sweep, bound, verdict, notes}}."""
    return {o.name: o.as_json() for o in outcomes}
