"""`neogate simulate --suite`: a short version of every shipped scenario, its invariants and the
targets that hold today (see docs/benchmarks.md for the full run and where the cost policy misses).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from loadtest.simulate.cli import add_simulate_parser, run_simulate
from loadtest.simulate.heldout import DEFAULT_COUNT, heldout_suite
from loadtest.simulate.suite import (
    BOUND_GAP,
    SLO_TARGET,
    SPILL_SWEEP,
    Outcome,
    attainment,
    local_share,
    meets,
    run_scenario,
    run_suite,
    scenario_files,
)

SHORT_S = 180.0


# Targets that hold on the short run today. A router change that breaks one fails here; one
# that makes another hold does not (add it). The misses are reported by the suite itself.
# Measured on the short run, 2026-12-05 (the population SLO budget, policies/budget.py):
# cheapest at the SLO in 10 of 10, within 10% of the bound in 7 (not the 70B pair, whose
# bound ignores prefill stalls, nor tpm-limited-8b).
CHEAPEST_AT_SLO = {
    "70b-vs-groq",
    "70b-vs-together",
    "bursty-8b",
    "diurnal-8b",
    "flat-4-8b",
    "long-context-8b",
    "on-demand-8b",
    "price-cut-8b",
    "steady-8b",
    "tpm-limited-8b",
}
WITHIN_BOUND = {
    "bursty-8b",
    "diurnal-8b",
    "flat-4-8b",
    "long-context-8b",
    "on-demand-8b",
    "price-cut-8b",
    "steady-8b",
}


@pytest.fixture(scope="module")
def outcomes() -> dict[str, Outcome]:
    # A short search: the invariants, not how far it gets (`--schedule-runs` in the docs).
    return {o.name: o for o in run_suite(None, SHORT_S, schedule_runs=20)}


def test_the_suite_ships_the_scenarios_the_issue_names(outcomes: dict[str, Outcome]) -> None:
    assert len(scenario_files()) >= 8
    assert {
        "bursty-8b",
        "steady-8b",
        "flat-4-8b",
        "diurnal-8b",
        "70b-vs-groq",
        "70b-vs-together",
        "price-cut-8b",
        "tpm-limited-8b",
        "on-demand-8b",
        "long-context-8b",
    } <= set(outcomes)
    for o in outcomes.values():
        names = [r.policy for r in o.results]
        assert names[:3] == ["cost", "no-gpus", "all-local"]
        assert names[3].startswith("spill@") and names[4:] == ["least-loaded", "round-robin"]


def test_honest_invariants(outcomes: dict[str, Outcome]) -> None:
    for name, o in outcomes.items():
        sc = o.scenario
        held = sc.gpu_cost_per_hour() * o.trace.duration_s / 3600
        nogpu = o.by("no-gpus")
        # The no-GPU fleet carries no GPU cost and serves nothing locally.
        assert nogpu.gpu_cost_usd == 0.0 and local_share(nogpu, sc) == 0.0, name
        for r in o.results:
            if r.policy != "no-gpus":
                # Every fleet policy pays for the GPUs over the whole trace, used or not.
                assert r.gpu_cost_usd >= held - 1e-9, (name, r.policy)
        assert o.bound.gpu_usd >= held - 1e-9, name
        assert_bound_below_every_policy_at_the_slo(o)
        # The hindsight schedule is looked for only where the cost policy meets the target in
        # every class and is not within BOUND_GAP of the bound; it meets the target, never
        # costs more than the routing it started from, and never less than the bound.
        looked = o.bound_gap > BOUND_GAP and min(o.cost.slo_attainment.values()) >= SLO_TARGET
        # (The start replays the policy's run exactly, TPM limits included, so a policy
        # that meets the target gives a start that does.)
        assert (o.schedule is not None) == looked, name
        if o.schedule is not None:
            s = o.schedule
            assert min(s.result.slo_attainment.values()) >= SLO_TARGET, name
            assert s.cost_per_million_tokens <= s.start_cost_per_million, name
            assert o.bound.total_usd <= s.result.total_cost_usd + 1e-9, name
        # spill@N is the cheapest N of the sweep that meets the SLO (else the best attainment).
        shown = next(r for r in o.results if r.policy.startswith("spill@"))
        assert [r.policy for r in o.spill_sweep] == [f"spill@{n}" for n in SPILL_SWEEP]
        # "Some policy meets the SLO" counts every same-fleet policy and every N of the sweep.
        same_fleet = [r for r in o.results if r.policy != "no-gpus"] + o.spill_sweep
        assert o.feasible == any(meets(r) for r in same_fleet), name
        assert o.cheapest_ok <= o.feasible, name
        ok = [r for r in o.spill_sweep if meets(r)]
        if ok:
            assert shown.cost_per_million_tokens == min(r.cost_per_million_tokens for r in ok)
        else:
            assert attainment(shown) == max(attainment(r) for r in o.spill_sweep)


def assert_bound_below_every_policy_at_the_slo(o: Outcome) -> None:
    """The bound is a lower bound of every same-fleet policy that meets the SLO target in
    every class (the cost policy, each baseline, each N of the spill sweep); a policy that
    misses it may undercut the bound, as all-local does. Every policy here that meets the
    interactive target meets the batch one too, so the claim covers all the suite counts."""
    for r in [*o.results, *o.spill_sweep]:
        if r.policy == "no-gpus":
            continue
        if meets(r):
            assert min(r.slo_attainment.values()) >= SLO_TARGET, (o.name, r.policy)
        if min(r.slo_attainment.values()) >= SLO_TARGET:
            assert o.bound.total_usd <= r.total_cost_usd + 1e-9, (o.name, r.policy)
            assert o.bound.cost_per_million_tokens <= r.cost_per_million_tokens + 1e-9


# Held-out seeds drawn for this test (2026-12-05), not used to tune the bound or the router.
@pytest.mark.parametrize("seed", [11, 12])
def test_the_bound_holds_on_held_out_scenarios(seed: int) -> None:
    for loaded in heldout_suite(seed, DEFAULT_COUNT):
        o = run_scenario(loaded, 120.0, schedule_runs=8)
        assert_bound_below_every_policy_at_the_slo(o)
        # The schedule is one more routing at the SLO target in every class.
        if o.schedule is not None:
            assert o.bound.total_usd <= o.schedule.result.total_cost_usd + 1e-9, o.name


def test_targets_that_hold(outcomes: dict[str, Outcome]) -> None:
    for name in CHEAPEST_AT_SLO:
        o = outcomes[name]
        assert o.cheapest_ok, (name, o.notes)
    for name in WITHIN_BOUND:
        o = outcomes[name]
        assert o.within_bound and o.bound_gap <= BOUND_GAP, (name, o.bound_gap)


def test_a_cost_policy_below_the_slo_is_not_within_the_bound(
    outcomes: dict[str, Outcome],
) -> None:
    # The bound holds only for routings at the SLO target: below it a policy may sit anywhere
    # against it (heldout-203-0: bound 0.8243 above the policy's 0.3535, once counted within).
    o = outcomes["flat-4-8b"]
    assert o.within_bound and o.bound_gap <= BOUND_GAP
    cost = dataclasses.replace(
        o.cost, slo_attainment={**o.cost.slo_attainment, "interactive": 0.98}
    )
    missed = dataclasses.replace(o, results=[cost, *o.results[1:]])
    assert missed.bound_gap == o.bound_gap and not missed.within_bound
    assert not missed.as_json()["verdict"]["within_bound_target"]


def test_where_owning_gpus_loses_the_suite_says_so(outcomes: dict[str, Outcome]) -> None:
    # 8B: Groq at $0.05/$0.08 undercuts two H100s even if they were perfectly routed.
    for name in ("bursty-8b", "flat-4-8b", "steady-8b"):
        o = outcomes[name]
        assert o.gpus_lose and any("owning the GPUs loses" in n for n in o.notes), name
    # 70B on a $7/h pair pays against a hosted 70B at $0.59/$0.79 on this load.
    assert not outcomes["70b-vs-groq"].gpus_lose


def test_cli_scenario_writes_table_json_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers())
    src = next(p for p in scenario_files() if p.stem == "flat-4-8b")
    args = parser.parse_args(
        [
            "simulate",
            "--scenario",
            str(src),
            "--short",
            "60",
            "--json",
            str(tmp_path / "out.json"),
            "--report",
            str(tmp_path / "rep"),
        ]
    )
    assert run_simulate(args) == 0
    out = capsys.readouterr().out
    assert "| flat-4-8b |" in out and "owning the GPUs loses" in out
    data = json.loads((tmp_path / "out.json").read_text())["flat-4-8b"]
    assert set(data["policies"]) >= {"cost", "no-gpus", "all-local", "least-loaded"}
    assert data["bound"]["total_cost_usd"] > 0 and data["verdict"]["gpus_lose_to_no_gpus"]
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "neogate simulate --scenario" in report and "hindsight bound" in report
    assert (tmp_path / "rep" / "suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --suite over a directory; a bad scenario is a clear error, exit 2.
    d = tmp_path / "scen"
    d.mkdir()
    shutil.copy(src, d / "a.yaml")
    assert run_simulate(parser.parse_args(["simulate", "--suite", str(d), "--short", "30"])) == 0
    (d / "b.yaml").write_text(src.read_text().replace("shape: steady", "shape: zigzag"))
    capsys.readouterr()
    assert run_simulate(parser.parse_args(["simulate", "--suite", str(d), "--short", "30"])) == 2
    assert "simulate.trace.shape" in capsys.readouterr().err
    assert run_simulate(parser.parse_args(["simulate", "--suite", str(tmp_path / "none")])) == 2
