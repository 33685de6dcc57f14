"""Solving the hindsight bound's relaxation for given prices, and searching the prices.

For fixed prices — `lam` per bucket token on each TPM interval, `nu` per dropped request of
a class — the relaxation separates: each request's outside cost is the least of its SLO-
meeting providers (each at its list price plus the interval prices its dispatch window
falls under, times its bucket tokens) and a drop at `nu`; the GPU-seconds are then filled
greedily with the highest outside cost per GPU-second (exact: the slots and the pool are a
laminar family), over a 30-s grid of held time. Its value minus the prices times the
capacities they price (the intervals' bucket tokens, the classes' allowed misses) is a
lower bound for every price >= 0 (weak duality). `search` keeps the best it finds: a grid
over one whole-trace TPM price (the bound before 2026-12-05), then projected subgradient
steps on every price, each step's bound valid whether or not the search converged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from loadtest.simulate.bound_external import ExternalOption, TpmGrid

HOLD_STEP_S = 30.0
ITERATIONS = 40
DROP = -1  # the choice "miss it at no cost" (within the class's allowance)


@dataclass(frozen=True, slots=True)
class Req:
    """One request as the relaxation sees it."""

    cls: str
    options: tuple[ExternalOption, ...]  # providers that meet its SLO
    bucket_tokens: int  # what a token bucket takes: prompt + max_tokens
    need: float  # GPU-seconds locally (inf: cannot be local)
    slot: int  # the slot it must be served in, or -1: only the pool bounds it
    tokens: int
    tail: float  # how far past the trace's end its SLO window reaches
    t: float  # arrival


@dataclass(frozen=True, slots=True)
class Problem:
    """The relaxation of one trace on one fleet."""

    reqs: list[Req]
    grids: Mapping[str, TpmGrid]  # TPM-limited providers
    allowance: Mapping[str, int]  # misses each class may have at the SLO target
    n_gpus: int
    duration_s: float
    slot_s: float
    price_s: float  # USD per GPU-second (the cheapest GPU's)


@dataclass(slots=True)
class Prices:
    """The Lagrangian prices (see the module docstring)."""

    cell: dict[str, list[float]]  # per provider, per grid cell
    prefix: dict[str, list[float]]  # per provider, per prefix end m (index 0 unused)
    drop: dict[str, float]  # per class


@dataclass(frozen=True, slots=True)
class Solution:
    """The relaxation's value at some prices, and what it used (for the next step)."""

    value: float
    gpu_usd: float
    local_tokens: float
    use_cell: dict[str, list[float]] = field(default_factory=dict)
    use_prefix: dict[str, list[float]] = field(default_factory=dict)
    drops: dict[str, float] = field(default_factory=dict)


def search(problem: Problem) -> Solution:
    """The best bound found over the prices (every one evaluated is valid)."""
    spans = [
        [
            problem.grids[o.provider].span(r.t, o.latest_s)
            if o.provider in problem.grids
            else (0, 0)
            for o in r.options
        ]
        for r in problem.reqs
    ]
    forced: dict[str, int] = {}
    for r in problem.reqs:
        if math.isinf(r.need) and not r.options:
            forced[r.cls] = forced.get(r.cls, 0) + 1
    allowed = {c: max(0, k - forced.get(c, 0)) for c, k in problem.allowance.items()}
    prices = Prices(
        {p: [0.0] * g.cells for p, g in problem.grids.items()},
        {p: [0.0] * (g.cells + 1) for p, g in problem.grids.items()},
        _initial_drop_prices(problem, allowed),
    )
    best = evaluate(problem, spans, allowed, prices)
    free = Prices(prices.cell, prices.prefix, dict.fromkeys(prices.drop, 0.0))
    sol = evaluate(problem, spans, allowed, free)  # misses priced at 0: nothing to drop
    if sol.value > best.value:
        best, prices = sol, free
    if problem.grids:
        # The whole-trace price alone, on a grid spanning the gaps between provider prices.
        for k in range(21):
            trial = _copy(prices)
            for p, g in problem.grids.items():
                trial.prefix[p][g.cells] = 1e-9 * 2.0**k
            sol = evaluate(problem, spans, allowed, trial)
            if sol.value > best.value:
                best, prices = sol, trial
    if not problem.grids and not any(allowed.values()):
        return best
    scale = _price_scales(problem)
    current = best
    for it in range(ITERATIONS):
        theta = 0.5 / (1.0 + it / 4.0)
        prices = _step(problem, allowed, prices, current, scale, theta)
        current = evaluate(problem, spans, allowed, prices)
        if current.value > best.value:
            best = current
    return best


