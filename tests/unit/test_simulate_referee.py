"""The simulator as referee: measured physics, the hindsight bound, scenario files, price changes."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest

from gateway.config import ConfigError
from loadtest.simulate.backends import ProviderSpec
from loadtest.simulate.bound import b_star, gpu_seconds, hindsight_bound
from loadtest.simulate.bound_local import decode_token_cost
from loadtest.simulate.engine import Engine
from loadtest.simulate.physics import GpuPhysics
from loadtest.simulate.results import meets_slo, miss_causes
from loadtest.simulate.routers import AlwaysLocalUntilError, CheapestExternal, SelectPolicy
from loadtest.simulate.scenario import (
    LocalSpec,
    PriceChange,
    Scenario,
    default_scenario,
    physics_of,
)
from loadtest.simulate.scenario_file import load_scenario
from loadtest.simulate.suite import SCENARIO_DIR, Outcome, explain, summary_table
from loadtest.simulate.traces import Trace, TraceRequest, steady
from policies.costmodel import GpuModel
from policies.select import compile_policy
from policies.spec import CostPolicySpec, ThroughputProfileSpec
from policies.types import BackendSnapshot, RouteRequest, Slo

INTERACTIVE = Slo(max_ttft_s=1.0, max_itl_s=0.05)


def test_physics_interpolates_batch_context_and_prompt_length() -> None:
    ph = GpuPhysics.from_tables(
        {1024: {1: 196, 8: 1435, 32: 5023}, 4096: {1: 190, 8: 1274, 32: 3472}},
        {512: 41_900, 2048: 46_500, 8192: 39_900},
    )
    # Between batch points: linear; below the first point: proportional; past the last: flat.
    assert ph.decode_tokens_per_s(20, 1024) == pytest.approx(1435 + (5023 - 1435) * 12 / 24)
    assert ph.decode_tokens_per_s(64, 1024) == 5023
    # Context 2048 is halfway between 1024 and 4096 in log terms.
    assert ph.decode_tokens_per_s(8, 2048) == pytest.approx((1435 + 1274) / 2)
    assert ph.decode_tokens_per_s(8, 100) == 1435 and ph.decode_tokens_per_s(8, 9000) == 1274
    assert ph.prefill_tokens_per_s(1280) == pytest.approx((41_900 + 46_500) / 2)
    assert ph.prefill_tokens_per_s(100) == 41_900
    # A mixed step: 8 decodes + a 2040-token chunk; compute-bound at 2048 / 46,500 s.
    step, chunk = ph.mixed_step(8, 1024, 2048)
    assert chunk == 2040 and step == pytest.approx(2048 / 46_500)
    # b*: the largest batch whose decode step meets the ITL bound.
    # T is flat at 5023 past 32: 251 / 5023 = 49.97 ms, 252 / 5023 = 50.2 ms.
    assert b_star(ph, 0.05, 1024) == 251
    assert b_star(ph, 0.005, 1024) == 0  # even batch 1 takes 5.1 ms
    with pytest.raises(ValueError, match="step_token_budget"):
        GpuPhysics.from_tables({1: {1: 1.0}}, {1: 1.0}, max_batch=4096)


def _one_gpu(duration: float, requests: list[TraceRequest]) -> tuple[Scenario, Trace]:
    ph = GpuPhysics.from_tables({100: {1: 100.0, 10: 1000.0}}, {1: 1000.0}, max_batch=10)
    belief = GpuModel.from_profile(
        ThroughputProfileSpec(decode_tokens_per_s={1: 100, 10: 1000}, max_batch=10), 3.6
    )
    sc = Scenario(
        (LocalSpec("g", belief, ph),),
        (ProviderSpec("p", "m", 100.0, 100.0, 0.1, 0.0, 1e9, 0.001, 0.0),),
        MappingProxyType({"interactive": INTERACTIVE}),
        prefill_noise_sigma=0.0,
    )
    return sc, Trace("t", duration, tuple(requests))


def test_misses_are_told_apart_by_the_bound_broken_and_where() -> None:
    # One GPU: batch-1 decode 10 ms a token, prefill 1,000 tokens/s (a step of 2,048 tokens
    # takes 2.048 s). A (t = 0, 10-token prompt, 21 tokens out) has its first token at
    # 0.01 s and ~9 more by 0.1 s; then B's 1,500-token prompt stalls it for ~1.5 s (one
    # token of A per 2.048-s step); its last ~11 tokens take 0.11 s: mean ITL ~(0.09 + 1.5 +
    # 0.11) / 20 = 85 ms > 50 ms. B (one token out) gets it ~1.5 s after arriving: TTFT > 1 s.
    sc, trace = _one_gpu(
        10.0,
        [
            TraceRequest(0.0, 10, 21, 64, "interactive"),
            TraceRequest(0.1, 1500, 1, 64, "interactive"),
        ],
    )
    engine = Engine(sc, trace, AlwaysLocalUntilError(), 1)
    res = engine.run()
    assert res.misses == {"interactive": {"local itl": 1, "local ttft": 1}}
    a, b = engine.reqs
    assert miss_causes(a, INTERACTIVE, True) == ("local itl",)
    assert miss_causes(b, INTERACTIVE, False) == ("external ttft",)
    # Alone, A meets both bounds: no cause, and meets_slo agrees.
    alone = Engine(sc, Trace("a", 10.0, trace.requests[:1]), AlwaysLocalUntilError(), 1)
    assert alone.run().misses == {}
    assert miss_causes(alone.reqs[0], INTERACTIVE, True) == ()
    assert meets_slo(alone.reqs[0], INTERACTIVE) and not meets_slo(a, INTERACTIVE)
    # A request that got no answer is "failed", whatever its times.
    a.failed = True
    assert miss_causes(a, INTERACTIVE, True) == ("failed",)


def test_hindsight_bound_by_hand() -> None:
    # One GPU at $3.60/h ($0.001 per second) held for 1 s; the provider charges $1e-4 a token.
    # A: 500 prompt tokens (0.5 GPU-s of prefill), $0.0501 outside: density 0.1002 $/GPU-s.
    # B: 800 prompt tokens (0.8 GPU-s), $0.0801: density 0.1001. C: 1500 prompt tokens take
    # 1.5 s to prefill, past the 1-s TTFT: it cannot be local at all.
    reqs = [
        TraceRequest(0.0, 500, 1, 1, "interactive"),
        TraceRequest(0.0, 800, 1, 1, "interactive"),
        TraceRequest(0.0, 1500, 1, 1, "interactive"),
    ]
    sc, trace = _one_gpu(1.0, reqs)
    b = hindsight_bound(sc, trace, seed=1)
    # A fits whole (0.5 s), B gets the other 0.5 of its 0.8 s: 0.375 of it goes outside.
    assert b.gpu_usd == pytest.approx(0.001)
    assert b.external_usd == pytest.approx(0.0801 * 0.375 + 0.1501)
    assert b.total_usd == pytest.approx(0.001 + 0.0801 * 0.375 + 0.1501)
    assert b.never_local == 1
    assert b.local_token_share == pytest.approx((501 + 801 * 0.625) / (501 + 801 + 1501))
    # Without GPUs the bound is the cheapest provider for everything.
    nogpu = hindsight_bound(sc.without_gpus(), trace, seed=1)
    assert nogpu.total_usd == pytest.approx(0.0501 + 0.0801 + 0.1501) and nogpu.gpu_usd == 0


def test_bound_lets_delay_tolerant_work_keep_the_gpu_past_the_end_at_a_price() -> None:
    # A batch request (may wait, 600-s total) of 2 GPU-s arriving in a 1-s trace: holding
    # the GPU 2 s longer ($0.002) beats $0.2001 outside, and the bound says so.
    batch = Slo(max_total_s=600.0, max_queue_wait_s=30.0)
    sc, trace = _one_gpu(1.0, [TraceRequest(0.0, 2000, 1, 1, "batch")])
    sc = dataclasses.replace(sc, slo_classes=MappingProxyType({"batch": batch}))
    b = hindsight_bound(sc, trace, seed=1)
    assert b.external_usd == 0.0 and b.local_token_share == 1.0
    # Held time is exact: the 2 GPU-s of prefill keep the GPU 1 s past the trace. (Before
    # 2026-12-06 it was on a 30-s grid rounded in the bound's favour: $0.001.)
    assert b.gpu_usd == pytest.approx(0.002)
    # The simulated GPU is held that long too (its prefill runs at the noisy speed, so a
    # little longer or shorter), and the run costs at least the bound.
    ran = Engine(sc, trace, AlwaysLocalUntilError("all-local"), 1).run()
    assert ran.external_cost_usd == 0.0 and ran.slo_attainment["batch"] == 1.0
    assert ran.total_cost_usd >= b.total_usd - 1e-12


def test_price_change_applies_from_its_time_on() -> None:
    sc, _ = _one_gpu(1.0, [])
    sc = dataclasses.replace(sc, locals=(), price_changes=(PriceChange(10.0, "p", 1.0, 1.0),))
    reqs = tuple(TraceRequest(t, 100, 10, 10, "interactive") for t in (5.0, 15.0))
    r = Engine(sc, Trace("t", 20.0, reqs), CheapestExternal(), 1).run()
    assert r.external_cost_usd == pytest.approx(110 * 100e-6 + 110 * 1e-6)
    assert r.gpu_cost_usd == 0.0


def test_a_wrong_belief_in_the_router_shows_up_in_the_result() -> None:
    """The simulated GPU runs on its physics; the router on its profile. A router that
    believes the GPU twice as fast as it is loses SLO the right belief keeps (measured:
    98.7% against 99.4% interactive; since the ITL is predicted at the tail of the prefill
    load from chunked-prefill steps, 2026-12-04, 99.58% against 100%: the tail margin now
    absorbs most of a 2x belief error, and it shows as lost SLO and a GPU used harder). With an error margin that never decayed
    it also learned a wide margin and paid providers >10% more; the gateway's margin now
    fades while a GPU is idle, so the wrong belief shows up as lost SLO, not as cost.
    With the population SLO budget (2026-12-05) both spend misses down towards the budget:
    measured 99.30% (wrong) against 99.72% (right), the GPUs serving 89.5% of the tokens
    against 84.5%: the wrong belief uses the GPUs harder and loses SLO the right one keeps."""
    sc = default_scenario()
    nim = {1: 215, 5: 1077, 25: 4679, 50: 8018, 100: 12215, 200: 13348}
    half = ThroughputProfileSpec(
        decode_tokens_per_s={b: t / 2 for b, t in nim.items()}, prefill_tokens_per_s=10_000
    )
    truth = physics_of(half)
    right = GpuModel.from_profile(half, 2.95)
    wrong = GpuModel.from_profile(
        ThroughputProfileSpec(decode_tokens_per_s=nim, prefill_tokens_per_s=20_000), 2.95
    )
    trace = steady(3, 240.0, concurrency=12.0)
    policy = SelectPolicy("cost", compile_policy(CostPolicySpec(), sc.slo_classes))

    def run(belief: GpuModel) -> tuple[float, float]:
        world = dataclasses.replace(
            sc, locals=tuple(LocalSpec(g.name, belief, truth) for g in sc.locals)
        )
        r = Engine(world, trace, policy, 3).run()
        return r.slo_attainment["interactive"], r.token_share["gpu-a"] + r.token_share["gpu-b"]

    att_right, share_right = run(right)
    att_wrong, share_wrong = run(wrong)
    assert att_right >= 0.99 and att_right - att_wrong >= 0.003
    assert share_wrong - share_right >= 0.04


def test_scenario_file_errors_name_the_field(tmp_path: Path) -> None:
    good = (SCENARIO_DIR / "steady-8b.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.replace("  trace: {shape: steady", "  trace: {shape: wavy"))
    with pytest.raises(ConfigError, match=r"simulate\.trace\.shape") as e:
        load_scenario(bad)
    assert "line" in str(e.value)
    bad.write_text(good.replace("    h100-b: *h100phys", "    h100-c: *h100phys"))
    with pytest.raises(ConfigError, match="h100-c"):
        load_scenario(bad)
    bad.write_text(good.replace("model: llama-3.1-8b\n  seed", "model: llama-9b\n  seed"))
    with pytest.raises(ConfigError, match="llama-9b"):
        load_scenario(bad)


def test_scenario_file_belief_and_physics_are_separate() -> None:
    loaded = load_scenario(SCENARIO_DIR / "long-context-8b.yaml")
    g = loaded.scenario.locals[0]
    # The router's belief: the context-1024 table. The physics: three contexts.
    assert g.model.throughput(128) == pytest.approx(12877)
    assert [c for c, _ in g.physics.decode] == [256, 1024, 4096]
    assert g.physics.decode_tokens_per_s(128, 4096) == pytest.approx(6036)
    prompts = [r.prompt_tokens for r in loaded.trace(60.0).requests if r.slo_class == "interactive"]
    assert 3000 < sorted(prompts)[len(prompts) // 2] < 5500
    assert math.isclose(loaded.scenario.gpu_cost_per_hour(), 7.0)


def test_bound_caps_a_tpm_limited_provider_per_minute() -> None:
    # No GPUs; provider p at $1e-4 a token admits 1000 bucket tokens a minute; q costs $2e-4.
    # Five interactive requests of 1000 tokens (900 prompt + 100 output, max_tokens 100) at
    # t = 0..4 s. Each must be dispatched within 0.9 s of arriving (p answers in 0.1 s, the
    # TTFT bound is 1 s), so all five fall in the first 10-s cell of the bucket's grid, where
    # it admits at most its 1000 tokens plus 10 s of refill (166.7): 1.167 at p, 3.833 at q,
    # $0.8833. (Before 2026-12-06, with 60-s cells: $0.80; before 2026-12-05 the bound capped
    # the whole trace at a full bucket, the trace's refill and a minute of slack: $0.70.) The
    # simulator's bucket admits only the first (the refill by t = 4.9 s is 82 tokens): a
    # router that falls over to q pays $0.90.
    sc, p, q = _two_providers()
    trace = Trace("t", 60.0, tuple(TraceRequest(i, 900, 100, 100, "interactive") for i in range(5)))
    b = hindsight_bound(sc, trace, seed=1)
    assert b.total_usd == pytest.approx(0.1 * (1 + 1 / 6) + 0.2 * (4 - 1 / 6))
    ran = Engine(sc, trace, CheapestExternal(), 1).run()
    assert ran.total_cost_usd == pytest.approx(0.90) and ran.slo_attainment["interactive"] == 1.0
    unlimited = dataclasses.replace(sc, providers=(dataclasses.replace(p, tpm_limit=None), q))
    assert hindsight_bound(unlimited, trace, seed=1).total_usd == pytest.approx(0.5)


def test_bound_follows_the_bucket_level_across_minutes() -> None:
    # The same providers; 36 requests of 1000 bucket tokens, one every 5 s from t = 60 to 235,
    # each dispatched within 0.9 s of arriving. The bucket is full (1000) at t = 60 and refills
    # 1000 a minute: over the three minutes up to t = 240 it admits at most 1000 + 3000, 4 at
    # p and 32 at q, $6.80. Caps on single minutes and on stretches from t = 0 (the bound
    # before 2026-12-06) allowed 5 at p: $6.70. The simulator's router that falls over to q
    # gets 3 at p (t = 60, 120, 180; at 235 the bucket holds 917): $6.90.
    sc, _, _ = _two_providers()
    reqs = tuple(TraceRequest(60.0 + 5 * i, 900, 100, 100, "interactive") for i in range(36))
    trace = Trace("t", 240.0, reqs)
    b = hindsight_bound(sc, trace, seed=1)
    assert b.total_usd == pytest.approx(4 * 0.1 + 32 * 0.2)
    ran = Engine(sc, trace, CheapestExternal(), 1).run()
    assert ran.slo_attainment["interactive"] == 1.0
    assert ran.total_cost_usd == pytest.approx(3 * 0.1 + 33 * 0.2)


def _two_providers() -> tuple[Scenario, ProviderSpec, ProviderSpec]:
    """No GPUs; p at $1e-4 a token with a 1000-token-a-minute bucket, q at $2e-4, both 0.1 s."""
    sc, _ = _one_gpu(60.0, [])
    p = ProviderSpec("p", "m", 100.0, 100.0, 0.1, 0.0, 1e9, 0.001, 0.0, tpm_limit=1000)
    q = ProviderSpec("q", "m", 200.0, 200.0, 0.1, 0.0, 1e9, 0.001, 0.0)
    return dataclasses.replace(sc, locals=(), providers=(p, q)), p, q


def test_bound_on_a_gpu_whose_slo_batch_is_small() -> None:
    # A 70B-like GPU: decode 50 tokens/s at batch 1 and 200 at batch 8 (linear between, so
    # T(b) = (150 b + 200) / 7), prefill 10,000 tokens/s, at most 8 sequences; ITL bound 30 ms.
    # A pure decode step at batch b lasts b / T(b): 20 ms at 1, 28 ms at 2, 32.3 ms at 3, so
    # b* = 2. Every batch's point (step s, GPU-s per token c = 1 / T) lies on the line
    # c = 0.75 x (7/150 - s); a prefill step (204.8 ms, 0.1 ms a token) lies above it. A
    # request meeting 30 ms on average therefore takes at least c(30 ms) = 12.5 ms of GPU per
    # decode token (80 tokens/s), not the 0.1 ms of a token riding a prefill step that the
    # bound charged before 2026-12-05.
    ph = GpuPhysics.from_tables({1024: {1: 50, 8: 200}}, {1: 10_000}, max_batch=8)
    slo = Slo(max_ttft_s=1.0, max_itl_s=0.03)
    assert b_star(ph, 0.03, 1024) == 2
    assert decode_token_cost(ph, 0.03) == pytest.approx(0.0125)
    assert decode_token_cost(ph, None) == pytest.approx(1e-4)
    assert decode_token_cost(ph, 0.015) == math.inf  # even batch 1 takes 20 ms
    # 100 prompt tokens (0.01 s) and 101 output tokens: 0.01 + 100 x 0.0125 = 1.26 GPU-s.
    req = TraceRequest(0.0, 100, 101, 101, "interactive")
    assert gpu_seconds(ph, req, slo, 1.0) == pytest.approx(1.26)
    # One such GPU at $3.60/h for a 20-s trace; 20 such requests at t = 0, 0.5, ..., 9.5 s
    # (windows of 1 + 100 x 0.03 = 4 s, all inside the trace), $0.0201 each outside. They
    # need 25.2 GPU-s of the 20 held: 5.2 / 1.26 = 4.127 requests go outside.
    belief = GpuModel.from_profile(
        ThroughputProfileSpec(decode_tokens_per_s={1: 50, 8: 200}, max_batch=8), 3.6
    )
    sc = Scenario(
        (LocalSpec("g", belief, ph),),
        (ProviderSpec("p", "m", 100.0, 100.0, 0.1, 0.0, 1e9, 0.001, 0.0),),
        MappingProxyType({"interactive": slo}),
        prefill_noise_sigma=0.0,
    )
    trace = Trace(
        "t", 20.0, tuple(TraceRequest(i * 0.5, 100, 101, 101, "interactive") for i in range(20))
    )
    b = hindsight_bound(sc, trace, seed=1)
    assert b.gpu_usd == pytest.approx(0.02)
    assert b.external_usd == pytest.approx(5.2 / 1.26 * 0.0201)
    assert b.local_token_share == pytest.approx(1 - 5.2 / 1.26 / 20)
    # Every policy run here that meets the SLO costs at least the bound.
    for policy in (AlwaysLocalUntilError("all-local"), CheapestExternal()):
        r = Engine(sc, trace, policy, 1).run()
        if r.slo_attainment["interactive"] >= 0.99:
            assert r.total_cost_usd >= b.total_usd - 1e-12, policy.name


def test_bound_lets_one_percent_miss_for_free_and_skips_providers_too_slow() -> None:
    # No GPUs. p ($1/M) answers in 0.1 s + 1 ms per prompt token; q ($2/M) in 0.1 s. 199
    # requests of 100 prompt tokens and 1 output ($0.000101 at p) and one of 2000 prompt
    # tokens, which p answers in 2.1 s, past the 1-s TTFT bound: only q meets it ($0.004002;
    # at p's price it would be $0.002001). At a 99% target 2 of 200 may miss, and a miss may
    # cost nothing (the router drops it): the bound is the other 198 at p, $0.019998.
    sc, _ = _one_gpu(60.0, [])
    p = ProviderSpec("p", "m", 1.0, 1.0, 0.1, 0.0, 1000.0, 0.001, 0.0)
    q = ProviderSpec("q", "m", 2.0, 2.0, 0.1, 0.0, 1e9, 0.001, 0.0)
    sc = dataclasses.replace(sc, locals=(), providers=(p, q))
    reqs = [TraceRequest(i * 0.1, 100, 1, 1, "interactive") for i in range(199)]
    reqs.append(TraceRequest(30.0, 2000, 1, 1, "interactive"))
    trace = Trace("t", 60.0, tuple(sorted(reqs, key=lambda r: r.t)))
    b = hindsight_bound(sc, trace, seed=1)
    assert b.total_usd == pytest.approx(198 * 101e-6)
    ran = Engine(sc, trace, CheapestExternal(), 1).run()
    assert ran.total_cost_usd >= b.total_usd


def test_the_referee_records_why_an_idle_gpu_was_passed_over() -> None:
    sc = default_scenario()
    policy = SelectPolicy("cost", compile_policy(CostPolicySpec(), sc.slo_classes))
    gpu = sc.locals[0].model
    req = RouteRequest("m", 500, 200, 200, True, "interactive", INTERACTIVE)
    # An idle GPU whose learned ITL error spread is 30 ms: 2 sigma = 60 ms > the 50 ms target.
    local = BackendSnapshot("g", "m", is_local=True, itl_spread_s=0.03, gpu=gpu)
    ext = BackendSnapshot("p", "m", price_in_per_token=5e-8, price_out_per_token=8e-8)
    choice = policy.choose(req, [local, ext], 0.0)
    assert choice.order[0] == "p"
    ((why, n),) = policy.idle_passed.items()
    assert n == 1 and why.startswith("g: itl ") and "+60ms > 50ms" in why
    # With no spread the idle GPU wins (its marginal cost is 0) and nothing is recorded.
    calm = BackendSnapshot("g", "m", is_local=True, gpu=gpu)
    assert policy.choose(req, [calm, ext], 0.0).order[0] == "g"
    assert sum(policy.idle_passed.values()) == 1 and policy.routed == 2


def test_a_scenario_can_name_an_existing_policy_file(tmp_path: Path) -> None:
    example = SCENARIO_DIR.parent.parent / "policies" / "examples" / "vllm-groq-together.yaml"
    (tmp_path / "s.yaml").write_text(
        f"name: mine\npolicy_file: {example}\n"
        "simulate:\n  model: llama-3.1-8b\n  trace: {shape: steady, concurrency: 4}\n"
    )
    loaded = load_scenario(tmp_path / "s.yaml")
    by = {g.name: g for g in loaded.scenario.locals}
    assert by["h100-b"].model.mode == "on_demand" and by["h100-a"].max_concurrency == 128
    # No physics given: the simulated GPU runs the figures of the router's own profile.
    assert by["h100-a"].physics.decode_tokens_per_s(200, 1024) == 13348
    assert {p.name for p in loaded.scenario.providers} == {"groq", "together"}
    assert len(loaded.trace(30.0).requests) > 0


def test_decode_cost_mixes_steps_to_meet_the_itl_bound() -> None:
    # A mixed step lasts max(b / T(b), budget / prefill speed): with its chunk charged at the
    # prefill speed, its b decode tokens take only b / prefill speed. NIM 8B H100: T is
    # 13,348/s from batch 200 on, prefill 20,000/s, so a token riding a prefill step costs
    # 1/20,000 GPU-s, but that step lasts 2048 / 20,000 = 102.4 ms, twice a 50-ms ITL bound.
    # The cheapest mix meeting 50 ms on average: batch-200 steps (200 / 13,348 = 14.98 ms,
    # 1/13,348 a token) and prefill steps, a share w = (50 - 14.98) / (102.4 - 14.98) of them.
    ph = physics_of(
        ThroughputProfileSpec(
            decode_tokens_per_s={1: 215, 5: 1077, 25: 4679, 50: 8018, 100: 12215, 200: 13348},
            prefill_tokens_per_s=20_000,
        )
    )
    s200 = 200 / 13_348
    w = (0.05 - s200) / (2048 / 20_000 - s200)
    per_token = (1 - w) / 13_348 + w / 20_000
    assert decode_token_cost(ph, 0.05) == pytest.approx(per_token)
    # Without an ITL bound (batch work) every token may ride a prefill step.
    assert decode_token_cost(ph, None) == pytest.approx(1 / 20_000)
    # One request of 1,000 prompt tokens (noise 1: 0.05 s) and 201 output tokens.
    req = TraceRequest(0.0, 1000, 201, 256, "interactive")
    assert gpu_seconds(ph, req, INTERACTIVE, 1.0) == pytest.approx(0.05 + 200 * per_token)


def test_the_simulated_gpu_runs_on_the_measured_figures_not_the_routers_code() -> None:
    """Checked 2026-12-05 (issue 13): the worker's physics reads the profile's figures only.
    Its module imports nothing of the router's, and the shipped 70B pair's physics gives the
    measured decode step and the mixed-step roofline by hand."""
    import ast

    import loadtest.simulate.backends as backends_mod
    import loadtest.simulate.physics as physics_mod

    for mod in (physics_mod, backends_mod):
        tree = ast.parse(Path(str(mod.__file__)).read_text())
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        ]
        assert not any(
            x.startswith(("policies.costmodel", "policies.predict", "policies.select"))
            for x in names
        ), (mod.__name__, names)
    loaded = load_scenario(SCENARIO_DIR / "70b-vs-groq.yaml")
    ph = loaded.scenario.locals[0].physics
    # Measured at context 1024: batch 64 decodes 2,817 tokens/s, so a step takes 64 / 2817 s.
    assert ph.decode_step_s(64, 1024) == pytest.approx(64 / 2817)
    # A mixed step with 64 running: 2048 tokens at the ~10,400 tokens/s prefill (the 512-2048
    # token figure) = 0.19692 s, longer than the decode step: compute-bound.
    step, chunk = ph.mixed_step(64, 1024, 1024)
    assert chunk == 2048 - 64 and step == pytest.approx(2048 / ph.prefill_tokens_per_s(1024))
    assert ph.prefill_tokens_per_s(1024) == pytest.approx(10_400, rel=0.01)


def test_the_bound_solver_writes_nothing_to_stdout() -> None:
    # HiGHS prints a banner from C++ when its Python wrapper turns on callbacks; the table and
    # any JSON `neogate simulate` writes to stdout must not carry it. A fresh process: the
    # banner would come once per process.
    code = (
        "from tests.unit.test_simulate_referee import _one_gpu\n"
        "from loadtest.simulate.bound import hindsight_bound\n"
        "from loadtest.simulate.traces import TraceRequest\n"
        "sc, trace = _one_gpu(1.0, [TraceRequest(0.0, 500, 1, 1, 'interactive')])\n"
        "assert hindsight_bound(sc, trace, seed=1).total_usd > 0\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout == "" and out.stderr == ""


def test_no_bound_where_no_routing_can_meet_the_slo_target() -> None:
    # Only provider p (1000 bucket tokens a minute) and no GPU; ten requests of 1000 bucket
    # tokens in the first 5 s, each to be dispatched within 0.9 s, and a class too small to
    # miss one (1% of 10 is 0): p admits 1.17 of them at most, so no routing meets the SLO
    # target. The bound says so instead of giving a number, and the suite shows no bound.
    sc, p, _ = _two_providers()
    sc = dataclasses.replace(sc, providers=(p,))
    trace = Trace(
        "t", 60.0, tuple(TraceRequest(i / 2, 900, 100, 100, "interactive") for i in range(10))
    )
    b = hindsight_bound(sc, trace, seed=1)
    assert not b.feasible and math.isinf(b.cost_per_million_tokens)
    runs = [
        Engine(sc, trace, policy, 1).run()
        for policy in (
            CheapestExternal("cost"),
            CheapestExternal("no-gpus"),
            AlwaysLocalUntilError("all-local"),
            CheapestExternal("spill@8"),
            CheapestExternal("least-loaded"),
            CheapestExternal("round-robin"),
        )
    ]
    assert all(r.slo_attainment["interactive"] < 0.99 for r in runs)
    o = Outcome("t", "", trace, sc, runs, [], b)
    o.notes = explain(o)
    assert math.isinf(o.bound_gap) and not o.within_bound and not o.gpus_lose
    assert any("no routing on this fleet can meet 99%" in n for n in o.notes)
    assert not any("not compared" in n for n in o.notes)
    row = summary_table([o]).splitlines()[-1]
    assert "| none at SLO | - |" in row and "| - | NO (no policy at SLO) |" in row
    verdict = o.as_json()["verdict"]
    bound = o.as_json()["bound"]
    assert verdict["cost_above_bound"] is None and bound["cost_per_million_tokens"] is None
    assert bound["feasible"] is False


def test_without_the_solver_the_gateway_serves_and_simulate_says_what_to_install() -> None:
    # HiGHS comes with `neogate[simulate]`; a gateway installed without it must still parse
    # every command (the CLI builds all parsers), and the referee must name the extra.
    code = (
        "import sys\n"
        "sys.modules['highspy'] = None\n"
        "from gateway.cli import main\n"
        "try:\n"
        "    main(['serve', '--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
        "sys.exit(main(['simulate', '--scenario', 'loadtest/scenarios/steady-8b.yaml',"
        " '--short', '5']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 2, out.stderr
    assert "pip install 'neogate[simulate]'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "where", [["--trace", "steady"], ["--scenario", "loadtest/scenarios/steady-8b.yaml"]]
)
def test_report_without_matplotlib_says_what_to_install_before_simulating(
    where: list[str], tmp_path: Path
) -> None:
    # matplotlib comes with `neogate[plots]`; without it `--report` used to run the whole
    # simulation, print its tables and then end in a bare ImportError.
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None\n"
        "from gateway.cli import main\n"
        f"sys.exit(main(['simulate', *{where!r}, '--report', {str(tmp_path / 'r')!r}]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 2, out.stderr
    assert "pip install 'neogate[plots]'" in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout == ""  # refused before any simulation ran
    assert not (tmp_path / "r").exists()
