"""The batch-aware GPU cost model against DESIGN.md's reference figures."""

from __future__ import annotations

import pytest

from policies.costmodel import TAIL_Z, GpuModel, opportunity_share
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


def test_slo_batch_is_the_largest_batch_meeting_the_itl_target(h100: GpuModel) -> None:
    # 10 ms: T(b) >= 100 b. Between 100 (12215) and 200 (13348) T rises 11.33 per request:
    # 12215 + 11.33 (b - 100) >= 100 b  <=>  b <= 11082 / 88.67 = 124.98 -> b* = 124.
    assert h100.slo_batch(0.010) == 124
    # 50 ms: every batch up to max_batch meets it; no target: max_batch.
    assert h100.slo_batch(0.050) == 256 and h100.slo_batch(None) == 256
    # 1 ms: not even batch 1 (1/215 s = 4.65 ms).
    assert h100.slo_batch(0.001) == 0


def test_slo_batch_counts_prefill_interference(h100: GpuModel) -> None:
    # 10k prompt tokens/s on a 20k tokens/s prefill: half the time goes to chunked prefill,
    # whose steps (2048 tokens at 20k/s: 102.4 ms) still give each request one token. Mean
    # ITL 1 / (0.5 / 0.1024 + 0.5 / ITL(b)) <= 10 ms  <=>  0.5 / ITL(b) >= 100 - 4.8828
    # <=> ITL(b) <= 5.2567 ms. Between 5 (1077) and 25 (4679) T = 1077 + 180.1 (b - 5):
    # b 17: 17 / 3238.2 = 5.2498 ms; b 18: 18 / 3418.3 = 5.2658 ms -> b* = 17.
    # (The old model, ITL(b) / (1 - load), gave 8: it forgot the tokens of mixed steps.)
    assert h100.slo_batch(0.010, prompt_tokens_per_s=10_000) == 17


def test_slo_batch_falls_with_context_length() -> None:
    from gateway.profiles import load_profile

    gpu = GpuModel.from_profile(load_profile("llama-3.1-8b-h200"), 3.50)
    # 20 ms: T(b) >= 50 b. At context 4096, between 64 (4845) and 128 (6036), slope 18.609:
    # 4845 + 18.609 (b - 64) >= 50 b  <=>  b <= 3654 / 31.39 = 116.4 -> 116.
    assert gpu.slo_batch(0.020, context=4096) == 116
    # At context 1024, between 256 (16828) and 384 (17540), slope 5.5625:
    # 16828 + 5.5625 (b - 256) >= 50 b  <=>  b <= 15404 / 44.4375 = 346.6 -> 346.
    assert gpu.slo_batch(0.020, context=1024) == 346


def test_opportunity_share_is_zero_with_headroom_and_rises_to_one_at_b_star() -> None:
    # b* = 100: band = 25, so zero while 75 or fewer are already there.
    assert opportunity_share(76, 100) == 0.0
    assert opportunity_share(88, 100) == pytest.approx(12 / 25)
    assert opportunity_share(100, 100) == pytest.approx(24 / 25)
    assert opportunity_share(101, 100) == 1.0
    # A small b*: the band is one request; every slot under b* is free.
    assert opportunity_share(4, 4) == 0.0 and opportunity_share(5, 4) == 1.0
    # No batch meets the SLO: always the full displaced price.
    assert opportunity_share(1, 0) == 1.0


@pytest.mark.parametrize("mode", ["reserved", "on_demand"])
def test_marginal_cost_is_the_displaced_work_share_for_both_modes(mode: str) -> None:
    gpu = GpuModel.from_spec(GpuSpec(price_per_hour=2.95, mode=mode))  # type: ignore[arg-type]
    # The displaced work: 1000 prompt + 200 output tokens at Groq's $0.05/$0.08 per M.
    displaced = 1000 * 0.05e-6 + 200 * 0.08e-6
    assert displaced == pytest.approx(6.6e-5)
    # An idle GPU (batch 1 of b* 100) costs nothing to use, on_demand included: it is paid.
    assert gpu.marginal_cost(1, 100, displaced) == 0.0
    assert gpu.marginal_cost(88, 100, displaced) == pytest.approx(0.48 * 6.6e-5)
    assert gpu.marginal_cost(101, 100, displaced) == pytest.approx(6.6e-5)


