"""The hindsight schedule (`loadtest/simulate/schedule.py`): an achievable routing found offline,
the upper end of the bracket [bound, schedule] around the least-cost routing at the SLO."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import pytest

from loadtest.simulate.backends import ProviderSpec
from loadtest.simulate.bound import hindsight_bound
from loadtest.simulate.engine import Engine
from loadtest.simulate.results import PolicyResult
from loadtest.simulate.routers import CheapestExternal, SelectPolicy
from loadtest.simulate.scenario import Scenario
from loadtest.simulate.scenario_file import load_scenario
from loadtest.simulate.schedule import (
    Plan,
    PlannedEngine,
    Trial,
    Trials,
    meets_every_class,
    search,
    start_plan,
)
from loadtest.simulate.suite import SCENARIO_DIR, SLO_TARGET
from loadtest.simulate.traces import Trace, TraceRequest
from policies.select import compile_policy
from tests.unit.test_simulate_referee import _one_gpu


def test_search_by_hand() -> None:
    # One GPU (prefill 1,000 tokens/s, $0.001 per second held) and a provider at $1e-4 a
    # token; every request has 1 output token, so its local need is its prefill alone.
    reqs = [
        TraceRequest(0.0, 500, 1, 1, "interactive"),  # 0.5 GPU-s, $0.0501 out: 0.1002 $/GPU-s
        TraceRequest(10.0, 500, 1, 1, "interactive"),  # the same
        TraceRequest(20.0, 1500, 1, 1, "interactive"),  # 1.5 s of prefill: past the 1-s TTFT
        TraceRequest(30.0, 600, 1, 1, "interactive"),  # 0.6 GPU-s, $0.0601: 0.10017
        TraceRequest(30.0, 600, 1, 1, "interactive"),  # behind it: 1.2 s to its first token
    ]
    sc, trace = _one_gpu(40.0, reqs)
    start_run = Engine(sc, trace, CheapestExternal(), 1)
    start_run.run()
    start = start_plan(start_run)
    assert start.local == frozenset()  # the start sent everything out
    s = search(sc, trace, 1, start, SLO_TARGET)
    assert s is not None
    # Densest first, in chunks of 1 (4 candidates / 16, at least 1) doubling on success:
    # [0] moves, [1, 3] move, [4] alone misses its TTFT (1 of 5 > 1%): rejected. Each trial
    # resumes where its first changed request arrives: after the replay (1 run), [0] re-runs
    # it all, [1, 3] from request 1 (4 of 5 arrivals on), [4] from request 3. The first pass
    # moved some, so a second tries [4] again (still a miss) and, moving none, is the last.
    assert (s.trials, s.candidates, s.moved, s.tried, s.exhausted) == (4, 4, 3, 4, True)
    assert s.passes == 2
    assert 2.0 < s.runs < 5.0
    assert s.start_cost_per_million == pytest.approx(
        (0.0501 * 2 + 0.1501 + 0.0601 * 2 + 0.040) / sum(r.prompt_tokens + 1 for r in reqs) * 1e6
    )
    # Held 40 s ($0.040) + requests 2 and 4 outside.
    assert s.result.total_cost_usd == pytest.approx(0.040 + 0.1501 + 0.0601)
    assert s.result.token_share["g"] == pytest.approx(
        (501 + 501 + 601) / (501 * 2 + 1501 + 601 * 2)
    )
    assert meets_every_class(s.result, SLO_TARGET)
    assert hindsight_bound(sc, trace, 1).total_usd <= s.result.total_cost_usd + 1e-12


def test_a_request_that_makes_a_local_one_miss_moves_in_with_it_moved_out() -> None:
    # One GPU (1,000 prompt tokens/s, TTFT 1 s). The start serves the small request locally
    # and sends the big one out; both arrive at once, the big one first. Moved local alone, the
    # big one goes first and the small one waits 0.9 s behind it: 1.2 s to its first token, a
    # miss (1 of 2). With the small one moved out ($0.0301) the big one ($0.0901 outside) fits.
    reqs = [
        TraceRequest(0.0, 900, 1, 1, "interactive"),
        TraceRequest(0.0, 300, 1, 1, "interactive"),
    ]
    sc, trace = _one_gpu(10.0, reqs)
    start = Plan(frozenset({1}), {1: 0.0}, {0: ("p", 0.0), 1: ("g", 0.0)})
    s = search(sc, trace, 1, start, SLO_TARGET)
    assert s is not None
    assert s.start_cost_per_million == pytest.approx((0.010 + 0.0901) / 1202 * 1e6)
    assert (s.trials, s.tried, s.moved, s.moved_out) == (2, 1, 1, 1)
    assert s.result.total_cost_usd == pytest.approx(0.010 + 0.0301)
    assert s.result.slo_attainment == {"interactive": 1.0}


def test_a_request_moved_out_goes_where_the_tokens_are() -> None:
    # A cheap provider limited to 600 tokens a minute and a dear one. Request 0 is sent to the
    # cheap one (501 tokens of its bucket); request 1, served locally by the start and now
    # moved out, arrives 1 s later, when the bucket holds 109: it goes to the dear provider
    # at once rather than being refused (429) and failing over after a delay.
    reqs = [
        TraceRequest(0.0, 500, 1, 1, "interactive"),
        TraceRequest(1.0, 500, 1, 1, "interactive"),
    ]
    sc, trace = _one_gpu(10.0, reqs)
    cheap = ProviderSpec("cheap", "m", 1.0, 1.0, 0.1, 0.0, 1e9, 0.001, 0.0, tpm_limit=600)
    dear = ProviderSpec("dear", "m", 100.0, 100.0, 0.1, 0.0, 1e9, 0.001, 0.0)
    sc = dataclasses.replace(sc, providers=(cheap, dear))
    plan = Plan(frozenset(), {}, {0: ("cheap", 0.0), 1: ("g", 1.0)})
    engine = PlannedEngine(sc, trace, 1, plan, [("cheap", "dear")] * 2)
    engine.run()
    assert [r.backend for r in engine.reqs] == ["cheap", "dear"]
    assert engine.refusals == 0 and engine.reqs[1].dispatched_at == 1.0


def test_a_start_that_misses_the_target_gives_no_schedule() -> None:
    reqs = [
        TraceRequest(0.0, 600, 1, 1, "interactive"),
        TraceRequest(0.0, 600, 1, 1, "interactive"),
    ]
    sc, trace = _one_gpu(10.0, reqs)
    # Both local: the second waits 0.6 s behind the first, 1.2 s to its first token.
    assert search(sc, trace, 1, Plan(frozenset({0, 1}), {}), SLO_TARGET) is None


@dataclass(frozen=True)
class Run:
    sc: Scenario
    trace: Trace
    seed: int
    engine: Engine
    result: PolicyResult


def _cost_run(scenario: str, duration_s: float = 180.0) -> Run:
    """The cost policy's run over the first 180 s (`duration_s`) of a shipped scenario."""
    loaded = load_scenario(SCENARIO_DIR / f"{scenario}.yaml")
    sc, seed = loaded.scenario, loaded.seed
    trace = loaded.trace(duration_s)
    policy = SelectPolicy(
        "cost", compile_policy(sc.cost_policy, sc.slo_classes), random.Random(seed)
    )
    engine = Engine(sc, trace, policy, seed)
    return Run(sc, trace, seed, engine, engine.run())


