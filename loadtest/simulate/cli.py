"""`neogate simulate`: run the routing policies over a trace in simulated time and report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from gateway.config import ConfigError
from gateway.profiles import load_profile, shipped_profiles
from loadtest.simulate import suite_report
from loadtest.simulate.bound_lp import SolverMissing
from loadtest.simulate.engine import simulate
from loadtest.simulate.heldout import DEFAULT_COUNT, heldout_data, heldout_suite
from loadtest.simulate.report import goal_check, markdown, plot, results_json, table
from loadtest.simulate.routers import default_policies
from loadtest.simulate.scenario import default_scenario
from loadtest.simulate.scenario_file import LoadedScenario, load_scenario
from loadtest.simulate.schedule import DEFAULT_RUNS
from loadtest.simulate.suite import (
    SCENARIO_DIR,
    Outcome,
    run_scenario,
    scenario_files,
    suite_json,
    summary_table,
)
from loadtest.simulate.traces import BUILTIN, Trace, dump_trace, load_trace


def add_simulate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `simulate` sub-command to an argparse sub-parsers object; sets func=run_simulate."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="trace-driven policy simulator (simulated time, deterministic per seed)",
        description="Run neogate's cost policy and baselines over a trace against modelled "
        "local GPUs and providers; report cost per million tokens and SLO attainment.",
    )
    p.add_argument(
        "--trace",
        default="bursty",
        help=f"built-in trace ({', '.join(BUILTIN)}) or a JSON-lines trace file",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the trace and all noise")
    p.add_argument("--json", type=Path, help="write per-policy results as JSON here")
    p.add_argument("--report", type=Path, help="write report.md and simulate.png into this dir")
    p.add_argument(
        "--policies",
        help="comma-separated subset (cost,round-robin,always-local-until-error,"
        "cheapest-external,fastest)",
    )
    p.add_argument("--gpu-price", type=float, default=2.95, help="USD per GPU-hour (reserved)")
    p.add_argument(
        "--gpu-profile",
        default="llama-3.1-8b-h100",
        help="the local GPUs' performance profile: a shipped name "
        f"({', '.join(shipped_profiles())}) or a profile YAML file",
    )
    p.add_argument(
        "--scenario",
        type=Path,
        help="a scenario file (policy + trace + physics + price changes + TPM limits): run "
        "the cost policy, the baselines and the hindsight bound on it",
    )
    p.add_argument(
        "--suite",
        nargs="?",
        const=SCENARIO_DIR,
        type=Path,
        metavar="DIR",
        help=f"every *.yaml scenario in DIR (default: the shipped {SCENARIO_DIR.name}/); "
        "`--suite heldout --seed N`: scenarios drawn from seed N at run time "
        "(loadtest/simulate/heldout.py)",
    )
    p.add_argument(
        "--count",
        type=int,
        default=DEFAULT_COUNT,
        help="with --suite heldout: how many scenarios to draw",
    )
    p.add_argument(
        "--short",
        type=float,
        metavar="SECONDS",
        help="with --scenario/--suite: cut every trace to this many seconds",
    )
    p.add_argument(
        "--schedule-runs",
        type=int,
        default=DEFAULT_RUNS,
        metavar="N",
        help="with --scenario/--suite: the simulation the hindsight schedule's search may do "
        "where the cost policy is not within 10%% of the bound, in whole-trace runs: events "
        "handled over a replay's (a trial resumed from a snapshot halfway counts 1/2; no trial "
        "starts past N; 0: no search; loadtest/simulate/schedule.py)",
    )
    p.add_argument(
        "--save-trace",
        type=Path,
        help="also write the trace used as JSON lines (with --suite: a directory, one "
        "NAME.jsonl per scenario); `--trace file:PATH` or a scenario's trace file replays it",
    )
    p.add_argument(
        "--save-heldout",
        type=Path,
        metavar="DIR",
        help="with --suite heldout: also write each drawn scenario as DIR/NAME.yaml, an "
        "ordinary scenario file for --scenario",
    )
    p.set_defaults(func=run_simulate)
    return p


def _trace(arg: str, seed: int) -> Trace:
    gen = BUILTIN.get(arg)
    if gen is not None:
        return gen(seed)
    return load_trace(Path(arg))


def _plots_missing() -> str | None:
    """Why `--report` cannot draw its plots (matplotlib comes with `neogate[plots]`), or None.

    Checked before the simulation runs, not when the plot is drawn: a suite takes minutes
    and would otherwise end in a bare ImportError after its tables were printed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--report draws plots with matplotlib: pip install 'neogate[plots]'"
    return None


