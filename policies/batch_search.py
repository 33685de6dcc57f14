"""The SLO-feasible batch b*: the search behind `GpuModel.slo_batch`.

b* is the largest batch whose predicted ITL (decode-only ITL b / T(b), mixed with chunked
prefill at a share `load` of the time, `GpuModel.mixed_itl`) meets a target. Per-request
speed T(b)/b falls as b grows, so the ITL rises with b and a binary search finds b*. Two
shortcuts give the same batch with less arithmetic: the decode-only ITL is compared with the
ITL at which the mixed ITL meets the target (`mixed_itl_cut`, solved once a search), and
where a measured curve's ITL never falls from some batch on, b* is found by bisection over
that curve's ITL table (`itl_curve`, built once per model).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from policies.profile import Profile

# `slo_batch` compares a batch's decode-only ITL with the ITL at which the mixed ITL meets
# the target (`mixed_itl_cut`), solved once per search instead of the mixed ITL per batch.
# Within this relative distance of the cut the two sides' rounding (~1e-15) could disagree,
# so there the mixed ITL is computed as before; outside it the answer is the same (the mixed
# ITL moves at least 0.05 x as far as the decode ITL: its elasticity is >= 1 - load).
CUT_BAND = 1e-9

# One measured context's (throughput table, ITL by batch, m): `itl_curve` of the table.
ItlCurve = tuple[tuple[float, ...], tuple[float, ...], int]


def mixed_itl_cut(max_itl_s: float, load: float, mixed_step_s: float) -> float:
    """The decode-only ITL at which `GpuModel.mixed_itl` reaches `max_itl_s` (> 0) with a
    share `load` (0 < load < 1) of the time in chunked-prefill steps of `mixed_step_s`.

    A decode step at least as long as the mixed step is the mixed ITL itself, so when the
    target is no shorter than the mixed step the cut is the target. Otherwise the root of
    load / step + (1 - load) / itl = 1 / max_itl_s: (1 - load) / (1 / max_itl_s - load /
    step), below the mixed step (the denominator is at least (1 - load) / step).
    """
    if max_itl_s >= mixed_step_s:
        return max_itl_s
    return (1.0 - load) / (1.0 / max_itl_s - load / mixed_step_s)


def itl_curve(table: tuple[float, ...], top: int) -> tuple[tuple[float, ...], int]:
    """(ITL by batch 0..top of a throughput table, as `slo_batch` computes it (b / T(b); 0.0
    at 0, unused), the smallest batch m >= 1 from which that ITL never falls)."""
    itl = (0.0, *(b / table[b] for b in range(1, top + 1)))
    m = top if top > 1 else 1
    while m > 1 and itl[m - 1] <= itl[m]:
        m -= 1
    return itl, m


def itl_curves(profile: Profile) -> tuple[ItlCurve, ...]:
    """`itl_curve` of each measured context's table, with the table: `slo_batch`'s fast path."""
    curves = []
    for c in profile.contexts:
        table = profile.tables_at(c)[0]
        curves.append((table, *itl_curve(table, profile.max_batch)))
    return tuple(curves)


def slo_batch(
    max_itl_s: float,
    load: float,
    tables: tuple[tuple[float, ...], tuple[float, ...], float],
    curves: tuple[ItlCurve, ...],
    top_batch: int,
    mixed_step_s: float,
) -> int:
    """b*: the largest batch 0..top_batch whose ITL meets `max_itl_s`, 0 when none does.

    `tables` is `Profile.tables_at(context)`: T(b) = a[b] + (b[b] - a[b]) * weight; `load` the
    share of time in chunked-prefill steps of `mixed_step_s` (0.0: nothing prefilled);
    `curves` the model's `itl_curves`. The binary search visits the batches the plain search
    always did; the cut and the bisection only spare it arithmetic.
    """
    ta, tb, w = tables
    # A batch meets the target when its decode-only ITL is below the cut (`mixed_itl_cut`,
    # solved once) and misses above it; within CUT_BAND of the cut, and with nothing
    # prefilled, `_meets` judges it by the mixed ITL itself as the search always did.
    below = above = max_itl_s
    if load and max_itl_s > 0.0:
        cut = mixed_itl_cut(max_itl_s, load, mixed_step_s)
        below, above = cut * (1.0 - CUT_BAND), cut * (1.0 + CUT_BAND)
    if w == 0.0:
        for table, itl, m in curves:
            if table is ta:
                found = _sorted_slo_batch(
                    itl, m, top_batch, below, above, max_itl_s, load, mixed_step_s
                )
                if found is not None:
                    return found
                break
    lo, hi = 0, top_batch
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        t = ta[mid] if w == 0.0 else ta[mid] + (tb[mid] - ta[mid]) * w
        itl_mid = mid / t
        if itl_mid < below:
            lo = mid
        elif itl_mid > above:
            hi = mid - 1
        elif _meets(itl_mid, max_itl_s, load, mixed_step_s):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _meets(itl: float, max_itl_s: float, load: float, mixed_step_s: float) -> bool:
    """Whether the mixed ITL of decode-only ITL `itl` at prefill share `load` (0: none)
    meets `max_itl_s`: `GpuModel.mixed_itl` written out, the arithmetic b* was always judged
    by."""
    if load:
        step = mixed_step_s if mixed_step_s > itl else itl
        itl = 1.0 / (load / step + (1.0 - load) / itl)
    return itl <= max_itl_s


def _sorted_slo_batch(
    itl: tuple[float, ...],
    m: int,
    top_batch: int,
    below: float,
    above: float,
    max_itl_s: float,
    load: float,
    mixed_step_s: float,
) -> int | None:
    """The binary search's answer found by bisection, where that is sure to be the same.

    `itl` never falls from batch m on, and a correctly rounded mixed ITL never falls as the
    ITL rises, so from m on the batches that meet the target are m..top: bisect finds top.
    The search of `slo_batch` visits no batch below m when m is 1 or top >= 2m - 1 (each
    step's midpoint is at least half of a bound >= top), and then returns top too. Otherwise
    None: the search itself must run (a curve whose ITL dips at small batches, e.g. a 1-to-5
    interpolation, may answer differently there).
    """
    i = bisect_left(itl, below, m, top_batch + 1)
    j = bisect_right(itl, above, i, top_batch + 1)
    while i < j and _meets(itl[i], max_itl_s, load, mixed_step_s):
        i += 1
    top = i - 1
    if m == 1 or top >= 2 * m - 1:
        return top
    return None