def test_attributed_cost_by_hand(h100: GpuModel) -> None:
    # $2.95/h = $0.000819444/s. 1000 prompt tokens of which 600 were prefix-cache hits:
    # 400 uncached at 20k tokens/s = 0.02 s; 200 output tokens at batch 50 (8018 tokens/s)
    # = 0.0249439 s. Total 0.0449439 GPU-s x $0.000819444 = $3.68293e-5.
    cost = h100.attributed_cost(1000, 200, 50, cached_tokens=600)
    assert cost == pytest.approx(3.68293e-5, rel=1e-5)
    # Without the cache hit the prefill of all 1000 tokens is charged: + 0.03 s.
    assert h100.attributed_cost(1000, 200, 50) == pytest.approx(
        (0.05 + 200 / 8018) * 2.95 / 3600, rel=1e-9
    )


def test_attributed_cost_is_never_free_and_cheaper_in_a_full_batch(h100: GpuModel) -> None:
    alone = h100.attributed_cost(500, 200, batch_seen=1)
    shared = h100.attributed_cost(500, 200, batch_seen=32)
    assert alone > shared > 0
    assert h100.attributed_cost(500, 200, batch_seen=0) == alone
    assert h100.attributed_cost(0, 0, batch_seen=5) == 0.0


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


def test_seventy_b_profile_has_its_own_costs() -> None:
    spec = ThroughputProfileSpec(decode_tokens_per_s={1: 75, 5: 388, 25: 1565, 50: 2744, 100: 4092})
    gpu = GpuModel.from_profile(spec, 3.50)
    # A token at batch 1 costs T(50) / T(1) = 36.6 times one at batch 50.
    assert gpu.cost_per_output_token(1) / gpu.cost_per_output_token(50) == pytest.approx(2744 / 75)


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
    # ITL(20) = 20 / (1077 + 180.1 x 15) = 20 / 3778.5 = 5.2931 ms; a mixed step 102.4 ms.
    # 1 / (0.5 / 0.1024 + 0.5 / 0.0052931) = 1 / 99.348 = 10.066 ms.
    assert h100.mixed_step_s == pytest.approx(0.1024)
    assert h100.itl_s(20) == pytest.approx(0.0052931, rel=1e-4)
    assert h100.itl_under_load_s(20, 10_000) == pytest.approx(0.010066, rel=1e-4)
    assert h100.itl_under_load_s(20, 0.0) == h100.itl_s(20)
    # Saturated (load capped at 0.95): 1 / (9.2773 + 9.4463) = 53.41 ms, never more than a
    # mixed step, however loaded: the running requests still get one token per step.
    assert h100.itl_under_load_s(20, 1e9) == pytest.approx(0.05341, rel=1e-3)
    assert h100.mixed_itl(0.2, 0.5) == pytest.approx(0.2)  # decode step longer than a chunk


# --- pinned by mutation testing (make mutation): a toy profile with round numbers ----------
# Two measured contexts; T(b) is a straight line in each: 50 b + 50 tokens/s at 1,000 tokens
# of context, 20 b + 20 at 4,000. Prefill: 3,600 tokens/s at 512-token prompts, 1,800 at
# 4,096. 3.6 $/h is 0.001 $/s. max_batch 8, below the last measured point (10).
TOY = ThroughputProfileSpec(
    decode_tokens_per_s={1000: {1: 100, 10: 550}, 4000: {1: 40, 10: 220}},
    prefill_tokens_per_s={512: 3600, 4096: 1800},
    max_batch=8,
)


@pytest.fixture
def toy() -> GpuModel:
    return GpuModel.from_profile(TOY, 3.6)


def toy_itl(b: int, per_b: float = 50.0) -> float:
    """ITL(b) = b / T(b) = b / (per_b (b + 1)), by hand."""
    return b / (per_b * (b + 1))


def test_toy_throughput_cost_and_itl_at_each_context(toy: GpuModel) -> None:
    assert toy.mode == "reserved"
    assert (toy.throughput(1), toy.throughput(5), toy.throughput(10)) == (100, 300, 550)
    assert toy.throughput(11) == 550  # past the table: flat beyond the last point
    assert toy.throughput(5, 4000) == 120 and toy.throughput(5, 2500) == 210
    assert toy.cost_per_output_token(5, 4000) == pytest.approx(0.001 / 120)
    assert toy.itl_s(0.5) == pytest.approx(0.01)  # below one request: as one request
    assert toy.itl_s(1.5) == pytest.approx(1.5 / 125)
    assert toy.itl_s(5, 4000) == pytest.approx(5 / 120)


