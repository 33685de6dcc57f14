"""The hindsight bound's local side: the least GPU-seconds a request takes on a simulated GPU
within its SLO, from the same physics the simulated worker runs on (`simulate.physics`).

A step of the worker (`GpuPhysics.mixed_step`) carries one decode token of each of its `b`
running requests and, while a prompt is prefilled, a chunk of `budget - b` prompt tokens;
it lasts the longer of the decode step `b / T(b, context)` and `budget / S` (S: the head
prompt's prefill speed). Charging every prompt token `1 / S` of GPU time (the prefill term)
leaves each decode token of a step:

- a pure decode step at batch b: `1 / T(b, context)` GPU-seconds, and the step lasts
  `b / T(b, context)`;
- a mixed (prefill) step: at least `1 / S_max` (S_max: the fastest measured prefill), and
  the step lasts at least `budget / S_max`.

T falls with the context and interpolation never leaves the measured range, so at every
batch `T_hat(b)`, the largest measured curve's value, bounds T from above: each step type is
a point (step seconds, GPU-seconds per token) no better than `(b / T_hat(b), 1 / T_hat(b))`
or `(budget / S_max, 1 / S_max)`. A request's own decode takes one token from each step it
is in, and its SLO bounds the mean of those steps' lengths by its ITL bound L (the
simulator's `meets_slo`: (done - first token) / (output - 1)). So the least GPU time per
decode token of a request that meets L is the lower convex hull of those points at step
length L (`decode_token_cost`): a request may ride some slow steps (a big batch or a prefill)
and make up for them with fast ones, but only so many. Without an ITL bound, the cheapest
point. No queueing, no KV limit, no contention: all of these only add GPU time.

Before 2026-12-05 every decode token was charged the cheapest point (`1 / S_max` for every
shipped profile) whatever the ITL bound, as though a 50-ms target let every token ride a
200-ms prefill step of the 70B pair.
"""

from __future__ import annotations

import math

from loadtest.simulate.physics import GpuPhysics
from loadtest.simulate.traces import TraceRequest
from policies.types import Slo

Point = tuple[float, float]  # (step seconds, GPU-seconds per decode token)


def step_points(physics: GpuPhysics) -> list[Point]:
    """Every step type's best case: pure decode at each batch, and a prefill (mixed) step."""
    fastest_prefill = max(v for _, v in physics.prefill)
    points = [(physics.step_token_budget / fastest_prefill, 1.0 / fastest_prefill)]
    for b in range(1, physics.max_batch + 1):
        t_hat = max(physics.decode_tokens_per_s(b, ctx) for ctx, _ in physics.decode)
        points.append((b / t_hat, 1.0 / t_hat))
    return points


def decode_token_cost(physics: GpuPhysics, max_itl_s: float | None) -> float:
    """Least GPU-seconds per decode token of a request whose mean ITL is at most `max_itl_s`
    (inf: not even the fastest step meets it). See the module docstring."""
    return hull_at(step_points(physics), max_itl_s)


def hull_at(points: list[Point], limit: float | None) -> float:
    """Least mean cost of a mix of points whose mean step length is at most `limit`."""
    if limit is None:
        return min(c for _, c in points)
    fast = [p for p in points if p[0] <= limit]
    if not fast:
        return math.inf
    best = min(c for _, c in fast)
    slow = [p for p in points if p[0] > limit]
    for s0, c0 in fast:
        for s1, c1 in slow:
            if c1 < c0:
                w = (limit - s0) / (s1 - s0)
                best = min(best, c0 + w * (c1 - c0))
    return best


def prefill_s(physics: GpuPhysics, tr: TraceRequest, prefill_noise: float) -> float:
    """GPU-seconds of the request's own prefill, at full speed with its real speed noise."""
    return tr.prompt_tokens * prefill_noise / physics.prefill_tokens_per_s(tr.prompt_tokens)


def gpu_seconds(
    physics: GpuPhysics,
    tr: TraceRequest,
    slo: Slo,
    prefill_noise: float,
    per_token: float | None = None,
) -> float:
    """Least GPU-seconds this request takes locally within its SLO (inf: it cannot be local).

    `per_token`: `decode_token_cost(physics, slo.max_itl_s)`, when the caller has it.
    """
    pre = prefill_s(physics, tr, prefill_noise)
    if slo.max_ttft_s is not None and pre > slo.max_ttft_s:
        return math.inf
    if slo.max_total_s is not None and pre > slo.max_total_s:
        return math.inf
    cost = decode_token_cost(physics, slo.max_itl_s) if per_token is None else per_token
    if math.isinf(cost) and tr.output_tokens <= 1:
        cost = 0.0  # no decode step to judge
    return pre + max(tr.output_tokens - 1, 0) * cost if not math.isinf(cost) else math.inf


def b_star(physics: GpuPhysics, max_itl_s: float | None, context: float) -> int:
    """Largest batch whose decode step meets `max_itl_s` at this context (0: none does)."""
    if max_itl_s is None:
        return physics.max_batch
    lo, hi = 0, physics.max_batch
    # Step time b / T(b) grows with b for every measured profile: bisect.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if physics.decode_step_s(mid, context) <= max_itl_s:
            lo = mid
        else:
            hi = mid - 1
    return lo