def run_simulate(args: argparse.Namespace) -> int:
    """Run the simulation the parsed arguments describe; 0 on success, 2 on bad input."""
    if args.report is not None and (why := _plots_missing()) is not None:
        print(f"neogate simulate: {why}", file=sys.stderr)
        return 2
    if args.scenario is not None or args.suite is not None:
        return _run_referee(args)
    try:
        trace = _trace(args.trace, args.seed)
    except (OSError, ValueError) as e:
        print(f"neogate simulate: cannot read trace {args.trace!r}: {e}", file=sys.stderr)
        return 2
    try:
        profile = load_profile(args.gpu_profile)
    except ValueError as e:
        print(f"neogate simulate: {e}", file=sys.stderr)
        return 2
    scenario = default_scenario(args.gpu_price, profile)
    policies = default_policies(args.seed, scenario.slo_classes)
    if args.policies:
        wanted = [w.strip() for w in args.policies.split(",") if w.strip()]
        known = {p.name for p in policies}
        unknown = [w for w in wanted if w not in known]
        if unknown or "cost" not in wanted:
            print(
                f"neogate simulate: --policies must include cost; known: {', '.join(known)}"
                + (f"; unknown: {', '.join(unknown)}" if unknown else ""),
                file=sys.stderr,
            )
            return 2
        policies = [p for p in policies if p.name in wanted]
    results = simulate(trace, policies, args.seed, scenario)
    print(
        f"trace {trace.name}: {len(trace.requests)} requests over {trace.duration_s:.0f} s, "
        f"seed {args.seed}"
    )
    print(table(results))
    print(goal_check(results).sentence())
    print(f"simulated in {sum(r.wall_s for r in results):.1f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results_json(results), indent=2) + "\n", encoding="utf-8")
    if args.save_trace is not None:
        args.save_trace.write_text("\n".join(dump_trace(trace)) + "\n", encoding="utf-8")
    if args.report is not None:
        args.report.mkdir(parents=True, exist_ok=True)
        png = "simulate.png"
        plot(trace, results, args.report / png)
        (args.report / "report.md").write_text(
            markdown(trace, scenario, results, args.seed, png), encoding="utf-8"
        )
        print(f"report: {args.report / 'report.md'}")
    return 0


def _run_referee(args: argparse.Namespace) -> int:
    if args.scenario is not None and args.suite is not None:
        print("neogate simulate: give --scenario or --suite, not both", file=sys.stderr)
        return 2
    heldout = args.suite is not None and args.suite == Path("heldout") and not args.suite.is_dir()
    if args.scenario is not None:
        paths = [args.scenario]
        command = f"neogate simulate --scenario {args.scenario}"
    elif heldout:
        paths = []
        command = f"neogate simulate --suite heldout --seed {args.seed}"
        if args.count != DEFAULT_COUNT:
            command += f" --count {args.count}"
    else:
        paths = scenario_files(args.suite)
        command = "neogate simulate --suite" + (
            "" if args.suite == SCENARIO_DIR else f" {args.suite}"
        )
        if not paths:
            print(f"neogate simulate: no *.yaml scenarios in {args.suite}", file=sys.stderr)
            return 2
    if args.short is not None:
        command += f" --short {args.short:g}"
    if args.schedule_runs != DEFAULT_RUNS:
        command += f" --schedule-runs {args.schedule_runs}"
    if args.save_heldout is not None and not heldout:
        print("neogate simulate: --save-heldout goes with --suite heldout", file=sys.stderr)
        return 2
    loaded: list[LoadedScenario] = []
    if heldout:
        loaded = heldout_suite(args.seed, args.count)
        if args.save_heldout is not None:
            args.save_heldout.mkdir(parents=True, exist_ok=True)
            for i in range(args.count):
                data = heldout_data(args.seed, i)
                path = args.save_heldout / f"{data['name']}.yaml"
                path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    for path in paths:
        try:
            loaded.append(load_scenario(path))
        except ConfigError as e:
            print(f"neogate simulate: {e.render()}", file=sys.stderr)
            return 2
    outcomes = []
    for one in loaded:
        try:
            outcome = run_scenario(one, args.short, max(args.schedule_runs, 0))
        except SolverMissing as e:
            print(f"neogate simulate: {e}", file=sys.stderr)
            return 2
        print(
            f"{outcome.name}: {len(outcome.trace.requests)} requests over "
            f"{outcome.trace.duration_s:.0f} s",
            file=sys.stderr,
        )
        outcomes.append(outcome)
        if args.save_trace is not None:
            _save_trace(args.save_trace, outcome, several=args.scenario is None)
    print(summary_table(outcomes))
    print()
    print("\n".join(suite_report.verdict_lines(outcomes)))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(suite_json(outcomes), indent=2) + "\n", encoding="utf-8")
    if args.report is not None:
        args.report.mkdir(parents=True, exist_ok=True)
        png = "suite.png"
        suite_report.plot(outcomes, args.report / png)
        (args.report / "report.md").write_text(
            suite_report.markdown(outcomes, command, png), encoding="utf-8"
        )
        print(f"report: {args.report / 'report.md'}")
    return 0


def _save_trace(where: Path, outcome: Outcome, *, several: bool) -> None:
    """The trace a scenario ran: to `where` itself, or with a suite to where/NAME.jsonl."""
    if several:
        where.mkdir(parents=True, exist_ok=True)
        where = where / f"{outcome.name}.jsonl"
    where.write_text("\n".join(dump_trace(outcome.trace)) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m loadtest.simulate ...` without the neogate CLI."""
    parser = argparse.ArgumentParser(prog="neogate")
    sub = parser.add_subparsers(dest="command", required=True)
    add_simulate_parser(sub)
    args = parser.parse_args(["simulate", *(argv if argv is not None else sys.argv[1:])])
    return run_simulate(args)
