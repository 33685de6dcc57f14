"""The hindsight lower bound: the least any router could have paid for a trace on this fleet.

Computed offline from the whole trace, knowing every request's real token counts, its
prefill speed noise, its provider latency draws and the prices in force over time. It is
a relaxation, so it is a valid lower bound on the cost of any routing that meets at least
99% of every SLO class (`SLO_TARGET`) on this fleet:

- The local GPUs are held for the whole trace, and as long after it as a router keeps
  them working (the simulator charges every policy the same way), at the cheapest GPU's
  price per GPU-second.
- A request served locally takes the least GPU-seconds the simulated worker could serve it
  in within its SLO (`bound_local`): its own prefill at full speed with its real speed
  noise, and each decode token at the lower convex hull of what a step can give it at its
  class's ITL bound (mixing big-batch, small-batch and prefill steps so that their mean
  meets the bound). It cannot be local when its own prefill breaks its TTFT bound, or when
  no step is as short as its ITL bound.
- A request served externally costs, at one of the providers that answers it within its
  SLO (their latency draws are fixed per request), the lowest list price in force over the
  window in which it could be dispatched (`bound_external`).
- A TPM-limited provider admits no more than its token bucket holds: the bound follows
  the bucket's level on a 10-s grid, as the simulator's bucket counts (prompt + max_tokens,
  refill limit / 60 per second, never above the limit, full at the start).
- Capacity: requests of a class that may not wait whose SLO window ends inside their 60-s
  arrival slot (and inside the trace) must be served inside that slot; everything else is
  bounded only by the GPU-seconds held.
- The SLO slack: up to 1% of each class may miss, and a miss may cost nothing (a router
  may drop it). Requests no backend can serve within their SLO are such misses; the rest
  of the 1% is given to whichever requests it saves most on.
- Any request may be split (a fractional relaxation).

Solving it: one linear program (`bound_lp`, HiGHS), solved to optimality, so the bound is
the relaxation's exact minimum. Not modelled, and so not counted against any policy:
queueing, KV limits, and that a prefill is one contiguous block that stalls every running
decode and every prompt behind it (a time-indexed model of that is not built; prefill
deadlines alone, each prompt's prefill inside its TTFT window on a GPU that prefills one
prompt at a time, moved none of the four shipped bounds tried on 2026-12-06: the 70B pair,
tpm-limited-8b, bursty-8b; nor did, on the 70B pair, the FIFO queue and the stall as rows
of a mixed-integer program with every local share 0/1: docs/economics.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loadtest.simulate.bound_external import external_options
from loadtest.simulate.bound_local import (
    b_star,
    decode_token_cost,
    gpu_seconds,
)
from loadtest.simulate.bound_lp import Problem, Req, solve
from loadtest.simulate.engine import request_noise
from loadtest.simulate.scenario import Scenario
from loadtest.simulate.traces import Trace
from policies.types import Slo

__all__ = ["Bound", "b_star", "decode_token_cost", "gpu_seconds", "hindsight_bound"]

SLOT_S = 60.0
SLO_TARGET = 0.99


@dataclass(frozen=True, slots=True)
class Bound:
    """The hindsight bound's totals for one trace."""

    total_usd: float
    gpu_usd: float
    external_usd: float
    tokens: int
    local_token_share: float
    # Requests no local GPU could have served within their SLO (prefill or ITL too slow).
    never_local: int
    # Requests no backend at all could have served within their SLO (misses every policy has).
    forced_misses: int = 0

    @property
    def feasible(self) -> bool:
        """False: no routing on this fleet meets the SLO target (the relaxation has no
        solution; the totals are then inf)."""
        return not math.isinf(self.total_usd)

    @property
    def cost_per_million_tokens(self) -> float:
        """Total per million tokens of the whole trace."""
        return self.total_usd / self.tokens * 1e6 if self.tokens else math.inf


def hindsight_bound(sc: Scenario, trace: Trace, seed: int, slot_s: float = SLOT_S) -> Bound:
    """The bound for `trace` on `sc`'s fleet (see the module docstring)."""
    problem = _problem(sc, trace, seed, slot_s)
    best = solve(problem)
    tokens = sum(r.tokens for r in problem.reqs)
    never_local = sum(math.isinf(r.need) for r in problem.reqs) if sc.locals else 0
    forced = sum(math.isinf(r.need) and not r.options for r in problem.reqs)
    if best is None:
        return Bound(math.inf, math.inf, math.inf, tokens, 0.0, never_local, forced)
    return Bound(
        best.value,
        best.gpu_usd,
        best.value - best.gpu_usd,
        tokens,
        best.local_tokens / tokens if tokens else 0.0,
        never_local,
        forced,
    )


def _problem(sc: Scenario, trace: Trace, seed: int, slot_s: float) -> Problem:
    noise = request_noise(len(trace.requests), seed, sc.prefill_noise_sigma)
    n_slots = max(1, math.ceil(trace.duration_s / slot_s))
    per_token = {
        (g.name, cls): decode_token_cost(g.physics, slo.max_itl_s)
        for g in sc.locals
        for cls, slo in sc.slo_classes.items()
    }
    limited = {p.name: p.tpm_limit for p in sc.providers if p.tpm_limit is not None}
    reqs = []
    for tr, (z, prefill_noise) in zip(trace.requests, noise, strict=True):
        slo = sc.slo_classes[tr.slo_class]
        need = min(
            (
                gpu_seconds(g.physics, tr, slo, prefill_noise, per_token[(g.name, tr.slo_class)])
                for g in sc.locals
            ),
            default=math.inf,
        )
        window = _window_s(tr.output_tokens, slo)
        slot = min(int(tr.t // slot_s), n_slots - 1)
        in_slot = (
            slo.max_queue_wait_s <= 0
            and tr.t + window <= (slot + 1) * slot_s
            and tr.t + window <= trace.duration_s
        )
        reqs.append(
            Req(
                tr.slo_class,
                external_options(sc, tr, slo, z),
                tr.prompt_tokens + tr.max_tokens,
                need,
                slot if in_slot else -1,
                tr.prompt_tokens + tr.output_tokens,
                min(tr.t + window - trace.duration_s, trace.duration_s),
                tr.t,
            )
        )
    # The bucket grid reaches the last dispatch window's end, at most an hour past the trace.
    until = max((o.latest_s for r in reqs for o in r.options if o.provider in limited), default=0.0)
    until = max(trace.duration_s, min(until, trace.duration_s + 3600.0))
    counts: dict[str, int] = {}
    for r in reqs:
        counts[r.cls] = counts.get(r.cls, 0) + 1
    allowance = {c: math.floor((1.0 - SLO_TARGET) * n + 1e-9) for c, n in counts.items()}
    return Problem(
        reqs,
        {name: float(limit) for name, limit in limited.items()},
        allowance,
        len(sc.locals),
        trace.duration_s,
        slot_s,
        min((g.model.price_per_hour for g in sc.locals), default=0.0) / 3600.0,
        until,
    )


def _window_s(output_tokens: int, slo: Slo) -> float:
    """How long after its arrival a request that meets its SLO may still be running."""
    if slo.max_total_s is not None:
        return slo.max_total_s
    if slo.max_ttft_s is None or slo.max_itl_s is None:
        return math.inf
    return slo.max_ttft_s + max(output_tokens - 1, 0) * slo.max_itl_s