def test_toy_itl_under_prefill_load(toy: GpuModel) -> None:
    assert toy.itl_under_load_s(5, 0, 4000) == pytest.approx(5 / 120)
    # Half the time in chunked prefill, whose steps take 2048 / 3600 = 0.56889 s: tokens per
    # second 0.5 / 0.56889 + 0.5 / (5 / 120) = 0.87891 + 12 -> ITL 1 / 12.87891 = 77.647 ms.
    assert toy.mixed_step_s == pytest.approx(2048 / 3600)
    assert toy.itl_under_load_s(5, 1800, 4000) == pytest.approx(1 / 12.87891, rel=1e-5)
    assert toy.itl_under_load_s(1, 1.0) == pytest.approx(
        1 / ((1 / 3600) / (2048 / 3600) + (1 - 1 / 3600) / 0.01)
    )
    assert toy.prefill_load(3600 * 2) == 0.95  # capped


@pytest.mark.parametrize("limit", [0.0099, 0.01, 0.0125, 0.016, 0.0165, 0.0175, 0.02])
def test_toy_slo_batch_is_the_largest_batch_meeting_the_itl(toy: GpuModel, limit: float) -> None:
    want = max((b for b in range(9) if b == 0 or toy_itl(b) <= limit), default=0)
    assert toy.slo_batch(limit) == want
    want_long = max((b for b in range(9) if b == 0 or toy_itl(b, 20.0) <= limit), default=0)
    assert toy.slo_batch(limit, context=4000) == want_long


def test_toy_slo_batch_boundaries(toy: GpuModel) -> None:
    assert toy.slo_batch(None) == 8
    assert toy_itl(4) == 0.016 and toy.slo_batch(0.016) == 4  # exactly at the target: in
    # One prompt token per second takes 1/3600 of the GPU: the target shrinks by that much.
    assert toy.slo_batch(0.016, 1.0) == 3
    assert toy.slo_batch(0.016, 0.0) == 4


def test_toy_amortized_and_attributed_costs(toy: GpuModel) -> None:
    # Past max_batch the rate is the one at max_batch (T(8) = 450), not T(20) = 550.
    assert toy.amortized_cost(0, 10, 20) == pytest.approx(10 * 0.001 / 450)
    assert toy.amortized_cost(0, 10, 5, 4000) == pytest.approx(10 * 0.001 / 120)
    assert toy.attributed_cost(0, 10, 1.5) == pytest.approx(10 * 0.001 / 125)
    assert toy.attributed_cost(0, 10, 5, context=4000) == pytest.approx(10 * 0.001 / 120)
    # 512 uncached prompt tokens prefill at 3,600 tokens/s.
    assert toy.attributed_cost(612, 0, 1, cached_tokens=100) == pytest.approx(512 / 3600 * 0.001)


def test_toy_ttft_past_max_batch_waits_for_one_completion(toy: GpuModel) -> None:
    # 8 already running: one more waits for a slot, freed at T(8) / 1 token = 1/450 s, then
    # decodes one step at batch 8: 8/450 s. Nothing to prefill.
    got = toy.predicted_ttft_s(0, load=8, queued_prefill_tokens=0, expected_output_tokens=1)
    assert got == pytest.approx(9 / 450)
    got0 = toy.predicted_ttft_s(0, load=8, queued_prefill_tokens=0, expected_output_tokens=0)
    assert got0 == pytest.approx(9 / 450)


def test_toy_most_per_token_is_at_the_slowest_measured_speeds(toy: GpuModel) -> None:
    prompt, output = toy.most_per_token()
    assert prompt == pytest.approx(0.001 / 1800) and output == pytest.approx(0.001 / 40)


def test_a_cheap_gpu_is_still_a_gpu_and_a_free_one_is_refused() -> None:
    assert GpuModel.from_profile(TOY, 0.5).price_per_hour == 0.5
    prof = Profile.from_spec(TOY)
    assert GpuModel.from_profile(prof, 1.0).profile is prof
    with pytest.raises(ValueError, match=r"^price per hour must be positive$"):
        GpuModel.from_profile(TOY, 0.0)