def evaluate(
    problem: Problem,
    spans: list[list[tuple[int, int]]],
    allowed: Mapping[str, int],
    prices: Prices,
) -> Solution:
    """The relaxation's Lagrangian value at `prices` (a valid lower bound)."""
    suffix = {}
    for p, pre in prices.prefix.items():
        acc, suf = 0.0, [0.0] * (len(pre) + 1)  # suf[cells + 1] = 0: past the grid
        for m in range(len(pre) - 1, 0, -1):
            acc += pre[m]
            suf[m] = acc
        suffix[p] = suf
    outside: list[float] = []
    choice: list[int] = []
    for r, rs in zip(problem.reqs, spans, strict=True):
        if math.isinf(r.need) and not r.options:
            outside.append(0.0)  # a forced miss: every policy has it, it may cost nothing
            choice.append(DROP)
            continue
        best = prices.drop[r.cls] if allowed.get(r.cls, 0) else math.inf
        who = DROP
        for j, o in enumerate(r.options):
            usd = o.usd
            if o.provider in suffix:
                k0, k1 = rs[j]
                lam = suffix[o.provider][k1] + (prices.cell[o.provider][k0] if k1 == k0 + 1 else 0)
                usd += lam * r.bucket_tokens
            if usd < best:
                best, who = usd, j
        outside.append(best)
        choice.append(who)
    ext, shares, gpu_usd = _fill_held(problem, outside)
    local_tokens = sum(r.tokens * s for r, s in zip(problem.reqs, shares, strict=True))
    credit = 0.0
    use_cell = {p: [0.0] * g.cells for p, g in problem.grids.items()}
    use_end = {p: [0.0] * (g.cells + 2) for p, g in problem.grids.items()}  # + past the grid
    drops = dict.fromkeys(problem.allowance, 0.0)
    for i, (r, who) in enumerate(zip(problem.reqs, choice, strict=True)):
        away = 1.0 - shares[i]
        if away <= 0.0:
            continue
        if who == DROP:
            if not (math.isinf(r.need) and not r.options):
                drops[r.cls] += away
            continue
        p = r.options[who].provider
        if p in use_cell:
            k0, k1 = spans[i][who]
            if k1 == k0 + 1:
                use_cell[p][k0] += away * r.bucket_tokens
            use_end[p][k1] += away * r.bucket_tokens
    use_prefix = {}
    for p, g in problem.grids.items():
        acc, cum = 0.0, [0.0] * (g.cells + 1)
        for m in range(1, g.cells + 1):
            acc += use_end[p][m]
            cum[m] = acc
        use_prefix[p] = cum
        credit += sum(lam * g.cell_capacity() for lam in prices.cell[p])
        credit += sum(prices.prefix[p][m] * g.prefix_capacity(m) for m in range(1, g.cells + 1))
    for c, k in allowed.items():
        if k:
            credit += prices.drop[c] * k
    return Solution(gpu_usd + ext - credit, gpu_usd, local_tokens, use_cell, use_prefix, drops)


