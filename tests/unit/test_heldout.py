"""Held-out scenarios (`neogate simulate --suite heldout --seed N`): drawn from a seed, inside
the documented ranges, valid scenario files, and run by the referee like the shipped ones."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from loadtest.simulate.cli import add_simulate_parser, run_simulate
from loadtest.simulate.heldout import heldout_data, heldout_scenario, heldout_suite
from loadtest.simulate.scenario_file import load_scenario
from loadtest.simulate.suite import run_scenario
from loadtest.simulate.traces import load_trace


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


def _simulate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers())
    return run_simulate(parser.parse_args(["simulate", *argv]))


def test_cli_saves_heldout_scenarios_and_their_traces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The drawn scenarios as ordinary scenario files, and the traces every run used: a
    # held-out result can be replayed with --scenario after the seed's code has changed.
    argv = ["--suite", "heldout", "--seed", "4", "--count", "2", "--short", "30"]
    saved, traces = tmp_path / "scenarios", tmp_path / "traces"
    assert _simulate([*argv, "--save-heldout", str(saved), "--save-trace", str(traces)]) == 0
    table = capsys.readouterr().out
    assert sorted(p.name for p in saved.iterdir()) == ["heldout-4-0.yaml", "heldout-4-1.yaml"]
    assert sorted(p.name for p in traces.iterdir()) == ["heldout-4-0.jsonl", "heldout-4-1.jsonl"]
    again = load_scenario(saved / "heldout-4-1.yaml")
    assert again.scenario == heldout_scenario(4, 1).scenario
    ran = load_trace(traces / "heldout-4-1.jsonl")
    drawn = again.trace(30.0).requests
    assert [dataclasses.replace(r, t=0.0) for r in ran.requests] == [
        dataclasses.replace(r, t=0.0) for r in drawn
    ]
    assert [r.t for r in ran.requests] == pytest.approx([r.t for r in drawn], abs=5e-4)
    # The saved file runs as a scenario and gives the row the suite gave.
    one = tmp_path / "one.jsonl"
    assert (
        _simulate(
            [
                "--scenario",
                str(saved / "heldout-4-1.yaml"),
                "--short",
                "30",
                "--save-trace",
                str(one),
            ]
        )
        == 0
    )
    row = next(x for x in table.splitlines() if x.startswith("| heldout-4-1 |"))
    assert row in capsys.readouterr().out
    assert load_trace(one).requests == ran.requests


def test_save_heldout_needs_the_heldout_suite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _simulate(["--suite", "--save-heldout", str(tmp_path), "--short", "10"]) == 2
    assert "--save-heldout goes with --suite heldout" in capsys.readouterr().err
