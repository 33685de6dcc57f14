"""The batch-aware GPU cost model against DESIGN.md's reference figures."""

from __future__ import annotations

import pytest

from policies.costmodel import GpuModel, derive_knee
from policies.profile import Profile
from policies.spec import LLAMA_8B_H100, GpuSpec, ThroughputProfileSpec


@pytest.fixture
def h100() -> GpuModel:
    return GpuModel.from_spec(GpuSpec(price_per_hour=2.95))


def test_design_worked_numbers(h100: GpuModel) -> None:
    # DESIGN.md: H100 at 2.95/h, 8B at c=1 -> 3.82 $/M output tokens; at c=50 -> 0.10.
    assert h100.cost_per_output_token(1) * 1e6 == pytest.approx(3.82, abs=0.015)
    assert h100.cost_per_output_token(50) * 1e6 == pytest.approx(0.10, abs=0.005)


def test_batch_1_costs_20_to_35_times_batch_32(h100: GpuModel) -> None:
    ratio = h100.cost_per_output_token(1) / h100.cost_per_output_token(32)
    # T(32) interpolates 25 -> 50: 4679 + (8018 - 4679) * 7 / 25 = 5613.9 tokens/s.
    assert ratio == pytest.approx(5613.92 / 215, rel=1e-4)
    assert 20 < ratio < 35


def test_throughput_interpolates_and_is_flat_beyond_last_point(h100: GpuModel) -> None:
    assert h100.throughput(1) == 215
    assert h100.throughput(3) == pytest.approx(215 + (1077 - 215) * 2 / 4)
    assert h100.throughput(75.5) == pytest.approx(8018 + (12215 - 8018) * 25.5 / 50)
    assert h100.throughput(200) == h100.throughput(256) == h100.throughput(1000) == 13348
    # Below 1 is treated as one request, never zero throughput.
    assert h100.throughput(0) == 215


def test_itl_is_batch_over_throughput(h100: GpuModel) -> None:
    assert h100.itl_s(1) == pytest.approx(1 / 215)
    assert h100.itl_s(50) == pytest.approx(50 / 8018)
    # Flat throughput past the last point: ITL grows linearly.
    assert h100.itl_s(400) == pytest.approx(2 * h100.itl_s(200))


def test_knee_is_derived_from_the_profile(h100: GpuModel) -> None:
    # 100 -> 200 adds 11 tokens/s per request, far below 25% of 215: the knee is at 100.
    assert h100.knee == 100
    assert derive_knee(((1, 100.0), (10, 1000.0)), max_batch=64) == 10


def test_reserved_marginal_cost_is_zero_below_the_knee_then_ramps(h100: GpuModel) -> None:
    assert h100.mode == "reserved"
    assert h100.marginal_cost(1000, 200, batch_after=1) == 0.0
    assert h100.marginal_cost(1000, 200, batch_after=100) == 0.0
    mid = h100.marginal_cost(1000, 200, batch_after=178)
    full = h100.marginal_cost(1000, 200, batch_after=256)
    assert 0 < mid < full
    assert full == pytest.approx(h100.amortized_cost(1000, 200, 256))
    # Past max_batch the request queues; its price stays the full amortized cost.
    assert h100.marginal_cost(1000, 200, batch_after=400) == pytest.approx(full)


def test_on_demand_pays_amortized_cost_at_the_predicted_batch() -> None:
    gpu = GpuModel.from_spec(GpuSpec(price_per_hour=2.95, mode="on_demand"))
    at1 = gpu.marginal_cost(0, 100, batch_after=1)
    at50 = gpu.marginal_cost(0, 100, batch_after=50)
    assert at1 == pytest.approx(100 * 2.95 / 3600 / 215)
    assert at50 == pytest.approx(100 * 2.95 / 3600 / 8018)
    with_prompt = gpu.marginal_cost(20_000, 100, batch_after=50)
    # Prefill: 20k tokens at 20k tokens/s is one GPU-second.
    assert with_prompt - at50 == pytest.approx(2.95 / 3600)


def test_chargeback_is_never_free_and_cheaper_in_a_full_batch(h100: GpuModel) -> None:
    alone = h100.chargeback_cost(500, 200, batch_seen=1)
    shared = h100.chargeback_cost(500, 200, batch_seen=32)
    assert alone > shared > 0
    assert h100.chargeback_cost(500, 200, batch_seen=0) == alone
    assert h100.chargeback_cost(0, 0, batch_seen=5) == 0.0


def test_predicted_ttft_counts_queued_prefill_and_full_batches(h100: GpuModel) -> None:
    idle = h100.predicted_ttft_s(2000, load=0, queued_prefill_tokens=0, expected_output_tokens=200)
    assert idle == pytest.approx(2000 / 20_000 + 1 / 215)
    busy = h100.predicted_ttft_s(
        2000, load=9, queued_prefill_tokens=18_000, expected_output_tokens=200
    )
    assert busy == pytest.approx(20_000 / 20_000 + h100.itl_s(10))
    # 10 requests beyond max_batch: wait for 10 completions at the full batch's rate.
    over = h100.predicted_ttft_s(
        2000, load=265, queued_prefill_tokens=0, expected_output_tokens=200
    )
    expected_wait = 10 * 200 / h100.throughput(256)
    assert over == pytest.approx(expected_wait + 0.1 + h100.itl_s(256))


def test_seventy_b_profile_has_its_own_knee_and_costs() -> None:
    spec = ThroughputProfileSpec(decode_tokens_per_s={1: 75, 5: 388, 25: 1565, 50: 2744, 100: 4092})
    gpu = GpuModel.from_profile(spec, 3.50)
    # A token at batch 1 costs T(50) / T(1) = 36.6 times one at batch 50.
    assert gpu.cost_per_output_token(1) / gpu.cost_per_output_token(50) == pytest.approx(2744 / 75)
    assert gpu.knee == 100  # still gaining > 25% of batch-1 speed per request up to 100


@pytest.mark.parametrize(
    "kwargs",
    [
        {"curves": (((5, 100.0), (1, 50.0)),)},
        {"curves": (((1, 100.0), (1, 120.0)),)},
        {"curves": ((),)},
        {"curves": (((1, 0.0),),)},
        {"contexts": (1024, 256), "curves": (((1, 1.0),), ((1, 2.0),))},
        {"contexts": (256, 1024)},
        {"prefill": ()},
        {"max_batch": 0},
    ],
)
def test_invalid_profiles_are_rejected(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {
        "contexts": (1024,),
        "curves": (((1, 100.0),),),
        "prefill": ((512, 1000.0),),
        "max_batch": 8,
    }
    base.update(kwargs)
    with pytest.raises(ValueError):
        Profile(**base)  # type: ignore[arg-type]


def test_a_gpu_model_needs_a_positive_price() -> None:
    with pytest.raises(ValueError):
        GpuModel.from_profile(LLAMA_8B_H100, 0.0)


def test_profile_spec_default_is_the_nim_table() -> None:
    assert LLAMA_8B_H100.curve()[50] == 8018


def test_prefill_load_slows_decoding(h100: GpuModel) -> None:
    # 10k prompt tokens/s on a 20k tokens/s prefill: half the GPU goes to prefill.
    assert h100.prefill_load(10_000) == 0.5
    assert h100.itl_under_load_s(20, 10_000) == pytest.approx(2 * h100.itl_s(20))
    assert h100.itl_under_load_s(20, 0.0) == h100.itl_s(20)
    # Saturated: capped, so the prediction is "far too slow", not infinite.
    assert h100.itl_under_load_s(20, 1e9) == pytest.approx(h100.itl_s(20) / 0.05)