def _replay(run: Run) -> PolicyResult:
    """The run's routing replayed as the schedule's start."""
    names = tuple(p.name for p in run.sc.providers)
    plan = start_plan(run.engine)
    return PlannedEngine(run.sc, run.trace, run.seed, plan, [names] * len(run.engine.reqs)).run()


@pytest.fixture(scope="module")
def seventy() -> Run:
    """The cost policy's run over the first 180 s of 70b-vs-groq."""
    return _cost_run("70b-vs-groq")


def test_the_cost_policys_routing_replays_exactly(seventy: Run) -> None:
    plan = start_plan(seventy.engine)
    assert 0 < len(plan.local) < len(seventy.engine.reqs)
    # Without TPM limits the providers answer the same whoever asks first: the replay of the
    # policy's local set (same dispatch times) is the policy's run.
    replay = _replay(seventy)
    assert replay.total_cost_usd == pytest.approx(seventy.result.total_cost_usd)
    assert replay.slo_attainment == seventy.result.slo_attainment


def test_the_replay_is_exact_under_a_tpm_limit_too() -> None:
    # tpm-limited-8b: two workers and a TPM-limited cheapest provider. The replay sends each
    # request to the worker or provider the policy's run did, when it did, so the bucket
    # drains as it did. (Sent to the least-loaded worker and the cheapest provider instead,
    # before 2026-12-06, the replay of this run met 98.67% interactive against the policy's
    # 99.57%, and the search had no start.)
    run = _cost_run("tpm-limited-8b")
    assert any(p.tpm_limit is not None for p in run.sc.providers)
    replay = _replay(run)
    assert replay.total_cost_usd == pytest.approx(run.result.total_cost_usd)
    assert replay.slo_attainment == run.result.slo_attainment


def test_the_schedule_sits_between_the_bound_and_the_policy(seventy: Run) -> None:
    s = search(
        seventy.sc, seventy.trace, seventy.seed, start_plan(seventy.engine), SLO_TARGET, runs=30
    )
    assert s is not None and s.runs < 30 + 1  # no trial starts past 30 runs
    assert meets_every_class(s.result, SLO_TARGET)
    assert s.moved > 0 and s.cost_per_million_tokens < s.start_cost_per_million
    bound = hindsight_bound(seventy.sc, seventy.trace, seventy.seed)
    assert bound.cost_per_million_tokens <= s.cost_per_million_tokens


