"""b* found by the ITL cut and by bisection: the same batch as the plain search, to the ulp."""

from __future__ import annotations

import math

import pytest

from gateway.profiles import load_profile, shipped_profiles
from policies.batch_search import itl_curve, mixed_itl_cut
from policies.costmodel import GpuModel
from policies.spec import LLAMA_8B_H100, ThroughputProfileSpec


def plain_slo_batch(
    gpu: GpuModel, max_itl_s: float, rate: float = 0.0, context: float | None = None
) -> int:
    """The search as it was (8a733f7): the mixed ITL of every batch it visits."""
    load = gpu.prefill_load(rate) if rate > 0 else 0.0
    ta, tb, w = gpu.profile.tables_at(context)
    lo, hi = 0, gpu.max_batch
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        itl = mid / (ta[mid] if w == 0.0 else ta[mid] + (tb[mid] - ta[mid]) * w)
        if load:
            itl = gpu.mixed_itl(itl, load)
        if itl <= max_itl_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def test_mixed_itl_cut_worked() -> None:
    # Mixed steps of 2048 / 3600 = 0.568889 s, half the time: the mixed ITL is 50 ms at
    # 1 / ITL = (20 - 0.5 / 0.568889) / 0.5 = 38.2422, ITL 26.149 ms.
    step = 2048 / 3600
    cut = mixed_itl_cut(0.05, 0.5, step)
    assert cut == pytest.approx(0.5 / (20 - 0.5 / step)) and cut == pytest.approx(0.026149, 1e-4)
    toy = GpuModel.from_profile(
        ThroughputProfileSpec(decode_tokens_per_s={1: 100}, prefill_tokens_per_s=3600), 1.0
    )
    assert toy.mixed_step_s == step
    assert toy.mixed_itl(cut, 0.5) == pytest.approx(0.05, rel=1e-12)
    # A target no shorter than a mixed step: a decode step that long is its own mixed ITL.
    assert mixed_itl_cut(0.6, 0.5, step) == 0.6
    assert mixed_itl_cut(step, 0.9, step) == step


def test_itl_curve_worked() -> None:
    # T = 100, 150, 330, 400: ITL 10, 13.33, 9.09, 10 ms; it never falls again from 3 on.
    itl, m = itl_curve((0.0, 100.0, 150.0, 330.0, 400.0), 4)
    assert itl == (0.0, 1 / 100.0, 2 / 150.0, 3 / 330.0, 4 / 400.0) and m == 3
    assert itl_curve((0.0, 100.0, 150.0, 200.0), 3)[1] == 1  # rising from batch 1
    assert itl_curve((0.0, 100.0), 1) == ((0.0, 0.01), 1)
    # Two batches: 10 then 6.67 ms falls, so m is 2; 10 then 10 ms does not fall, so m is 1.
    assert itl_curve((0.0, 100.0, 300.0), 2)[1] == 2
    assert itl_curve((0.0, 100.0, 200.0), 2)[1] == 1


# ITL 10, 13.33, 9.09, 10 ms at batch 1-4: a dip the bisection must not be trusted over.
DIP = ThroughputProfileSpec(
    decode_tokens_per_s={1: 100, 2: 150, 3: 330, 4: 400}, prefill_tokens_per_s=3600, max_batch=4
)


def test_a_curve_that_dips_keeps_the_search_answer() -> None:
    gpu = GpuModel.from_profile(DIP, 1.0)
    # 9.5 ms: only batch 3 meets it, but the search tries 2 (a miss), then 1 (a miss): 0,
    # as it always answered. Bisecting the rising part (3-4) alone would say 3.
    assert gpu.slo_batch(0.0095) == 0
    # 12.5 ms: 2 misses, 1 meets: 1, though 3 and 4 meet it too. 20 ms: all of them.
    assert gpu.slo_batch(0.0125) == 1
    assert gpu.slo_batch(0.02) == 4


# ITL 10, 6.67, 7.5 ms at batch 1-3: it never falls from batch 2 on (m == 2), nor from 3.
DIP_AT_2 = ThroughputProfileSpec(
    decode_tokens_per_s={1: 100, 2: 300, 3: 400}, prefill_tokens_per_s=3600, max_batch=3
)


def test_a_dip_at_batch_2_keeps_the_search_answer() -> None:
    gpu = GpuModel.from_profile(DIP_AT_2, 1.0)
    # 5 ms: nothing meets it. Bisecting from m = 2 finds top 1 (batch 2 misses), which is
    # not 2m - 1 = 3 or more: the search runs, tries 2 then 1, both misses: 0, not 1.
    assert gpu.slo_batch(0.005) == 0
    # 7 ms: 2 meets, 3 misses: the search's 2. 8 ms: 2 and 3 meet, top 3 >= 2m - 1: 3.
    assert gpu.slo_batch(0.007) == 2
    assert gpu.slo_batch(0.008) == 3


def _profiles() -> list[ThroughputProfileSpec]:
    return [load_profile(n) for n in shipped_profiles()] + [LLAMA_8B_H100, DIP, DIP_AT_2]


@pytest.mark.parametrize("spec", _profiles(), ids=lambda p: p.name or f"dip{p.max_batch}")
def test_slo_batch_is_the_plain_search_at_every_boundary(spec: ThroughputProfileSpec) -> None:
    # Targets at each batch's own mixed ITL and one ulp either side (where the cut's
    # rounding could differ from the mixed ITL's), at no, some and a saturating prefill
    # load, at every measured context, between two, and past either end.
    gpu = GpuModel.from_profile(spec, 2.0)
    ctxs = gpu.profile.contexts
    contexts: list[float | None] = [None, 0.0, 1e6, *ctxs, (ctxs[0] + ctxs[-1]) / 2 + 0.5]
    batches = sorted({*range(1, min(gpu.max_batch, 48) + 1), *range(1, gpu.max_batch + 1, 13)})
    for context in contexts:
        for rate in (0.0, 0.3 * gpu.prefill_tokens_per_s, 5 * gpu.prefill_tokens_per_s):
            load = gpu.prefill_load(rate) if rate > 0 else 0.0
            for b in batches:
                itl = gpu.itl_s(b, context)
                at = gpu.mixed_itl(itl, load) if load else itl
                for target in (at, math.nextafter(at, 0.0), math.nextafter(at, 1.0)):
                    want = plain_slo_batch(gpu, target, rate, context)
                    assert gpu.slo_batch(target, rate, context) == want, (context, rate, b)
            for target in (0.0, gpu.mixed_step_s, 1e-6, 10.0):
                assert gpu.slo_batch(target, rate, context) == plain_slo_batch(
                    gpu, target, rate, context
                )
