"""The hindsight lower bound: the least any router could have paid for a trace on this fleet.

Computed offline from the whole trace, knowing every request's real token counts,
its prefill speed and the prices in force when it arrived. It is a relaxation, so it
is a valid lower bound on the cost of any routing that meets every request's SLO:

- The local GPUs are held for the whole trace, and as long after it as a router keeps
  them working (the simulator charges every policy the same way); the bound picks the
  cheapest held time on a 30-s grid, rounding in its own favour.
- A request served externally costs the cheapest external list price at its arrival
  for its real tokens (ignoring provider latency: it can only raise what a real router
  pays). A provider's TPM limit enters as a Lagrangian price on its bucket tokens
  (prompt + max_tokens) against the most its bucket can admit over the trace: every
  price >= 0 gives a valid bound (weak duality), and the best of a grid is taken.
- A request served locally uses GPU-seconds: its own prefill at the measured speed
  (with its real speed noise) plus each output token at the least GPU time a decode
  token can take, 1 / max(T(max_batch) at the shortest measured context, the fastest
  measured prefill speed) (`decode_rate_ceiling`). Why both: a step of the simulated
  worker lasts max(memory part b / T(b, mean context), compute part (chunk + b) /
  prefill speed). Charging the chunk's prefill tokens at the prefill speed (as the
  prefill term does) leaves at least b / prefill speed of a mixed step to its b decode
  tokens, and a pure decode step b / T(b) >= b / T(max_batch); T falls with context, so
  the shortest context's curve bounds every batch's mean context. (Until 2026-12-04 the
  bound charged decode at T(max_batch) at the request's own context, which over-charged
  decode tokens that ride in compute-bound prefill steps for free: not a valid lower
  bound whenever prefill is faster than T(max_batch), as for every shipped profile.)
  No queueing, no KV limit, no ITL tail: all of these only add GPU time. Not T(b*) of
  the class's ITL bound: the SLO bounds a request's mean ITL, which a router could meet
  with some steps above b*. A request whose prefill alone breaks its TTFT bound, or
  whose ITL bound even batch 1 misses, cannot be local.
- Capacity: requests of a class that may not wait whose SLO window (arrival + max
  TTFT + (output - 1) x max ITL) ends inside their arrival slot (and inside the trace)
  must be served inside that slot: the slot's GPU-seconds bound them. Everything else
  (delay-tolerant work, requests straddling a slot edge) is bounded only by the
  GPU-seconds held.
- Any request may be split (a fractional relaxation).

These constraints form a laminar family (disjoint slots inside one global pool), so
filling capacity greedily with the work of the highest external price per GPU-second
is optimal for the relaxation: the bound is exact for the relaxation, not a heuristic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loadtest.simulate.engine import request_noise
from loadtest.simulate.physics import GpuPhysics
from loadtest.simulate.scenario import Scenario
from loadtest.simulate.traces import Trace, TraceRequest
from policies.types import Slo

SLOT_S = 60.0
HOLD_STEP_S = 30.0


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

    @property
    def cost_per_million_tokens(self) -> float:
        """Total per million tokens of the whole trace."""
        return self.total_usd / self.tokens * 1e6 if self.tokens else math.inf


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


def gpu_seconds(physics: GpuPhysics, tr: TraceRequest, slo: Slo, prefill_noise: float) -> float:
    """Least GPU-seconds this request takes locally within its SLO (inf: it cannot be local)."""
    prefill_s = tr.prompt_tokens * prefill_noise / physics.prefill_tokens_per_s(tr.prompt_tokens)
    if slo.max_ttft_s is not None and prefill_s > slo.max_ttft_s:
        return math.inf
    context = tr.prompt_tokens + tr.output_tokens / 2
    if b_star(physics, slo.max_itl_s, context) < 1:
        return math.inf
    decode = max(tr.output_tokens - 1, 0) / decode_rate_ceiling(physics)
    return prefill_s + decode


def decode_rate_ceiling(physics: GpuPhysics) -> float:
    """Most decode tokens one GPU-second can carry, in any step (see the module docstring)."""
    shortest = physics.decode[0][0]
    fastest_prefill = max(v for _, v in physics.prefill)
    return max(physics.decode_tokens_per_s(physics.max_batch, shortest), fastest_prefill)


def _window_s(tr: TraceRequest, slo: Slo) -> float:
    if slo.max_total_s is not None:
        return slo.max_total_s
    if slo.max_ttft_s is None or slo.max_itl_s is None:
        return math.inf
    return slo.max_ttft_s + max(tr.output_tokens - 1, 0) * slo.max_itl_s


def external_prices(sc: Scenario, t: float) -> dict[str, tuple[float, float]]:
    """(input, output) USD per million tokens of every provider in force at `t`."""
    prices = {p.name: (p.input_per_million, p.output_per_million) for p in sc.providers}
    for ch in sorted(sc.price_changes, key=lambda c: c.at_s):
        if ch.at_s <= t and ch.backend in prices:
            prices[ch.backend] = (ch.input_per_million, ch.output_per_million)
    return prices


def hindsight_bound(sc: Scenario, trace: Trace, seed: int, slot_s: float = SLOT_S) -> Bound:
    """The bound for `trace` on `sc`'s fleet (see the module docstring)."""
    reqs = _requests(sc, trace, seed, slot_s)
    limits = _tpm_capacity(sc, trace)
    best = _bound_at(sc, trace, reqs, slot_s, 0.0, limits)
    if limits:
        # Weak duality: any price `lam` >= 0 on a TPM-limited provider's tokens gives a valid
        # bound; take the best of a grid spanning the gaps between provider prices.
        for k in range(21):
            lam = 1e-9 * 2.0**k
            b = _bound_at(sc, trace, reqs, slot_s, lam, limits)
            if b.total_usd > best.total_usd:
                best = b
    return best