def _outcomes(engine: Engine) -> list[tuple[object, ...]]:
    """Every request's outcome in a finished run, to compare two runs exactly."""
    fields = ("backend", "dispatched_at", "first_token_at", "done_at", "failed", "cost_usd")
    return [tuple(getattr(r, f) for f in (*fields, "chargeback_usd")) for r in engine.reqs]


@pytest.mark.parametrize(
    ("scenario", "duration_s", "fork_at"),
    [("70b-vs-groq", 180.0, 90.0), ("tpm-limited-8b", 180.0, 90.0), ("price-cut-8b", 640.0, 590.0)],
)
def test_a_fork_goes_on_as_the_run_would(scenario: str, duration_s: float, fork_at: float) -> None:
    # The cost policy's own run (its learned state, budgets and the policy's counters), forked
    # partway (price-cut-8b: before its price change at 600 s): the original and the fork,
    # each run on to the end, are the uninterrupted run.
    full = _cost_run(scenario, duration_s)
    loaded = load_scenario(SCENARIO_DIR / f"{scenario}.yaml")
    policy = SelectPolicy(
        "cost", compile_policy(full.sc.cost_policy, full.sc.slo_classes), random.Random(full.seed)
    )
    engine = Engine(full.sc, loaded.trace(duration_s), policy, full.seed)
    engine.start()
    engine.advance(fork_at)
    fork = engine.fork()
    for run in (engine, fork):
        run.advance()
        assert run.finish().total_cost_usd == full.result.total_cost_usd
        assert _outcomes(run) == _outcomes(full.engine)


def test_a_request_copy_misses_no_field() -> None:
    reqs = [TraceRequest(0.0, 500, 1, 1, "interactive")]
    sc, trace = _one_gpu(10.0, reqs)
    r = Engine(sc, trace, CheapestExternal(), 1).reqs[0]
    for n, f in enumerate(dataclasses.fields(r)):
        if f.name not in ("i", "tr", "rr"):
            setattr(r, f.name, (n,))
    copy = r.copy()
    assert copy is not r
    assert all(getattr(copy, f.name) == getattr(r, f.name) for f in dataclasses.fields(r))


def test_a_trial_resumed_from_a_snapshot_is_the_full_run(seventy: Run) -> None:
    sc, trace, seed = seventy.sc, seventy.trace, seventy.seed
    names = [tuple(p.name for p in sc.providers)] * len(trace.requests)
    start = start_plan(seventy.engine)
    out = [r.i for r in seventy.engine.reqs if r.i not in start.local]

    def plan(moved: list[int]) -> Plan:
        return Plan(start.local.union(moved), start.dispatch_at, start.sent)

    def same_as_full_run(trial: Trial, p: Plan) -> None:
        engine = PlannedEngine(sc, trace, seed, p, names)
        result = engine.run()
        assert trial.result is not None
        assert trial.result.total_cost_usd == result.total_cost_usd
        assert trial.result.slo_attainment == result.slo_attainment
        assert _outcomes(trial.engine) == _outcomes(engine)

    trials = Trials(sc, trace, seed, start, names, target=0.0)
    # Two requests sent out in the second half moved local: resumed from a snapshot past 90 s.
    late = [i for i in out if trace.requests[i].t > 90.0][:2]
    first = trials.run(plan(late), trace.requests[late[0]].t)
    same_as_full_run(first, plan(late))
    assert first.result is not None and first.result.total_cost_usd < trials.result.total_cost_usd
    assert trials.work < 1.6  # the replay, then the trial from past 90 s
    # Kept as the best, its snapshots past the change are its own: a trial changing an earlier
    # request (before `late`) and one changing a later one both resume to the exact full run.
    trials.keep(first)
    for more in ([i for i in out if 30.0 < trace.requests[i].t < 60.0][:1], out[-1:]):
        moved = late + more
        same_as_full_run(
            trials.run(plan(moved), min(trace.requests[i].t for i in more)), plan(moved)
        )


def test_a_trial_stops_when_it_can_no_longer_meet_the_target(seventy: Run) -> None:
    # Everything the policy sent out moved local: the full run misses the target; the trial
    # stops early (less work than the full run), and says so with no result.
    sc, trace, seed = seventy.sc, seventy.trace, seventy.seed
    names = [tuple(p.name for p in sc.providers)] * len(trace.requests)
    start = start_plan(seventy.engine)
    every = Plan(frozenset(range(len(trace.requests))), start.dispatch_at, start.sent)
    assert not meets_every_class(PlannedEngine(sc, trace, seed, every, names).run(), SLO_TARGET)
    trials = Trials(sc, trace, seed, start, names, SLO_TARGET)
    trial = trials.run(every, 0.0)
    assert trial.result is None and trial.missed
    assert trials.work < 2.0
