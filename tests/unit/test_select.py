"""Policies over plain snapshots: ranking, SLO filtering, exclusions, stale metrics, queue waits."""

from __future__ import annotations

import dataclasses

import pytest

from policies.costmodel import GpuModel
from policies.headroom import Headroom, mark_429
from policies.queueing import wait_decision
from policies.select import compile_policy, select
from policies.spec import (
    LLAMA_8B_H100,
    CostPolicySpec,
    GpuSpec,
    LatencyPolicySpec,
    PinnedPolicySpec,
    ThroughputProfileSpec,
    WeightedPolicySpec,
    default_slo_classes,
)
from policies.types import BackendSnapshot, RouteRequest, Slo

NOW = 1000.0
H100 = GpuModel.from_spec(GpuSpec(price_per_hour=2.95))
INTERACTIVE = Slo.from_spec(default_slo_classes()["interactive"])
BATCH = Slo.from_spec(default_slo_classes()["batch"])


def request(
    slo: Slo = INTERACTIVE, *, prompt: int = 800, out: int = 200, deadline: float | None = None
) -> RouteRequest:
    cls = "interactive" if slo is INTERACTIVE else "batch"
    return RouteRequest("llama-8b", prompt, 512, out, True, cls, slo, deadline, "t1")


def local(name: str = "gpu-a", **kw: object) -> BackendSnapshot:
    kw.setdefault("gpu", H100)
    return BackendSnapshot(name, "llama-3.1-8b", is_local=True, **kw)  # type: ignore[arg-type]


def groq(**kw: object) -> BackendSnapshot:
    base: dict[str, object] = {
        "price_in_per_token": 0.05e-6,
        "price_out_per_token": 0.08e-6,
        "ttft_s": 0.25,
        "ttft_spread_s": 0.05,
        "itl_s": 0.0013,
        "price_version": 4,
    }
    base.update(kw)
    return BackendSnapshot("groq", "llama-3.1-8b-instant", **base)  # type: ignore[arg-type]


def together(**kw: object) -> BackendSnapshot:
    base: dict[str, object] = {
        "price_in_per_token": 0.18e-6,
        "price_out_per_token": 0.18e-6,
        "ttft_s": 0.4,
        "itl_s": 0.005,
        "price_version": 4,
    }
    base.update(kw)
    return BackendSnapshot("together", "Meta-Llama-3.1-8B-Instruct-Turbo", **base)  # type: ignore[arg-type]


def names(decision: object) -> list[str]:
    return [c.backend for c in decision.candidates]  # type: ignore[attr-defined]


COST = compile_policy(CostPolicySpec())


def test_cost_fills_reserved_gpu_while_slo_holds() -> None:
    d = select(request(), [groq(), together(), local(inflight=7)], COST, NOW)
    assert names(d) == ["gpu-a", "groq", "together"]
    top = d.candidates[0]
    assert top.predicted_cost_usd == 0.0 and top.meets_slo and top.predicted_batch == 8
    assert d.policy == "cost" and d.price_version == 4
    assert d.reason.startswith("cost: gpu-a $0")
    assert "reserved, batch 8/b*256" in d.reason and "2 others" in d.reason


def test_cost_spills_to_cheapest_external_when_local_ttft_breaks_slo() -> None:
    # 25k prompt tokens queued for prefill: 1.25 s before our first token.
    busy = local(inflight=30, pending_prefill_tokens=25_000)
    d = select(request(), [busy, together(), groq()], COST, NOW)
    assert names(d) == ["groq", "together", "gpu-a"]
    assert not d.candidates[2].meets_slo
    assert d.candidates[2].reason.startswith("ttft 1.")


def test_cost_spills_when_predicted_itl_breaks_slo() -> None:
    slow = GpuModel.from_profile(
        ThroughputProfileSpec(decode_tokens_per_s={1: 40, 64: 640}, max_batch=64), 4.0
    )
    # Batch 41 on this GPU: 41 / (40 + 600 * 40 / 63) = 97 ms per token.
    gpu = BackendSnapshot("gpu-70b", "m", is_local=True, gpu=slow, inflight=40)
    d = select(request(), [gpu, together()], COST, NOW)
    assert names(d) == ["together", "gpu-70b"]
    assert d.candidates[1].reason.startswith("itl ")
    assert d.candidates[1].predicted_itl_s > 0.05