@pytest.mark.parametrize("limit", [0.0099, 0.0143, 0.016, 0.0222, 0.024, 0.05])
def test_toy_slo_batch_between_measured_contexts(toy: GpuModel, limit: float) -> None:
    # Halfway between 1,000 and 4,000 tokens: T(b) = (50 b + 50 + 20 b + 20) / 2 = 35 (b + 1).
    want = max((b for b in range(9) if b == 0 or toy_itl(b, 35.0) <= limit), default=0)
    assert toy.slo_batch(limit, context=2500) == want
    assert toy.itl_s(3, 2500) == pytest.approx(toy_itl(3, 35.0))


def test_tail_prompt_rate_is_the_quantile_of_the_load_one_request_sees(h100: GpuModel) -> None:
    # 5,000 prompt tokens/s on a 20,000 tokens/s prefill: mean load 0.25. Prompts of 0.16 s
    # of prefill each, over a 1-s decode: variance 0.25 x 0.16 / 1 = 0.04, sd 0.2. At
    # TAIL_Z = 2.33 the load is 0.25 + 0.466 = 0.716, i.e. 14,320 prompt tokens/s.
    assert TAIL_Z == 2.33
    assert h100.tail_prompt_rate(5_000, 0.16, 1.0) == pytest.approx(14_320)
    # A longer decode averages the bursts out: over 100 s, 0.25 + 2.33 x 0.02 = 0.2966.
    assert h100.tail_prompt_rate(5_000, 0.16, 100.0) == pytest.approx(5_932)
    # No prompts arriving, or nothing to average: the mean as it is.
    assert h100.tail_prompt_rate(0.0, 0.16, 1.0) == 0.0
    assert h100.tail_prompt_rate(5_000, 0.0, 1.0) == 5_000


def test_the_tail_load_lowers_b_star_for_a_short_exposure(h100: GpuModel) -> None:
    # ITL target 10 ms. At the mean load 0.25 (mixed steps of 102.4 ms):
    # 0.25 / 0.1024 + 0.75 / ITL(b) >= 100  <=>  ITL(b) <= 0.75 / 97.559 = 7.6876 ms. On the
    # NIM table between batch 50 (8018/s) and 100 (12215/s), T(b) = 3821 + 83.94 b, and
    # b / T(b) <= 7.6876 ms up to b = 29.374 / 0.35471 = 82.8: b* 82. At the tail load 0.716
    # of a 1-s exposure: 0.284 / ITL(b) >= 100 - 6.9922  <=>  ITL(b) <= 3.0535 ms, below
    # even batch 1 (1 / 215 = 4.65 ms): b* 0.
    assert h100.slo_batch(0.010, 5_000) == 82
    assert h100.slo_batch(0.010, h100.tail_prompt_rate(5_000, 0.16, 1.0)) == 0


def test_a_kv_cap_limits_the_batch_per_context() -> None:
    # 412,000 KV tokens (an 8B H100's cache): sequences of 2,000 tokens fit 206 at once;
    # of 1,000, 412, so max_batch (256) binds; one larger than the cache still runs alone.
    nim = dict(LLAMA_8B_H100.curve())
    gpu = GpuModel.from_profile(
        ThroughputProfileSpec(
            decode_tokens_per_s=nim, prefill_tokens_per_s=20_000, kv_capacity_tokens=412_000
        ),
        2.95,
    )
    assert (gpu.batch_cap(2_000), gpu.batch_cap(1_000), gpu.batch_cap(500_000)) == (206, 256, 1)
    # Without a cap, max_batch.
    assert GpuModel.from_profile(LLAMA_8B_H100, 2.95).batch_cap(2_000) == 256


def test_ttft_waits_for_a_slot_past_the_kv_cap(h100: GpuModel) -> None:
    # 10 on the worker and room for 8: the 11th waits for 3 completions, each 200 tokens
    # at T(8) = 1077 + 180.1 x 3 = 1617.3 tokens/s: 3 x 0.12366 = 0.37099 s; then its own
    # 1,000-token prefill at 20k/s (0.05 s) and one decode step at 8, 8 / 1617.3 = 4.946 ms.
    ttft = h100.predicted_ttft_s(
        1000, load=10, queued_prefill_tokens=0, expected_output_tokens=200, slots=8
    )
    assert ttft == pytest.approx(0.37099 + 0.05 + 0.004946, rel=1e-4)
    # Without the cap 11 fit: no wait.
    free = h100.predicted_ttft_s(1000, load=10, queued_prefill_tokens=0, expected_output_tokens=200)
    assert free == pytest.approx(0.05 + 11 / h100.throughput(11), rel=1e-6)


