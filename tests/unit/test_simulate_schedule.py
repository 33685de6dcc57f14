"""The hindsight schedule (`loadtest/simulate/schedule.py`): an achievable routing found offline,
the upper end of the bracket [bound, schedule] around the least-cost routing at the SLO."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from loadtest.simulate.bound import hindsight_bound
from loadtest.simulate.engine import Engine
from loadtest.simulate.results import PolicyResult
from loadtest.simulate.routers import CheapestExternal, SelectPolicy
from loadtest.simulate.scenario import Scenario
from loadtest.simulate.scenario_file import load_scenario
from loadtest.simulate.schedule import (
    Plan,
    PlannedEngine,
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
    # the replay, [0] moves, [1, 3] move, [4] alone misses its TTFT (1 of 5 > 1%): rejected.
    assert (s.runs, s.candidates, s.moved, s.tried, s.exhausted) == (4, 4, 3, 4, True)
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


def _cost_run(scenario: str) -> Run:
    """The cost policy's run over the first 180 s of a shipped scenario."""
    loaded = load_scenario(SCENARIO_DIR / f"{scenario}.yaml")
    sc, seed = loaded.scenario, loaded.seed
    trace = loaded.trace(180.0)
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
    assert s is not None and s.runs <= 30
    assert meets_every_class(s.result, SLO_TARGET)
    assert s.moved > 0 and s.cost_per_million_tokens < s.start_cost_per_million
    bound = hindsight_bound(seventy.sc, seventy.trace, seventy.seed)
    assert bound.cost_per_million_tokens <= s.cost_per_million_tokens