def test_cost_ranks_externals_by_price_and_uses_spread() -> None:
    jittery = groq(ttft_s=0.7, ttft_spread_s=0.4)  # 0.7 + 1 sigma > 1 s
    d = select(request(), [jittery, together()], COST, NOW)
    assert names(d) == ["together", "groq"]
    loose = compile_policy(CostPolicySpec(spread_sigmas=0.0))
    assert names(select(request(), [jittery, together()], loose, NOW)) == ["groq", "together"]


def test_cost_falls_back_to_fastest_when_nothing_meets_slo() -> None:
    a = groq(ttft_s=3.0)
    b = together(ttft_s=2.0)
    d = select(request(), [a, b], COST, NOW)
    assert names(d) == ["together", "groq"]
    assert not any(c.meets_slo for c in d.candidates)
    assert "none meets slo interactive" in d.reason and "fastest together" in d.reason


def test_latency_policy_ranks_by_predicted_total() -> None:
    d = select(request(), [together(), local(inflight=3), groq()], LatencyPolicySpec(), NOW)
    # groq: 0.25 + 199 * 1.3 ms = 0.51 s; gpu: ~0.05 + 199 * 4.8 ms = 1.0 s; together 1.4 s.
    assert names(d) == ["groq", "gpu-a", "together"]
    assert d.reason.startswith("latency: groq total 0.51s")


def test_weighted_policy_uses_the_supplied_random_value() -> None:
    pol = compile_policy(WeightedPolicySpec(weights={"groq": 1, "together": 3, "gpu-a": 0}))
    snaps = [groq(), together(), local()]
    assert names(select(request(), snaps, pol, NOW, rng_value=0.1)) == ["groq", "together", "gpu-a"]
    assert names(select(request(), snaps, pol, NOW, rng_value=0.3)) == ["together", "groq", "gpu-a"]
    assert names(select(request(), snaps, pol, NOW, rng_value=0.999)) == [
        "together",
        "groq",
        "gpu-a",
    ]
    firsts = [
        select(request(), snaps, pol, NOW, rng_value=i / 100).candidates[0].backend
        for i in range(100)
    ]
    assert firsts.count("groq") == 25 and firsts.count("together") == 75
    assert "weight 3 of 4" in select(request(), snaps, pol, NOW, rng_value=0.5).reason


def test_pinned_policy_keeps_its_order_and_drops_unlisted() -> None:
    pol = PinnedPolicySpec(order=["together", "gpu-a"])
    d = select(request(), [groq(), local(), together()], pol, NOW)
    assert names(d) == ["together", "gpu-a"]
    assert d.rejected == (("groq", "not in pinned order"),)
    assert d.reason.startswith("pinned: together (#1 in order)")


def test_unhealthy_cooling_and_capped_backends_are_rejected_with_reasons() -> None:
    cooling = groq(headroom=mark_429(Headroom(), 7.5, NOW))
    d = select(
        request(),
        [cooling, together(healthy=False), local(inflight=8, max_concurrency=8), local("gpu-b")],
        COST,
        NOW,
    )
    assert names(d) == ["gpu-b"]
    assert dict(d.rejected) == {
        "groq": "429 cool-down 7.5s",
        "together": "unhealthy",
        "gpu-a": "at max concurrency 8",
    }
    # After retry-after passes the provider is usable again.
    assert "groq" in names(select(request(), [cooling], COST, NOW + 7.5))


def test_near_limit_provider_goes_last_but_stays_a_fallback() -> None:
    low = Headroom(limit_tokens=100_000, remaining_tokens=3_000, observed_at=NOW)
    d = select(request(), [groq(headroom=low), together()], COST, NOW)
    assert names(d) == ["together", "groq"]
    assert d.candidates[1].reason == "near rate limit"
    only = select(request(), [groq(headroom=low)], COST, NOW)
    assert names(only) == ["groq"] and "near its rate limit" in only.reason


def test_no_usable_backend_says_why() -> None:
    d = select(request(), [groq(healthy=False)], COST, NOW)
    assert d.candidates == () and d.chosen is None
    assert d.reason == "no usable backend: groq unhealthy"


