"""Is a population SLO budget per process right for `neogate serve --workers N`? A measurement.

Each worker process keeps its own budgets (`gateway.flow.slo_budgets`) over the requests
the kernel hands it. This runs the cost policy over the shipped scenarios with the
simulated gateway's budget split the same way (`Engine(processes=N)`: each request counted,
charged and settled in one of N budgets, chosen at random) and prints, per N, what the
split changes: interactive SLO attainment, $/M, local share and the budget spent (local
requests admitted on it). Everything else (in-flight counts, latency learning) is shared,
so the difference is the budget's alone.

Run: `python -m loadtest.simulate.per_process [--processes 1 2 4 8] [--duration-s S]
[--heldout SEED ...] [--splits K]`: held-out scenarios of those seeds instead of the shipped
ones; K > 1 runs each N > 1 over K random splits (split seeds 1000..) and prints each.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

from loadtest.simulate.engine import Engine
from loadtest.simulate.heldout import heldout_suite
from loadtest.simulate.routers import SelectPolicy
from loadtest.simulate.scenario_file import LoadedScenario, load_scenario
from loadtest.simulate.suite import attainment, local_share, scenario_files
from policies.select import compile_policy


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--duration-s", type=float, default=None, help="shorten every trace")
    ap.add_argument("--scenario", nargs="*", default=None, help="scenario names (default: all)")
    ap.add_argument("--heldout", type=int, nargs="*", default=None, help="held-out seeds")
    ap.add_argument("--splits", type=int, default=1, help="random splits per N > 1")
    args = ap.parse_args(argv)
    runs: list[LoadedScenario] = []
    if args.heldout:
        runs = [s for seed in args.heldout for s in heldout_suite(seed)]
    else:
        runs = [load_scenario(p) for p in scenario_files()]
    print("scenario | N | interactive SLO | $/M | local share | charged to budget | failed")
    for loaded in runs:
        if args.scenario and loaded.name not in args.scenario:
            continue
        sc, seed = loaded.scenario, loaded.seed
        trace = loaded.trace(args.duration_s)
        for n in args.processes:
            for split in range(args.splits if n > 1 else 1):
                policy = compile_policy(sc.cost_policy, sc.slo_classes)
                engine = Engine(sc, trace, SelectPolicy("cost", policy, random.Random(seed)),
                                seed, processes=n)  # fmt: skip
                if args.splits > 1:
                    rng = random.Random(1000 + split)
                    engine.shard_of = [rng.randrange(n) for _ in trace.requests]
                res = engine.run()
                charged = sum(1 for r in engine.reqs if r.miss_charge > 0.0)
                print(
                    f"{loaded.name} | {n} | {attainment(res):.3%} | "
                    f"{res.cost_per_million_tokens:.4f} | {local_share(res, sc):.1%} | "
                    f"{charged} | {res.failed}"
                )


if __name__ == "__main__":
    main()