# --- pinned by mutation testing, 2026-12-06: the toy profile's round numbers, by hand ------


def test_toy_kv_cap_boundaries() -> None:
    # A cache of 5 tokens (max_batch 8): 1-token sequences fit 5; a size of 0 (nothing to
    # hold) is not a cap, and half-token sequences would fit 10: max_batch binds.
    gpu = GpuModel.from_profile(
        ThroughputProfileSpec(
            decode_tokens_per_s=TOY.decode_tokens_per_s,
            prefill_tokens_per_s=TOY.prefill_tokens_per_s,
            max_batch=8,
            kv_capacity_tokens=5,
        ),
        3.6,
    )
    assert (gpu.batch_cap(1), gpu.batch_cap(2), gpu.batch_cap(0), gpu.batch_cap(0.5)) == (
        5,
        2,
        8,
        8,
    )


def test_toy_tail_prompt_rate_small_rates_and_no_horizon(toy: GpuModel) -> None:
    # 1 prompt token/s on 3,600/s, bursts of 0.36 s over a 1-s decode: the tail rate is
    # r + Z sqrt(r x 3600 x 0.36 / 1) = 1 + 2.33 x 36 = 84.88 tokens/s.
    assert toy.tail_prompt_rate(1.0, 0.36, 1.0) == pytest.approx(84.88)
    # No decode to average over: the mean as it is (not a division by zero).
    assert toy.tail_prompt_rate(1800, 0.16, 0.0) == 1800


def test_toy_itl_miss_probability_edges(toy: GpuModel) -> None:
    # Decode step 10 ms (batch 1), target 50 ms, mixed step 2048 / 3600 = 0.568889 s:
    # rho_max = (100 - 20) / (100 - 1.7578125) = 0.814314.
    # A decode step exactly at the target already misses.
    assert toy.itl_miss_probability(0.05, 0.05, 1800, 0.16, 1.0) == 1.0
    # Without a burst length (or a horizon) the share is its mean: a step at rho_max.
    assert toy.itl_miss_probability(0.01, 0.05, 1800, 0.0, 1.0) == 0.0  # load 0.5
    assert toy.itl_miss_probability(0.01, 0.05, 3240, 0.0, 1.0) == 1.0  # load 0.9
    assert toy.itl_miss_probability(0.01, 0.05, 3240, 0.16, 0.0) == 1.0
    # A known prefill inside a decode of no length cannot be spread over it: the same step.
    assert toy.itl_miss_probability(0.01, 0.05, 3240, 0.16, 0.0, extra_s=0.1) == 1.0
    assert toy.itl_miss_probability(0.01, 0.05, 1800, 0.16, 0.0, extra_s=0.1) == 0.0
    # A mixed step exactly at the target meets it: never a miss.
    assert toy.itl_miss_probability(0.01, toy.mixed_step_s, 1800, 0.16, 1.0) == 0.0
    # 1 prompt token/s is a load (1/3600 = 2.78e-4): past rho_max = (100 - 99.990001) /
    # 98.2421875 = 1.0178e-4 for a target of 10.0001 ms.
    assert toy.itl_miss_probability(0.01, 0.010001, 1.0, 0.0, 1.0) == 1.0
    # A load exactly at rho_max meets the target (the mixed ITL is the target itself): for
    # 62.5 ms, rho_max = (100 - 16) / 98.2421875 = 0.85503, the load of this rate (the
    # float whose quotient by 3,600 is that same float).
    rho_max = (100.0 - 16.0) / (100.0 - 1.7578125)
    at_rho_max = 3078.107355864811
    assert at_rho_max / 3600 == rho_max
    assert toy.itl_miss_probability(0.01, 0.0625, at_rho_max, 0.0, 1.0) == 0.0


def test_toy_ttft_with_a_single_slot(toy: GpuModel) -> None:
    # Room for 1 (or 0, read as 1) and one running: wait for its 1 token at T(1) = 100/s,
    # 0.01 s, then one decode step at batch 1, 0.01 s. Nothing to prefill.
    for slots in (1, 0):
        got = toy.predicted_ttft_s(
            0, load=1, queued_prefill_tokens=0, expected_output_tokens=1, slots=slots
        )
        assert got == pytest.approx(0.02)
