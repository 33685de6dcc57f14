"""Micro-benchmark of `policies.select.select` at 8 candidate backends (CPU per call).

Run: `python -m loadtest.bench_routing [--calls N] [--repeats R]`. Prints the median
ns/op of each policy and of a trivial baseline (cheapest of 8 prices) measured in the
same run, so numbers from different machines can be compared by their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from policies.costmodel import GpuModel
from policies.headroom import Headroom
from policies.select import Policy, compile_policy, select
from policies.spec import (
    CostPolicySpec,
    GpuSpec,
    LatencyPolicySpec,
    PinnedPolicySpec,
    WeightedPolicySpec,
    default_slo_classes,
)
from policies.types import BackendSnapshot, RouteRequest, Slo

BUDGET_NS = 50_000


def snapshots() -> tuple[BackendSnapshot, ...]:
    """Two local H100 workers and six providers, one of them reporting rate-limit headroom."""
    gpu = GpuModel.from_spec(GpuSpec(price_per_hour=2.95))
    local = tuple(
        BackendSnapshot(
            f"gpu-{i}",
            "llama-3.1-8b",
            is_local=True,
            gpu=gpu,
            inflight=7 + 5 * i,
            running=6,
            queued=0,
            kv_usage=0.3,
            metrics_fresh=True,
            pending_prefill_tokens=2000 * i,
            # Prompts arriving (a loaded worker): the prefill-load path of the prediction runs.
            recent_prompt_tokens_per_s=3000.0 + 2000.0 * i,
            ttft_spread_s=0.02,
        )
        for i in range(2)
    )
    prices = [(0.05, 0.08), (0.18, 0.18), (0.20, 0.20), (0.02, 0.05), (0.10, 0.10), (0.15, 0.60)]
    remote = tuple(
        BackendSnapshot(
            f"ext-{i}",
            "llama-3.1-8b",
            price_in_per_token=pi / 1e6,
            price_out_per_token=po / 1e6,
            price_version=3,
            ttft_s=0.2 + 0.1 * i,
            ttft_spread_s=0.05,
            itl_s=0.002 + 0.002 * i,
            itl_spread_s=0.001,
            headroom=Headroom(
                limit_tokens=200_000,
                remaining_tokens=150_000,
                reset_tokens_at=10.0,
                observed_at=0.5,
            )
            if i == 0
            else Headroom(),
        )
        for i, (pi, po) in enumerate(prices)
    )
    return local + remote


def _median_ns(fn: Callable[[], object], calls: int, repeats: int) -> float:
    runs: list[float] = []
    for _ in range(repeats):
        t0 = time.process_time_ns()
        for _ in range(calls):
            fn()
        runs.append((time.process_time_ns() - t0) / calls)
    return statistics.median(runs)


def run(calls: int, repeats: int) -> dict[str, float]:
    """Median ns per call for each policy and for the baseline."""
    snaps = snapshots()
    slo = Slo.from_spec(default_slo_classes()["interactive"])
    req = RouteRequest("llama-3.1-8b", 900, 512, 220, True, "interactive", slo, None, "t1")
    policies: dict[str, Policy] = {
        "cost": compile_policy(CostPolicySpec()),
        "latency": compile_policy(LatencyPolicySpec()),
        "weighted": compile_policy(WeightedPolicySpec(weights={s.name: 1.0 for s in snaps})),
        "pinned": compile_policy(PinnedPolicySpec(order=[s.name for s in snaps])),
    }
    prices: Sequence[float] = [s.price_out_per_token for s in snaps]
    out = {"baseline(min of 8 prices)": _median_ns(lambda: min(prices), calls, repeats)}
    for name, pol in policies.items():

        def call(p: Policy = pol) -> object:
            return select(req, snaps, p, 1.0, rng_value=0.3)

        out[name] = _median_ns(call, calls, repeats)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; exit 1 if any policy is over the 50 µs budget."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    res = run(args.calls, args.repeats)
    base = res["baseline(min of 8 prices)"]
    print(f"select() at 8 candidates, median of {args.repeats} x {args.calls} calls (CPU time)")
    print(f"{'policy':<28}{'ns/op':>10}{'x baseline':>12}")
    over = False
    for name, ns in res.items():
        print(f"{name:<28}{ns:>10.0f}{ns / base:>12.1f}")
        over = over or (name in ("cost", "latency", "weighted", "pinned") and ns > BUDGET_NS)
    print(f"budget: {BUDGET_NS} ns/op -> {'OVER' if over else 'ok'}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
