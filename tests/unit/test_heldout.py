"""Held-out scenarios (`neogate simulate --suite heldout --seed N`): drawn from a seed, inside
the documented ranges, valid scenario files, and run by the referee like the shipped ones."""

from __future__ import annotations

import argparse

import pytest

from loadtest.simulate.cli import add_simulate_parser, run_simulate
from loadtest.simulate.heldout import heldout_data, heldout_scenario, heldout_suite
from loadtest.simulate.suite import run_scenario


def test_same_seed_same_scenarios_other_seed_others() -> None:
    assert heldout_data(7, 3) == heldout_data(7, 3)
    assert [heldout_data(7, i) for i in range(10)] != [heldout_data(8, i) for i in range(10)]


def test_every_drawn_scenario_is_valid_and_inside_the_documented_ranges() -> None:
    for seed in range(1, 6):
        for ld in heldout_suite(seed):
            sc = ld.scenario
            assert 1 <= len(sc.locals) <= 3 and 1 <= len(sc.providers) <= 3
            for g in sc.locals:
                assert 1.8 <= g.model.price_per_hour <= 9.0
            big = sc.public_model == "llama-3.3-70b"
            lo, hi = (0.40, 1.20) if big else (0.02, 0.30)
            for p in sc.providers:
                assert lo <= p.input_per_million <= p.output_per_million <= hi
            limited = [p for p in sc.providers if p.tpm_limit is not None]
            assert len(limited) <= 1
            trace = ld.trace(60.0)
            assert trace.requests and {r.slo_class for r in trace.requests} <= {
                "interactive",
                "batch",
            }


def test_the_referee_runs_a_heldout_scenario() -> None:
    o = run_scenario(heldout_scenario(3, 0), 60.0)
    assert o.cost.requests > 0 and o.bound.total_usd > 0
    assert [r.policy for r in o.results][:3] == ["cost", "no-gpus", "all-local"]


def test_cli_suite_heldout(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["simulate", "--suite", "heldout", "--seed", "4", "--count", "2", "--short", "30"]
    )
    assert run_simulate(args) == 0
    out = capsys.readouterr().out
    assert "| heldout-4-0 |" in out and "| heldout-4-1 |" in out
