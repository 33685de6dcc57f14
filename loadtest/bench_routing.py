"""Micro-benchmark of `policies.select.select` at 8 candidate backends (CPU per call).

Run: `python -m loadtest.bench_routing [--fleet 8b|70b-pairs] [--calls N] [--repeats R]`.
Prints the median ns/op of each policy and of a trivial baseline (cheapest of 8 prices)
measured in the same run, so numbers from different machines can be compared by their
ratio, and the cost policy's route reason (which paths of the prediction ran).

Fleets: `8b` (the default) is two loaded 8B H100 workers and six providers, a 900-token
prompt and no miss budget. `70b-pairs` is the worst case seen for the prediction: four
70B pairs (`llama-3.1-70b-2xh200-tp2`, $7/h) with 30 decodes each and prompts arriving
at 3,000-6,000 tokens/s, four providers at hosted-70B prices, a 4,000-token interactive
prompt and a miss budget of 1: the size-biased burst, the pooled admission's second b*
search and the stall (`policies.predict.stall_misses`) all run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from types import MappingProxyType

from gateway.profiles import load_profile
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
FLEETS = ("8b", "70b-pairs")
# The 70B pairs' recent prompts: a mean of 1,200 tokens, size-biased mean 2,400 (E[x^2] /
# E[x] of an exponential spread), so a 4,000-token prompt is judged by the 2,400 burst.
PAIR_MEAN_PROMPT = 1200.0
PAIR_BIASED_PROMPT = 2400.0


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


def seventy_b_pairs() -> tuple[BackendSnapshot, ...]:
    """Four local 70B pairs with 30 decodes each, and four providers, one reporting headroom.

    30 decodes of ~200 tokens at ~45 ms last ~9 s: ~3.3 requests/s of 1,200-token prompts,
    4,000 prompt tokens/s; the four pairs see 3,000-6,000. The relative spreads are what the
    simulator's cost-model error gives a pair (a few percent).
    """
    gpu = GpuModel.from_profile(load_profile("llama-3.1-70b-2xh200-tp2"), 7.00)
    local = tuple(
        BackendSnapshot(
            f"pair-{i}",
            "llama-3.3-70b",
            is_local=True,
            gpu=gpu,
            inflight=30,
            running=30,
            queued=0,
            kv_usage=0.4,
            metrics_fresh=True,
            pending_prefill_tokens=1000 * i,
            recent_prompt_tokens_per_s=rate,
            recent_requests_per_s=rate / PAIR_MEAN_PROMPT,
            recent_prompt_sq_tokens_per_s=rate * PAIR_BIASED_PROMPT,
            ttft_rel_spread=0.1,
            itl_rel_spread=0.05,
        )
        for i, rate in enumerate((3000.0, 4000.0, 5000.0, 6000.0))
    )
    prices = [(0.59, 0.79), (0.88, 0.88), (0.90, 0.90), (0.23, 0.40)]
    remote = tuple(
        BackendSnapshot(
            f"ext-{i}",
            "llama-3.3-70b",
            price_in_per_token=pi / 1e6,
            price_out_per_token=po / 1e6,
            price_version=3,
            ttft_s=0.3 + 0.1 * i,
            ttft_spread_s=0.08,
            ttft_per_prompt_token_s=3e-5,
            itl_s=0.004 + 0.003 * i,
            itl_spread_s=0.001,
            headroom=Headroom(
                limit_tokens=300_000,
                remaining_tokens=200_000,
                reset_tokens_at=10.0,
                observed_at=0.5,
            )
            if i == 0
            else Headroom(),
        )
        for i, (pi, po) in enumerate(prices)
    )
    return local + remote


def fleet(name: str) -> tuple[RouteRequest, tuple[BackendSnapshot, ...]]:
    """The request and the 8 snapshots of fleet `name` (one of FLEETS)."""
    slo = Slo.from_spec(default_slo_classes()["interactive"])
    if name == "70b-pairs":
        budgets = MappingProxyType({"interactive": 1.0})
        req = RouteRequest(
            "llama-3.3-70b", 4000, 1024, 200, True, "interactive", slo, None, "t1", budgets
        )
        return req, seventy_b_pairs()
    if name != "8b":
        raise ValueError(f"unknown fleet {name!r}: one of {', '.join(FLEETS)}")
    req = RouteRequest("llama-3.1-8b", 900, 512, 220, True, "interactive", slo, None, "t1")
    return req, snapshots()


def _median_ns(fn: Callable[[], object], calls: int, repeats: int) -> float:
    runs: list[float] = []
    for _ in range(repeats):
        t0 = time.process_time_ns()
        for _ in range(calls):
            fn()
        runs.append((time.process_time_ns() - t0) / calls)
    return statistics.median(runs)


def run(calls: int, repeats: int, fleet_name: str = "8b") -> dict[str, float]:
    """Median ns per call for each policy and for the baseline."""
    req, snaps = fleet(fleet_name)
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
    ap.add_argument("--fleet", choices=FLEETS, default="8b", help="the fleet shape (see above)")
    args = ap.parse_args(argv)
    res = run(args.calls, args.repeats, args.fleet)
    base = res["baseline(min of 8 prices)"]
    req, snaps = fleet(args.fleet)
    route = select(req, snaps, compile_policy(CostPolicySpec()), 1.0, rng_value=0.3)
    print(
        f"select() at 8 candidates, fleet {args.fleet}, median of {args.repeats} x"
        f" {args.calls} calls (CPU time)"
    )
    print(f"route (cost): {route.reason}")
    for c in route.candidates:
        if c.predicted_batch or c.reason:
            local = f"batch {c.predicted_batch}/b*{c.slo_batch}, miss p {c.miss_probability:.3f}"
            print(f"  {c.backend}: {local if c.predicted_batch else ''}; {c.reason or 'meets'}")
    print(f"{'policy':<28}{'ns/op':>10}{'x baseline':>12}")
    over = False
    for name, ns in res.items():
        print(f"{name:<28}{ns:>10.0f}{ns / base:>12.1f}")
        over = over or (name in ("cost", "latency", "weighted", "pinned") and ns > BUDGET_NS)
    print(f"budget: {BUDGET_NS} ns/op -> {'OVER' if over else 'ok'}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
