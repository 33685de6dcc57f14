"""Solving the hindsight bound's relaxation exactly: one linear program, solved by HiGHS.

Variables (every one in [0, 1] unless said), per request: its local share `x`, its share at
each SLO-meeting provider, and (while its class has misses to spare) its dropped share `d`;
the shares sum to 1. A TPM-limited provider's share is split by the grid cell it is
dispatched in (`TPM_CELL_S`, any cell its dispatch window touches). Plus the GPU-seconds
held `H` (>= the trace on every GPU, at most until the last SLO window ends) and, per
TPM-limited provider, its bucket's level `L_k` at the start of each cell, in [0, limit].

Minimise  price_s x H  +  sum over shares at a provider of its list price x the share.

- GPU-seconds: sum of need x `x` <= H; requests that may not wait and whose SLO window ends
  inside their 60-s slot fit that slot's GPU-seconds.
- Misses: sum of `d` over a class <= its allowance (1% of the class, less the requests no
  backend can serve in time, which are misses for every router and cost nothing).
- Token bucket, per cell k: L_k+1 <= L_k + refill x cell - (bucket tokens dispatched in k).
  Every run satisfies it with L_k its bucket's real level (refill up to `limit` only loses
  tokens; a request is admitted only while the level covers it), and it implies what any
  stretch of cells can admit: limit + its refill. A window past the grid counts in none.

Its optimum is the least any router could pay under the relaxation: a valid lower bound up
to the solver's tolerances (1e-7, absolute and relative). Until 2026-12-06 this was a
Lagrangian relaxation of the same constraints (TPM caps on single 60-s cells and on prefixes
from t = 0 only, misses priced in, a subgradient search over the prices, held time on a 30-s
grid) whose best price found was up to 4% below the optimum (tpm-limited-8b $0.0383 against
$0.0400 for the same constraints); the bucket's levels are new.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from loadtest.simulate.bound_external import ExternalOption

# Grid of the token-bucket constraints: finer is tighter and a bigger program.
TPM_CELL_S = 10.0


class SolverMissing(RuntimeError):
    """HiGHS is not installed: it comes with `neogate[simulate]` (and the lock)."""


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
    tpm_limits: Mapping[str, float]  # bucket size (tokens a minute) of each TPM-limited provider
    allowance: Mapping[str, int]  # misses each class may have at the SLO target
    n_gpus: int
    duration_s: float
    slot_s: float
    price_s: float  # USD per GPU-second (the cheapest GPU's)
    grid_end_s: float  # the bucket grid covers [0, grid_end_s]


@dataclass(frozen=True, slots=True)
class Solution:
    """The relaxation's optimum and how it was made up."""

    value: float
    gpu_usd: float
    local_tokens: float


class _Program:
    """A linear program written row by row, handed to HiGHS column-wise."""

    def __init__(self) -> None:
        self.cost: list[float] = []
        self.lower: list[float] = []
        self.upper: list[float] = []
        self.row_lower: list[float] = []
        self.row_upper: list[float] = []
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []

    def var(self, cost: float, lower: float = 0.0, upper: float = 1.0) -> int:
        self.cost.append(cost)
        self.lower.append(lower)
        self.upper.append(upper)
        return len(self.cost) - 1

    def row(self, terms: list[tuple[int, float]], lower: float, upper: float) -> None:
        r = len(self.row_lower)
        self.row_lower.append(lower)
        self.row_upper.append(upper)
        for c, v in terms:
            self.rows.append(r)
            self.cols.append(c)
            self.vals.append(v)

    def solve(self) -> list[float] | None:
        """The optimal column values; None when no point meets every row."""
        # Imported here, not at the top: `neogate` builds every command's parser, and a
        # gateway installed without the `simulate` extra must still serve.
        try:
            import highspy
            import numpy as np
            from highspy import _core
        except ImportError as e:
            raise SolverMissing(
                "the hindsight bound needs the HiGHS solver: pip install 'neogate[simulate]'"
            ) from e
        lp = highspy.HighsLp()
        lp.num_col_ = len(self.cost)
        lp.num_row_ = len(self.row_lower)
        lp.col_cost_ = np.array(self.cost)
        lp.col_lower_ = np.array(self.lower)
        lp.col_upper_ = np.array(self.upper)
        lp.row_lower_ = np.array(self.row_lower)
        lp.row_upper_ = np.array(self.row_upper)
        cols = np.array(self.cols, dtype=np.int64)
        order = np.argsort(cols, kind="stable")
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.num_col_ = lp.num_col_
        lp.a_matrix_.num_row_ = lp.num_row_
        lp.a_matrix_.start_ = np.searchsorted(cols[order], np.arange(lp.num_col_ + 1))
        lp.a_matrix_.index_ = np.array(self.rows, dtype=np.int64)[order]
        lp.a_matrix_.value_ = np.array(self.vals)[order]
        # The bare solver: `highspy.Highs()` turns on callbacks at once, which prints HiGHS's
        # banner to stdout before any option can switch output off.
        h = _core._Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("threads", 1)
        h.passModel(lp)
        h.run()
        status = h.getModelStatus()
        if status == highspy.HighsModelStatus.kInfeasible:
            return None
        if status != highspy.HighsModelStatus.kOptimal:
            raise RuntimeError(f"hindsight bound: the LP solver stopped with {status}")
        return list(h.getSolution().col_value)