def test_stale_metrics_are_ignored_and_inflight_is_used() -> None:
    # The last scrape said 300 running (beyond max_batch), but it is stale: the gateway
    # knows of 2 in flight, so the worker is judged nearly idle.
    stale = local(running=300, queued=40, metrics_fresh=False, inflight=2)
    d = select(request(), [stale, groq()], COST, NOW)
    assert names(d)[0] == "gpu-a" and d.candidates[0].predicted_batch == 3
    fresh = dataclasses.replace(stale, metrics_fresh=True)
    d2 = select(request(), [fresh, groq()], COST, NOW)
    assert names(d2)[0] == "groq"
    assert d2.candidates[1].predicted_batch == 341
    # Past b* (here max_batch 256): the full price of the work it displaces, groq's.
    assert d2.candidates[1].predicted_cost_usd == pytest.approx(800 * 0.05e-6 + 200 * 0.08e-6)


def test_fresh_full_kv_cache_counts_as_a_full_batch() -> None:
    full = local(running=20, metrics_fresh=True, kv_usage=0.99, inflight=20)
    d = select(request(out=2000), [full, groq()], COST, NOW)
    gpu = next(c for c in d.candidates if c.backend == "gpu-a")
    assert gpu.predicted_batch == 257


def test_cost_balances_two_idle_local_gpus_by_latency() -> None:
    d = select(
        request(), [local("gpu-a", inflight=9), local("gpu-b", inflight=2), groq()], COST, NOW
    )
    assert names(d) == ["gpu-b", "gpu-a", "groq"]


def test_reason_is_ascii_and_short() -> None:
    long_name = "gpu-ü-" + "x" * 300
    d = select(request(), [local(long_name)], COST, NOW)
    assert d.reason.isascii() and len(d.reason) < 200


def test_batch_request_waits_for_a_capped_local_worker() -> None:
    capped = local(inflight=4, max_concurrency=4)
    d = select(request(BATCH, out=400), [capped, groq()], COST, NOW)
    assert names(d) == ["groq"]
    assert d.wait_for_local == pytest.approx(30.0)  # the batch class's max_queue_wait_s
    assert d.reason.startswith("wait up to 30.0s for local; then cost: groq")
    # An interactive request never waits.
    assert select(request(), [capped, groq()], COST, NOW).wait_for_local is None
    # The latency policy never waits either.
    assert select(request(BATCH), [capped, groq()], LatencyPolicySpec(), NOW).wait_for_local is None


def test_wait_is_bounded_by_the_deadline() -> None:
    capped = local(inflight=4, max_concurrency=4)
    req = request(BATCH, prompt=2000, out=400, deadline=NOW + 12.0)
    wait = wait_decision(req, [capped, groq()], NOW)
    # Service once admitted: 0.1 s prefill + 400 tokens at ITL(4).
    service = 0.1 + 400 * H100.itl_s(4)
    assert wait == pytest.approx(12.0 - service)
    assert wait_decision(dataclasses.replace(req, deadline=NOW + 1.0), [capped], NOW) is None


def test_no_wait_when_local_can_take_it_now_or_none_exists() -> None:
    assert wait_decision(request(BATCH), [local(), groq()], NOW) is None
    assert wait_decision(request(BATCH), [groq()], NOW) is None
    assert wait_decision(request(BATCH), [local(healthy=False), groq()], NOW) is None


def test_price_version_of_the_decision_is_the_book_version() -> None:
    d = select(request(), [local(price_version=2), groq(price_version=7)], COST, NOW)
    assert d.price_version == 7


def test_policy_specs_and_compiled_policies_rank_alike() -> None:
    snaps = [groq(), together(), local(inflight=40, pending_prefill_tokens=30_000)]
    assert names(select(request(), snaps, CostPolicySpec(), NOW)) == names(
        select(request(), snaps, COST, NOW)
    )
    with pytest.raises(TypeError):
        compile_policy("cost")  # type: ignore[arg-type]


def test_recent_prefill_load_raises_predicted_itl() -> None:
    # 40 in flight and 19k prompt tokens/s: 95% of the GPU prefills (capped there); the
    # running requests get a token per 102.4-ms mixed step 95% of the time: ITL(41) =
    # 41 / 6816 = 6.015 ms becomes 1 / (0.95 / 0.1024 + 0.05 / 0.006015) = 56.9 ms > 50 ms.
    hot = local(inflight=40, recent_prompt_tokens_per_s=19_000)
    d = select(request(), [hot, groq()], COST, NOW)
    assert names(d) == ["groq", "gpu-a"]
    assert d.candidates[1].predicted_itl_s == pytest.approx(0.0569, rel=2e-3)


