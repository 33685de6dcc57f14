"""The population SLO budget: the ITL miss probability, the budget's bookkeeping, and how a
local worker takes a request the single-request tail would spill. Numbers worked by hand."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest

from gateway.profiles import load_profile
from policies.budget import MISS_SHARE, WINDOW_TAU_S, MissBudget
from policies.costmodel import TAIL_P, GpuModel
from policies.predict import STALL_FREE_MISSES, STALL_STEP_RATIO, prefill_burst_s, stall_misses
from policies.select import compile_policy, select
from policies.spec import CostPolicySpec, GpuSpec
from policies.types import BackendSnapshot, Candidate, RouteRequest, Slo


@pytest.fixture
def h100() -> GpuModel:
    # NIM profile: prefill 20,000 tokens/s, so a 2048-token mixed step lasts 102.4 ms.
    return GpuModel.from_spec(GpuSpec(price_per_hour=2.95))


def test_itl_miss_probability_worked(h100: GpuModel) -> None:
    # Decode step 5 ms, target 50 ms. A request misses once its share of mixed steps passes
    # rho_max = (1/0.005 - 1/0.05) / (1/0.005 - 1/0.1024) = 180 / 190.234 = 0.94620.
    # 10,000 prompt tokens/s on 20,000/s: mean share 0.5; prompts of 0.16 s over a 1-s
    # decode: sd sqrt(0.5 x 0.16 / 1) = 0.28284. z = 0.44620 / 0.28284 = 1.57756, and
    # 1 - Phi(1.57756) = 0.05733.
    assert h100.itl_miss_probability(0.005, 0.05, 10_000, 0.16, 1.0) == pytest.approx(
        0.05733, abs=5e-5
    )
    # A 100-s decode averages the bursts out: sd 0.028284, z 15.8: no miss.
    assert h100.itl_miss_probability(0.005, 0.05, 10_000, 0.16, 100.0) < 1e-12
    # The decode step alone misses: certain. A mixed step (102.4 ms) within the target:
    # never. No prompts arriving: never.
    assert h100.itl_miss_probability(0.06, 0.05, 10_000, 0.16, 1.0) == 1.0
    assert h100.itl_miss_probability(0.005, 0.2, 10_000, 0.16, 1.0) == 0.0
    assert h100.itl_miss_probability(0.005, 0.05, 0.0, 0.16, 1.0) == 0.0
    # 0.2 s of prefill known to fall in that 1-s decode: rho_max 0.94620 - 0.2 = 0.74620,
    # z = 0.24620 / 0.28284 = 0.87046, 1 - Phi(0.87046) = 0.19203.
    assert h100.itl_miss_probability(0.005, 0.05, 10_000, 0.16, 1.0, 0.2) == pytest.approx(
        0.19203, abs=5e-5
    )
    # With no other prompts arriving, only the known prefill counts: 1 s of it in a 1-s
    # decode leaves rho_max below 0 (a miss); 0.5 s does not.
    assert h100.itl_miss_probability(0.005, 0.05, 0.0, 0.16, 1.0, 1.0) == 1.0
    assert h100.itl_miss_probability(0.005, 0.05, 0.0, 0.16, 1.0, 0.5) == 0.0


def test_tail_p_is_the_tail_quantile_as_a_probability() -> None:
    # Phi(-2.33) = 0.0099031: the single-request rule admits at most this.
    assert pytest.approx(0.0099031, abs=1e-7) == TAIL_P


def test_budget_bookkeeping_worked() -> None:
    assert MISS_SHARE == 0.005 and WINDOW_TAU_S == 600.0
    b = MissBudget()
    for _ in range(199):
        b = b.count(0.0)
    # 0.5% of 199 requests is less than one whole miss: nothing to spend yet.
    assert b.left(0.0) == 0.0
    for _ in range(801):
        b = b.count(0.0)
    # 0.5% of 1,000 requests: 5 misses; no local evidence yet, so calibration (0+1)/(0+1).
    assert b.calibration == 1.0 and b.left(0.0) == pytest.approx(5.0)
    # A local request predicted to miss with 0.3 is charged 0.3 while it runs ...
    charge = b.charge(0.3)
    b = b.admit(charge)
    assert b.left(0.0) == pytest.approx(4.7)
    # ... and replaced by what was measured when it ends: here a miss. It was the class's
    # own local request, so it is evidence too: calibration (1 + 1) / (0.3 + 1) = 1.53846,
    # and the 4 misses left are worth 4 / 1.53846 = 2.6 of predicted probability.
    b = b.settle(0.0, charge, True, predicted=0.3)
    assert b.in_flight == 0.0 and b.calibration == pytest.approx(2.0 / 1.3)
    assert b.left(0.0) == pytest.approx(4.0 * 1.3 / 2.0)
    assert b.charge(0.1) == pytest.approx(0.1 * 2.0 / 1.3)
    # One time constant later every count has faded by e: routed 367.88 (1.84 misses
    # allowed), missed 0.36788, evidence (0.36788 + 1) / (0.11036 + 1) = 1.23192:
    # (1.83940 - 0.36788) / 1.23192 = 1.19449.
    assert b.left(600.0) == pytest.approx(1.19449, abs=1e-5)
    # More misses than the share allows leave nothing, never less.
    for _ in range(10):
        b = b.settle(600.0, 0.0, True)
    assert b.left(600.0) == 0.0


def _request(budget: float | None) -> RouteRequest:
    r = RouteRequest("m", 3200, 1024, 200, True, "interactive", Slo(1.0, 0.05))
    if budget is None:
        return r
    return dataclasses.replace(r, miss_budgets=MappingProxyType({"interactive": budget}))


def _fleet(h100: GpuModel, prompt_rate: float) -> list[BackendSnapshot]:
    gpu = BackendSnapshot(
        "gpu", "m", is_local=True, inflight=20, recent_prompt_tokens_per_s=prompt_rate, gpu=h100
    )
    groq = BackendSnapshot(
        "groq", "m", price_in_per_token=0.05e-6, price_out_per_token=0.08e-6, ttft_s=0.2
    )
    return [gpu, groq]


def test_a_budget_admits_what_the_single_request_tail_spills(h100: GpuModel) -> None:
    # 20 requests on the GPU, prompts at 10,000 tokens/s (mean prefill share 0.5), a 3,200
    # token prompt (0.16 s of prefill), 200 expected output tokens, ITL target 50 ms.
    # Batch 21: T(21) = 1077 + 3602 x 16/20 = 3958.6 tokens/s, ITL 5.3049 ms; at the mean
    # share 1 / (0.5/0.1024 + 0.5/0.0053049) = 10.087 ms, so 199 tokens last 2.0073 s.
    # sd = sqrt(0.5 x 0.16 / 2.0073) = 0.19964; rho_max = (188.506 - 20) / (188.506 -
    # 9.7656) = 0.94274; z = 0.44274 / 0.19964 = 2.2177: miss probability 0.01329, just
    # above the single-request tail (0.0099): alone, the tail ITL misses and Groq serves it.
    pol = compile_policy(CostPolicySpec())
    alone = select(_request(None), _fleet(h100, 10_000), pol, 0.0)
    gpu = next(c for c in alone.candidates if c.backend == "gpu")
    assert alone.chosen is not None and alone.chosen.backend == "groq"
    assert not gpu.meets_slo and gpu.reason.startswith("itl ")
    assert gpu.miss_probability == pytest.approx(0.01329, abs=5e-5)
    # Budget smaller than that: still spilled. Budget of 3 misses: the GPU takes it, at $0
    # (b* at the mean share, 256 here, not the tail's 5: the ramp does not price it out).
    assert select(_request(0.013), _fleet(h100, 10_000), pol, 0.0).chosen.backend == "groq"  # type: ignore[union-attr]
    pooled = select(_request(3.0), _fleet(h100, 10_000), pol, 0.0)
    top = pooled.chosen
    assert top is not None and top.backend == "gpu" and top.meets_slo
    assert top.predicted_cost_usd == 0.0 and top.slo_batch == 256


def test_a_budget_never_sends_a_likely_miss(h100: GpuModel) -> None:
    # 19,000 prompt tokens/s: the mean share (0.95) is past rho_max (0.94274): the request is
    # likelier to miss than not, so no budget admits it.
    pol = compile_policy(CostPolicySpec())
    d = select(_request(100.0), _fleet(h100, 19_000), pol, 0.0)
    gpu = next(c for c in d.candidates if c.backend == "gpu")
    assert gpu.miss_probability > 0.5 and not gpu.meets_slo
    assert d.chosen is not None and d.chosen.backend == "groq"


def test_guarded_work_spends_the_protected_class_budget(h100: GpuModel) -> None:
    # A batch request (no ITL target of its own, may queue) is judged by the interactive
    # class's ITL target (the guard): the interactive budget decides, not its own class's.
    slo = Slo(None, None, 600.0, 30.0)
    base = RouteRequest("m", 3200, 1024, 200, True, "batch", slo)
    pol = compile_policy(CostPolicySpec(), {"interactive": Slo(1.0, 0.05), "batch": slo})
    fleet = _fleet(h100, 10_000)
    own = dataclasses.replace(base, miss_budgets=MappingProxyType({"batch": 3.0}))
    assert select(own, fleet, pol, 0.0).chosen.backend == "groq"  # type: ignore[union-attr]
    protected = dataclasses.replace(base, miss_budgets=MappingProxyType({"interactive": 3.0}))
    assert select(protected, fleet, pol, 0.0).chosen.backend == "gpu"  # type: ignore[union-attr]


def test_met_slo_judges_times_from_arrival() -> None:
    from gateway.flow.slo_budgets import met_slo

    chat = Slo(1.0, 0.05)
    # First token at 0.8 s, 101 tokens by 5.8 s: mean ITL 5.0 / 100 = 50 ms: met.
    assert met_slo(chat, 0.8, 5.8, 101)
    # 5.9 s: 51 ms: missed. First token at 1.01 s: missed.
    assert not met_slo(chat, 0.8, 5.9, 101)
    assert not met_slo(chat, 1.01, 1.5, 2)
    # A whole answer (first token unknown): only a total bound can judge it.
    assert met_slo(chat, None, 30.0, 101)
    assert not met_slo(Slo(None, None, 600.0), None, 600.5, 10)


def _batch_on_idle_gpu(h100: GpuModel, budget: float, *, queued: int = 0) -> tuple[str, Candidate]:
    """A 22,000-token batch request on an idle H100 that was sent 5 requests/s recently."""
    slo = Slo(None, None, 600.0, 30.0)
    r = RouteRequest("m", 22_000, 1024, 400, True, "batch", slo)
    r = dataclasses.replace(r, miss_budgets=MappingProxyType({"interactive": budget}))
    pol = compile_policy(CostPolicySpec(), {"interactive": Slo(1.0, 0.05), "batch": slo})
    gpu = BackendSnapshot(
        "gpu",
        "m",
        is_local=True,
        recent_requests_per_s=5.0,
        pending_prefill_tokens=queued,
        gpu=h100,
    )
    groq = BackendSnapshot(
        "groq", "m", price_in_per_token=0.05e-6, price_out_per_token=0.08e-6, ttft_s=0.2
    )
    d = select(r, [gpu, groq], pol, 0.0)
    assert d.chosen is not None
    return d.chosen.backend, next(c for c in d.candidates if c.backend == "gpu")


def test_a_long_batch_prefill_spends_the_protected_budget_on_the_arrivals_it_holds_up(
    h100: GpuModel,
) -> None:
    # Its own prefill is 22,000 / 20,000 = 1.1 s, plus one decode step at batch 1 (1/215 s =
    # 4.65 ms): TTFT 1.10465 s, 0.10465 s past the interactive class's 1 s. Interactive
    # requests that arrive in that first 0.10465 s wait behind the prompt and miss: at 5
    # requests/s, 0.52326 expected misses. The old guard judged the batch request's own TTFT
    # against the interactive bound, so a prompt over 20,000 tokens never went local at all.
    where, gpu = _batch_on_idle_gpu(h100, 0.5)
    assert where == "groq" and gpu.reason.startswith("busy: ttft 1.10")
    where, gpu = _batch_on_idle_gpu(h100, 0.6)
    assert where == "gpu" and gpu.meets_slo
    assert gpu.miss_probability == pytest.approx(5.0 * 0.104651, abs=1e-5)


def test_a_queue_already_past_the_protected_bound_is_busy_whatever_the_budget(
    h100: GpuModel,
) -> None:
    # 30,000 prompt tokens queued ahead: 1.5 s before ours starts. Protected traffic would
    # wait past its bound without this request: the worker is busy, not stalled by it.
    where, gpu = _batch_on_idle_gpu(h100, 100.0, queued=30_000)
    assert where == "groq" and gpu.reason.startswith("busy: ttft 2.60")


def test_the_size_biased_prompt_judges_a_long_prompt_on_a_short_step_worker(
    h100: GpuModel,
) -> None:
    # The worked fleet above (3,200-token prompt, 10,000 prompt tokens/s, miss probability
    # 0.01329 judged by its own 0.16-s prefill: Groq), now with the prompts the GPU was sent
    # known: 8e6 squared tokens/s over 10,000 tokens/s, a size-biased mean prompt of 800
    # tokens (0.04 s). The step (102.4 ms) is 2.05 x the 50 ms target, within
    # STALL_STEP_RATIO (3): no stall priced. sd = sqrt(0.5 x 0.04 / 2.0073) = 0.099818,
    # z = 0.44274 / 0.099818 = 4.4355, miss probability 4.59e-6: the GPU takes it alone, at $0.
    fleet = _fleet(h100, 10_000)
    fleet[0] = dataclasses.replace(fleet[0], recent_prompt_sq_tokens_per_s=8e6)
    d = select(_request(None), fleet, compile_policy(CostPolicySpec()), 0.0)
    top = d.chosen
    assert top is not None and top.backend == "gpu" and top.meets_slo
    assert top.miss_probability == pytest.approx(4.59e-6, rel=2e-3)
    assert prefill_burst_s(_request(None), fleet[0], h100, 0.05) == pytest.approx(0.04)
    # A prompt shorter than the size-biased mean keeps its own (400 tokens: 0.02 s).
    short = dataclasses.replace(_request(None), prompt_tokens=400)
    assert prefill_burst_s(short, fleet[0], h100, 0.05) == pytest.approx(0.02)
    # Whatever the step against the target (a 30 ms target puts it at 3.41 x): until
    # 2026-12-06 a worker whose step passed 3 x the target judged by the own prompt instead.
    assert prefill_burst_s(_request(None), fleet[0], h100, 0.03) == pytest.approx(0.04)
    # Guarded work (no ITL target of its own) keeps its own prompt.
    batch = dataclasses.replace(_request(None), slo_class="batch", slo=Slo(None, None, 600.0))
    assert prefill_burst_s(batch, fleet[0], h100, 0.05) == pytest.approx(0.16)
    # Its own prefill time when the caller has it already (`predict` works it out once):
    # returned as given where its own prompt is the burst, unused where the biased one is.
    assert prefill_burst_s(batch, fleet[0], h100, 0.05, 0.123) == 0.123
    assert prefill_burst_s(_request(None), fleet[0], h100, 0.05, 0.123) == pytest.approx(0.04)


def _pair_fleet(running: int) -> tuple[GpuModel, list[BackendSnapshot]]:
    """The 70B pair with `running` requests on it, sent 5,000 prompt tokens/s of a
    size-biased mean of 2,000 tokens (1e7 squared tokens/s), and Groq beside it."""
    pair = GpuModel.from_profile(load_profile("llama-3.1-70b-2xh200-tp2"), 7.0)
    s = BackendSnapshot(
        "pair",
        "m",
        is_local=True,
        inflight=running,
        recent_prompt_tokens_per_s=5_000,
        recent_prompt_sq_tokens_per_s=1e7,
        gpu=pair,
    )
    groq = BackendSnapshot(
        "groq", "m", price_in_per_token=0.59e-6, price_out_per_token=0.79e-6, ttft_s=0.3
    )
    return pair, [s, groq]


def _long_prompt(budget: float) -> RouteRequest:
    r = RouteRequest("m", 4000, 1024, 200, True, "interactive", Slo(1.0, 0.05))
    return dataclasses.replace(r, miss_budgets=MappingProxyType({"interactive": budget}))


def test_the_70b_pair_judges_its_own_itl_by_the_size_biased_prompt() -> None:
    # The pair's step is 2048 / 10,400 = 0.19692 s, 3.94 x a 50 ms target. A 3,200-token
    # prompt is judged by the 800-token size-biased mean (0.076923 s at 10,400 tokens/s),
    # as on the 8B workers; what its own prefill (3,200 / 10,175 = 0.31450 s) does to the
    # decodes beside it is priced apart (`stall_misses`). Until 2026-12-06 the pair judged
    # by the own prompt, which kept every long prompt out.
    pair = GpuModel.from_profile(load_profile("llama-3.1-70b-2xh200-tp2"), 7.0)
    s = BackendSnapshot(
        "pair",
        "m",
        is_local=True,
        recent_prompt_tokens_per_s=10_000,
        recent_prompt_sq_tokens_per_s=8e6,
        gpu=pair,
    )
    assert pair.mixed_step_s == pytest.approx(0.19692, abs=1e-5)
    assert pair.mixed_step_s > STALL_STEP_RATIO * 0.05
    assert prefill_burst_s(_request(None), s, pair, 0.05) == pytest.approx(0.076923, abs=1e-6)
    assert pair.prefill_time_s(3200) == pytest.approx(0.31450, abs=1e-5)


def test_stall_misses_worked() -> None:
    # 30 requests decode on the pair; a 4,000-token prompt would join as the 31st.
    # Context 4,000 + 200 / 2 = 4,100, past the 4,096 curve: T(31) = 379 + 928 x 23/24 =
    # 1268.33 tokens/s, decode-only ITL 31 / 1268.33 = 24.442 ms. A running request is
    # exposed for 199 tokens under the mean prefill share 5,000 / 10,400 = 0.48077, about
    # 1 / (0.48077 / 0.19692 + 0.51923 / 0.024442) = 42.2 ms each: take 8.3881 s.
    # rho_max = (40.914 - 20) / (40.914 - 5.0781) = 0.58360; bursts of 2,000 tokens
    # (0.19231 s): sd = sqrt(0.48077 x 0.19231 / 8.3881) = 0.10499. Without the new prompt:
    # z = 0.10283 / 0.10499 = 0.97947, so 0.16366 of them miss. Its 0.39925 s of prefill
    # (4,000 at 10,018.75 tokens/s) in every one's decode: rho_max - 0.39925 / 8.3881 =
    # 0.53600, z = 0.52612, 0.29939. 30 x (0.29939 - 0.16366) = 4.0719.
    pair, _ = _pair_fleet(30)
    itl = pair.itl_s(31, 4100)
    assert itl == pytest.approx(0.024442, abs=1e-6)
    own, burst = pair.prefill_time_s(4000), pair.prefill_time_s(2000)
    assert own == pytest.approx(0.39925, abs=1e-5) and burst == pytest.approx(0.19231, abs=1e-5)
    base = pair.itl_miss_probability(itl, 0.05, 5_000, burst, 8.3881)
    assert base == pytest.approx(0.16366, abs=1e-4)
    assert stall_misses(pair, 30, own, itl, 0.05, 5_000, burst, 8.3881, base) == pytest.approx(
        4.0719, abs=1e-3
    )
    # Nothing running, or no prefill of its own: nothing stalled.
    assert stall_misses(pair, 0, own, itl, 0.05, 5_000, burst, 8.3881, base) == 0.0
    assert stall_misses(pair, 30, 0.0, itl, 0.05, 5_000, burst, 8.3881, base) == 0.0
    # A decode long enough to absorb it (a 100-s exposure: 0.004 of its time) loses little.
    calm = pair.itl_miss_probability(itl, 0.05, 5_000, burst, 100.0)
    assert stall_misses(pair, 30, own, itl, 0.05, 5_000, burst, 100.0, calm) < 0.01


def test_a_prefill_that_stalls_the_running_decodes_goes_elsewhere_unless_the_budget_covers_it() -> (
    None
):
    pol = compile_policy(CostPolicySpec())

    def pick(running: int, budget: float) -> tuple[str, Candidate]:
        _, fleet = _pair_fleet(running)
        d = select(_long_prompt(budget), fleet, pol, 0.0)
        assert d.chosen is not None
        return d.chosen.backend, next(c for c in d.candidates if c.backend == "pair")

    # 30 running: its own ITL (miss probability 0.1635) fits a budget of 1, but it is
    # expected to make 4.07 of the running decodes miss: more than the budget. Groq.
    where, cand = pick(30, 1.0)
    assert where == "groq" and not cand.meets_slo
    assert cand.reason == (
        "stall: its 0.40s prefill costs the decodes running 4.07 misses > budget 1.00"
    )
    # A budget of 5 covers both: the pair takes it, at $0.
    where, cand = pick(30, 5.0)
    assert where == "pair" and cand.meets_slo and cand.predicted_cost_usd == 0.0
    # 4 running: 0.352 expected misses, within the budget of 1.
    assert pick(4, 1.0)[0] == "pair"
    # 2 running: 0.17 expected misses, over STALL_FREE_MISSES (0.15): covered by a budget
    # of 0.2, not by one of 0.1 (which its own 0.062 still fits).
    assert STALL_FREE_MISSES == 0.15
    assert pick(2, 0.2)[0] == "pair"
    where, cand = pick(2, 0.1)
    assert where == "groq" and cand.reason == (
        "stall: its 0.40s prefill costs the decodes running 0.17 misses > budget 0.10"
    )
    assert cand.miss_probability == pytest.approx(0.0624, abs=1e-4)