def solve(problem: Problem) -> Solution | None:
    """The relaxation's optimum (see the module docstring); None when it has no solution: then
    no routing on this fleet meets the SLO target, since every one that did would be one."""
    lp = _Program()
    reqs = problem.reqs
    n = problem.n_gpus
    cells = max(1, math.ceil(problem.grid_end_s / TPM_CELL_S))
    # Per TPM-limited provider and cell: the (column, bucket tokens) dispatched there.
    dispatched: dict[str, list[list[tuple[int, float]]]] = {
        p: [[] for _ in range(cells)] for p in problem.tpm_limits
    }
    forced: dict[str, int] = {}
    for r in reqs:
        if math.isinf(r.need) and not r.options:
            forced[r.cls] = forced.get(r.cls, 0) + 1
    allowed = {c: max(0, k - forced.get(c, 0)) for c, k in problem.allowance.items()}
    drops: dict[str, list[tuple[int, float]]] = {}
    local: list[tuple[int, int]] = []  # (request index, column of its local share)
    for i, r in enumerate(reqs):
        if math.isinf(r.need) and not r.options:
            continue  # a miss for every router: it costs nothing
        shares = []
        if not math.isinf(r.need) and n:
            x = lp.var(0.0)
            local.append((i, x))
            shares.append(x)
        for o in r.options:
            if o.provider not in dispatched:
                shares.append(lp.var(o.usd))
                continue
            k0 = min(int(r.t // TPM_CELL_S), cells - 1)
            k1 = min(math.ceil(o.latest_s / TPM_CELL_S), cells)
            for k in range(k0, max(k1, k0 + 1)):
                c = lp.var(o.usd)
                shares.append(c)
                dispatched[o.provider][k].append((c, float(r.bucket_tokens)))
            if o.latest_s > cells * TPM_CELL_S:
                shares.append(lp.var(o.usd))  # dispatched past the grid: no bucket row
        if allowed.get(r.cls, 0):
            d = lp.var(0.0)
            drops.setdefault(r.cls, []).append((d, 1.0))
            shares.append(d)
        if not shares:
            raise ValueError(f"request at t={r.t} has no way to be served or missed")
        lp.row([(c, 1.0) for c in shares], 1.0, 1.0)
    for cls, terms in drops.items():
        lp.row(terms, -math.inf, float(allowed[cls]))
    held = -1
    if n:
        tail = max((reqs[i].tail for i, _ in local), default=0.0)
        held = lp.var(
            problem.price_s,
            n * problem.duration_s,
            n * (problem.duration_s + max(tail, 0.0)),
        )
        lp.row([(x, reqs[i].need) for i, x in local] + [(held, -1.0)], -math.inf, 0.0)
        by_slot: dict[int, list[tuple[int, float]]] = {}
        for i, x in local:
            if reqs[i].slot >= 0:
                by_slot.setdefault(reqs[i].slot, []).append((x, reqs[i].need))
        for s, terms in by_slot.items():
            length = min((s + 1) * problem.slot_s, problem.duration_s) - s * problem.slot_s
            lp.row(terms, -math.inf, n * length)
    for p, limit in problem.tpm_limits.items():
        refill = limit / 60.0 * TPM_CELL_S
        levels = [lp.var(0.0, 0.0, limit) for _ in range(cells + 1)]
        for k in range(cells):
            terms = [(levels[k + 1], 1.0), (levels[k], -1.0), *dispatched[p][k]]
            lp.row(terms, -math.inf, refill)
    values = lp.solve()
    if values is None:
        return None
    value = sum(c * v for c, v in zip(lp.cost, values, strict=True))
    gpu_usd = problem.price_s * values[held] if held >= 0 else 0.0
    local_tokens = sum(reqs[i].tokens * values[x] for i, x in local)
    return Solution(value, gpu_usd, local_tokens)