def test_external_ttft_grows_with_the_prompt() -> None:
    slope = groq(ttft_s=0.2, ttft_spread_s=0.02, ttft_per_prompt_token_s=1 / 20_000)
    short = select(request(prompt=1000), [slope, together()], COST, NOW)
    assert names(short)[0] == "groq" and short.candidates[0].predicted_ttft_s == pytest.approx(0.25)
    long = select(request(prompt=18_000), [slope, together()], COST, NOW)
    assert names(long)[0] == "together"


GUARDED = compile_policy(CostPolicySpec(), default_slo_classes())


def test_batch_work_keeps_out_of_a_busy_worker_and_waits() -> None:
    # Local would meet the batch SLO (600 s) but not the interactive one it protects.
    busy = local(inflight=20, pending_prefill_tokens=22_000)
    d = select(request(BATCH, prompt=4000, out=400), [busy, groq()], GUARDED, NOW)
    assert names(d) == ["groq", "gpu-a"]
    assert d.candidates[1].reason.startswith("busy: ttft")
    assert d.wait_for_local == pytest.approx(30.0)
    # Without the guard (or when the worker is quiet) batch work goes local at once.
    assert names(select(request(BATCH), [busy, groq()], COST, NOW))[0] == "gpu-a"
    quiet = select(request(BATCH), [local(inflight=3), groq()], GUARDED, NOW)
    assert names(quiet)[0] == "gpu-a" and quiet.wait_for_local is None
    # The guard never applies to the protected class itself.
    assert GUARDED.protect_class == "interactive"  # type: ignore[union-attr]


TIGHT = Slo(max_ttft_s=1.0, max_itl_s=0.010)


def test_marginal_cost_rises_to_the_cheapest_external_price_near_b_star() -> None:
    # ITL 10 ms on the H100 profile: b* = 124 (see test_costmodel), band ceil(124/4) = 31,
    # so the cost is zero up to 93 requests already there and rises by 1/31 per request.
    req = RouteRequest("llama-8b", 800, 512, 200, True, "tight", TIGHT, None, "t1")
    groq_usd = 800 * 0.05e-6 + 200 * 0.08e-6  # 5.6e-5: the work a full GPU displaces
    calm = select(req, [local(inflight=90), groq(), together()], COST, NOW)
    assert calm.candidates[0].backend == "gpu-a" and calm.candidates[0].predicted_cost_usd == 0
    assert calm.candidates[0].slo_batch == 124
    busy = select(req, [local(inflight=110), groq(), together()], COST, NOW)
    gpu = busy.candidates[0]
    assert gpu.backend == "gpu-a" and gpu.predicted_batch == 111
    assert gpu.predicted_cost_usd == pytest.approx(17 / 31 * groq_usd)
    assert busy.alternative == "groq" and busy.alternative_cost_usd == pytest.approx(groq_usd)


def test_an_idle_on_demand_gpu_is_used_first() -> None:
    # It is billed while up: an idle one costs nothing more to use (no batch-1 average cost).
    on_demand = GpuModel.from_spec(GpuSpec(price_per_hour=2.95, mode="on_demand"))
    d = select(request(), [groq(), local(gpu=on_demand)], COST, NOW)
    assert names(d) == ["gpu-a", "groq"] and d.candidates[0].predicted_cost_usd == 0.0
    assert "on_demand, batch 1/b*256" in d.reason


def test_the_alternative_is_the_cheapest_external_that_meets_the_slo() -> None:
    slow_groq = groq(ttft_s=2.0)
    d = select(request(), [slow_groq, together(), local(inflight=3)], COST, NOW)
    assert d.alternative == "together"
    assert d.alternative_cost_usd == pytest.approx((800 + 200) * 0.18e-6)
    only_local = select(request(), [local(inflight=3)], COST, NOW)
    assert only_local.alternative is None and only_local.alternative_cost_usd is None


def test_without_an_external_candidate_the_gpu_prices_its_own_tokens_at_b_star() -> None:
    req = RouteRequest("llama-8b", 800, 512, 200, True, "tight", TIGHT, None, "t1")
    d = select(req, [local("gpu-a", inflight=110), local("gpu-b", inflight=20)], COST, NOW)
    assert names(d) == ["gpu-b", "gpu-a"]
    # Own cost at b* 124: 800 / 20k tokens/s = 0.04 s prefill + 200 / T(124) = 200 / 12486.92
    # = 0.016017 s decode; x $2.95/3600 per s = $4.5903e-5; 17/31 of it.
    busy = d.candidates[1]
    assert busy.predicted_cost_usd == pytest.approx(17 / 31 * 0.056017 * 2.95 / 3600, rel=1e-4)