def _fill_held(problem: Problem, outside: list[float]) -> tuple[float, list[float], float]:
    """(outside $, local share per request, GPU $) at the best held time on the grid."""
    n = problem.n_gpus
    reqs = problem.reqs
    order = [i for i, r in enumerate(reqs) if not math.isinf(r.need)]
    order.sort(key=lambda i: -(outside[i] / reqs[i].need if reqs[i].need > 0 else math.inf))
    fixed = sum(outside[i] for i, r in enumerate(reqs) if math.isinf(r.need))
    n_slots = max(1, math.ceil(problem.duration_s / problem.slot_s))
    per_slot = [
        n * (min((k + 1) * problem.slot_s, problem.duration_s) - k * problem.slot_s)
        for k in range(n_slots)
    ]
    tail = max((reqs[i].tail for i in order), default=0.0)
    steps = max(0, math.ceil(tail / HOLD_STEP_S)) if n else 0
    held = [n * (problem.duration_s + k * HOLD_STEP_S) for k in range(steps + 1)]
    cache: dict[int, tuple[float, list[float]]] = {}

    def fill(k: int) -> tuple[float, list[float]]:
        if k not in cache:
            cache[k] = _fill(reqs, outside, order, held[k], per_slot)
        return cache[k]

    # Between two grid points S_k <= S <= S_k+1 the cost is at least price x S_k plus the
    # outside cost at S_k+1 (more capacity never costs more outside). That is convex in k
    # (an LP's value is convex in its capacity): walk up until it rises.
    best: tuple[float, int] | None = None
    for k in range(steps + 1):
        cand = problem.price_s * held[k] + fill(min(k + 1, steps))[0]
        if best is not None and cand >= best[0]:
            break
        best = (cand, k)
    assert best is not None
    cost, k = best
    shares = fill(min(k + 1, steps))[1]
    gpu_usd = problem.price_s * held[k]
    return cost - gpu_usd + fixed, shares, gpu_usd


def _fill(
    reqs: list[Req], outside: list[float], order: list[int], pool: float, per_slot: list[float]
) -> tuple[float, list[float]]:
    """(outside $, local share per request) when `pool` GPU-seconds take the densest first."""
    slot_left = list(per_slot)
    shares = [0.0] * len(reqs)
    ext = 0.0
    for i in order:
        r = reqs[i]
        room = pool if r.slot < 0 else min(pool, slot_left[r.slot])
        take = min(r.need, max(room, 0.0))
        share = take / r.need if r.need > 0 else 1.0
        pool -= take
        if r.slot >= 0:
            slot_left[r.slot] -= take
        shares[i] = share
        if share < 1.0:
            ext += outside[i] * (1.0 - share)
    return ext, shares


def _initial_drop_prices(problem: Problem, allowed: Mapping[str, int]) -> dict[str, float]:
    """Per class: the (k+1)-th dearest cheapest-provider cost (k: its allowed misses)."""
    out = {}
    for c in problem.allowance:
        costs = sorted(
            (min(o.usd for o in r.options) for r in problem.reqs if r.cls == c and r.options),
            reverse=True,
        )
        k = allowed.get(c, 0)
        out[c] = costs[k] if k and k < len(costs) else (costs[-1] if costs and k else 0.0)
    return out


def _price_scales(problem: Problem) -> dict[str, float]:
    """A typical list price per bucket token of each TPM-limited provider."""
    out = {}
    for p in problem.grids:
        per = sorted(
            o.usd / r.bucket_tokens
            for r in problem.reqs
            for o in r.options
            if o.provider == p and r.bucket_tokens > 0
        )
        out[p] = per[len(per) // 2] if per else 1e-8
    return out


def _copy(prices: Prices) -> Prices:
    return Prices(
        {p: list(v) for p, v in prices.cell.items()},
        {p: list(v) for p, v in prices.prefix.items()},
        dict(prices.drop),
    )


def _step(
    problem: Problem,
    allowed: Mapping[str, int],
    prices: Prices,
    at: Solution,
    scale: Mapping[str, float],
    theta: float,
) -> Prices:
    """One projected subgradient step: raise the price of what was overused, lower the rest."""
    out = _copy(prices)
    for p, g in problem.grids.items():
        cap = g.cell_capacity()
        for k in range(g.cells):
            d = (at.use_cell[p][k] - cap) / cap
            out.cell[p][k] = max(0.0, prices.cell[p][k] + theta * scale[p] * d)
        for m in range(1, g.cells + 1):
            cap_m = g.prefix_capacity(m)
            d = (at.use_prefix[p][m] - cap_m) / cap_m
            out.prefix[p][m] = max(0.0, prices.prefix[p][m] + theta * scale[p] * d / g.cells)
    for c, k in allowed.items():
        if k:
            d = (at.drops.get(c, 0.0) - k) / k
            base = max(prices.drop[c], 1e-12)
            out.drop[c] = max(0.0, prices.drop[c] + theta * base * d)
    return out