@dataclass(frozen=True, slots=True)
class _Req:
    costs: tuple[tuple[str, float], ...]  # (provider, $ for its real tokens) at arrival
    bucket_tokens: int  # what a token bucket takes: prompt + max_tokens
    need: float  # GPU-seconds locally (inf: cannot be local)
    slot: int  # the slot it must be served in, or -1: only the pool bounds it
    tokens: int
    tail: float  # how far past the trace's end its SLO window reaches


def _requests(sc: Scenario, trace: Trace, seed: int, slot_s: float) -> list[_Req]:
    noise = request_noise(len(trace.requests), seed, sc.prefill_noise_sigma)
    n_slots = max(1, math.ceil(trace.duration_s / slot_s))
    out = []
    for tr, (_, prefill_noise) in zip(trace.requests, noise, strict=True):
        slo = sc.slo_classes[tr.slo_class]
        costs = tuple(
            (name, (pi * tr.prompt_tokens + po * tr.output_tokens) / 1e6)
            for name, (pi, po) in external_prices(sc, tr.t).items()
        )
        need = min(
            (gpu_seconds(g.physics, tr, slo, prefill_noise) for g in sc.locals), default=math.inf
        )
        window = _window_s(tr, slo)
        slot = min(int(tr.t // slot_s), n_slots - 1)
        in_slot = (
            slo.max_queue_wait_s <= 0
            and tr.t + window <= (slot + 1) * slot_s
            and tr.t + window <= trace.duration_s
        )
        out.append(
            _Req(
                costs,
                tr.prompt_tokens + tr.max_tokens,
                need,
                slot if in_slot else -1,
                tr.prompt_tokens + tr.output_tokens,
                min(tr.t + window - trace.duration_s, trace.duration_s),
            )
        )
    return out


def _tpm_capacity(sc: Scenario, trace: Trace) -> dict[str, float]:
    """Tokens each TPM-limited provider can take over the trace: a full bucket, then its
    refill until the trace ends plus the longest queue wait and a minute of failovers."""
    wait = max((s.max_queue_wait_s for s in sc.slo_classes.values()), default=0.0)
    return {
        p.name: p.tpm_limit * (1.0 + (trace.duration_s + wait + 60.0) / 60.0)
        for p in sc.providers
        if p.tpm_limit is not None
    }


def _bound_at(
    sc: Scenario,
    trace: Trace,
    reqs: list[_Req],
    slot_s: float,
    lam: float,
    limits: dict[str, float],
) -> Bound:
    n_gpus = len(sc.locals)
    n_slots = max(1, math.ceil(trace.duration_s / slot_s))
    items: list[_Item] = []
    always_external = 0.0
    never_local = 0
    tail = 0.0
    tokens = 0
    for r in reqs:
        usd = min(
            (c + (lam * r.bucket_tokens if name in limits else 0.0) for name, c in r.costs),
            default=math.inf,
        )
        tokens += r.tokens
        if math.isinf(r.need):
            never_local += bool(sc.locals)
            always_external += usd
            continue
        tail = max(tail, r.tail)
        density = usd / r.need if r.need > 0 else math.inf
        items.append(_Item(density, usd, r.need, r.slot, r.tokens))
    items.sort(key=lambda it: -it.density)
    price_s = min((g.model.price_per_hour for g in sc.locals), default=0.0) / 3600.0
    # GPU-seconds held: at least the trace on every GPU; a router may keep a GPU working
    # past the end (and pays for it), at most until the last SLO window closes.
    base = n_gpus * trace.duration_s
    steps = max(0, math.ceil(tail / HOLD_STEP_S))
    held = [base + n_gpus * k * HOLD_STEP_S for k in range(steps + 1)]
    # A slot's GPU-seconds (the last slot may be cut short by the trace's end).
    per_slot = [
        n_gpus * (min((k + 1) * slot_s, trace.duration_s) - k * slot_s) for k in range(n_slots)
    ]
    fills = [_fill(items, h, per_slot) for h in held]
    # Between two grid points S_k <= S <= S_k+1 the cost is at least price x S_k plus the
    # external cost at S_k+1 (more capacity never costs more externally).
    candidates = [(price_s * held[k] + fills[min(k + 1, steps)][0], k) for k in range(steps + 1)]
    best, k = min(candidates)
    external, local_tokens = fills[min(k + 1, steps)]
    gpu_usd = price_s * held[k] if n_gpus else 0.0
    # The dual price's own term: the capacity the relaxation may use for free.
    credit = lam * sum(limits.values())
    return Bound(
        best + always_external - credit,
        gpu_usd,
        external + always_external - credit,
        tokens,
        local_tokens / tokens if tokens else 0.0,
        never_local,
    )


@dataclass(frozen=True, slots=True)
class _Item:
    density: float  # external $ per local GPU-second
    usd: float  # its cheapest external cost
    need: float  # GPU-seconds locally
    slot: int  # the slot it must be served in, or -1: only the pool bounds it
    tokens: int


def _fill(items: list[_Item], pool: float, per_slot: list[float]) -> tuple[float, float]:
    """(external $, local tokens) when `pool` GPU-seconds take the densest work first."""
    slot_left = list(per_slot)
    external = 0.0
    local_tokens = 0.0
    for it in items:
        room = pool if it.slot < 0 else min(pool, slot_left[it.slot])
        take = min(it.need, room)
        share = take / it.need if it.need > 0 else 1.0
        pool -= take
        if it.slot >= 0:
            slot_left[it.slot] -= take
        external += it.usd * (1.0 - share)
        local_tokens += it.tokens * share
    return external, local_tokens