def test_a_local_margin_scales_with_the_prediction_it_guards() -> None:
    # A relative spread of 0.98 (a 60k-token prompt took twice its prediction) on a short
    # prompt: predicted TTFT 800 / 20k + 1 / 215 = 0.04465 s; margin 2 x 0.98 x (0.04465 +
    # 0.05) = 0.1855 s: well within 1 s, so the idle GPU is used.
    gpu = local(ttft_rel_spread=0.98)
    d = select(request(), [groq(), gpu], COST, NOW)
    assert d.candidates[0].backend == "gpu-a", d.reason
    # The same spread on a 60k-token prompt: 3.0 s + 2 x 0.98 x 3.05 s: far past 1 s.
    long = select(request(prompt=60_000), [groq(), gpu], COST, NOW)
    assert long.candidates[0].backend == "groq"
    gpu_c = next(c for c in long.candidates if c.backend == "gpu-a")
    expected = 2 * 0.98 * (gpu_c.predicted_ttft_s + 0.05)
    assert f"+{expected:.2f}s" in gpu_c.reason


def test_an_itl_margin_covers_the_shortfall_it_learned_from() -> None:
    from policies.latency import ITL_REL_FLOOR_S, RelativeError

    # One request predicted at 5 ms per token took 15 ms: 10 / (5 + 2) = 1.428571 short.
    learned = RelativeError().update(0.005, 0.015, now=NOW, alpha=0.2, floor_s=ITL_REL_FLOOR_S)
    assert learned.spread(NOW) == pytest.approx(0.010 / 0.007)
    # Read back for this request's own predicted ITL p: margin 2 x 1.428571 x (p + 2 ms).
    # (Judged against the 50 ms TTFT floor the same sample read 10 / 55 = 0.18, and the
    # margin 2 x 0.18 x p covered a tenth of the shortfall: the ITL misses in the suite.)
    p = select(request(), [local()], COST, NOW).candidates[0].predicted_itl_s
    assert p is not None
    margin = 2 * (0.010 / 0.007) * (p + ITL_REL_FLOOR_S)
    slo = Slo(max_ttft_s=5.0, max_itl_s=p + margin / 2)
    req = RouteRequest("llama-8b", 800, 512, 200, True, "tight", slo, None, "t1")
    d = select(req, [groq(), local(itl_rel_spread=learned.spread(NOW))], COST, NOW)
    gpu = next(c for c in d.candidates if c.backend == "gpu-a")
    assert d.candidates[0].backend == "groq"
    assert f"+{margin * 1000:.1f}ms" in gpu.reason, gpu.reason
    # With the margin under the target the GPU serves.
    roomy = dataclasses.replace(slo, max_itl_s=p + margin * 1.01)
    req2 = dataclasses.replace(req, slo=roomy)
    d2 = select(req2, [groq(), local(itl_rel_spread=learned.spread(NOW))], COST, NOW)
    assert d2.candidates[0].backend == "gpu-a", d2.reason


def test_a_kv_cap_caps_b_star_and_the_batch_predicted() -> None:
    # A cache of 10,000 tokens holds 10 sequences of 800 prompt + 200 output tokens.
    small = GpuModel.from_profile(
        ThroughputProfileSpec(
            decode_tokens_per_s=dict(LLAMA_8B_H100.curve()),
            prefill_tokens_per_s=20_000,
            kv_capacity_tokens=10_000,
        ),
        2.95,
    )
    d = select(request(), [local(gpu=small, inflight=3), groq()], COST, NOW)
    top = d.candidates[0]
    assert top.backend == "gpu-a" and top.slo_batch == 10 and top.predicted_batch == 4
    # Full: the next request waits for a slot, and its TTFT says so.
    full = select(request(), [local(gpu=small, inflight=12)], COST, NOW).candidates[0]
    roomy = select(request(), [local(inflight=12)], COST, NOW).candidates[0]
    assert full.predicted_ttft_s > roomy.predicted_ttft_s + 0.1
