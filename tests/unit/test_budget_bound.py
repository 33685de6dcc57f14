"""A budget reservation is an upper bound of the attributed cost it settles to (local GPU);
what a request that never answered settles to, and the rows it leaves."""

from __future__ import annotations

import faulthandler
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ModelSpec, parse_config
from gateway.errors import BudgetExceeded, LimitExceeded
from gateway.flow.admission import Admission, AdmissionRejected, Reservation, TenantLimits
from gateway.flow.attempt import SentAttempt
from gateway.flow.completion import Completion
from gateway.flow.estimate import Estimate
from gateway.flow.meter import Meter
from gateway.http.auth import Tenant
from gateway.http.inbound import InboundRequest
from gateway.metering.counting import CountingPool
from gateway.metering.ledger import LedgerWriter
from gateway.metering.ledger.sqlite import SqliteLedger
from gateway.metering.money import cost_usd
from gateway.metering.tokenizer import Tokenizer
from gateway.metering.usage import Usage
from gateway.metrics import GatewayMetrics
from gateway.state.live import LiveState
from policies.pricebook import Price, PriceTier
from policies.types import Candidate, RouteDecision


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """A mutant that stops the ledger writer leaves `finish` waiting forever: end the process
    after 20 s of one test instead (each takes well under a second), with every stack."""
    faulthandler.dump_traceback_later(20, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


POLICY = """
backends:
  - name: gpu
    kind: vllm
    base_url: http://127.0.0.1:9/v1
    models: {m: m}
    gpu: {price_per_hour: 3.6, profile: llama-3.1-8b-h200}
models:
  - name: m
    backends: [gpu]
tenants:
  - name: t
"""
PER_S = 3.6 / 3600  # $0.001 per GPU-second


async def test_reservation_bounds_the_attributed_cost_and_settles_to_it() -> None:
    config = parse_config(POLICY)
    live = LiveState({b.name: b for b in config.backends}, 0.0)
    # 9000 prompt tokens, at most 100 output tokens. The most a token can cost on this
    # profile: prefill at its slowest measured speed (39,900/s at 8192 tokens) and decoding
    # alone at its slowest measured context (190 tokens/s at 4096):
    # 0.001 x (9000 / 39900 + 100 / 190) = 0.001 x 0.7518797 = $0.00075188.
    bound = PER_S * (9000 / 39900 + 100 / 190)
    assert bound == pytest.approx(7.518797e-4, rel=1e-6)
    admission = Admission({"t": TenantLimits.of(usd_total=Decimal("0.000752"))})
    meter = Meter(Tokenizer.estimate(), GatewayMetrics(), None, admission, live)
    tenant = Tenant.from_spec(config.tenants[0])
    held = await meter.reserve(tenant, config.models[0], Estimate(9000, 100, 100, True))
    assert float(held.cost_usd) == pytest.approx(bound, abs=1e-9)
    # What it settles to: 4000 of the prompt were prefix-cache hits (free) and it shared a
    # batch of 8 at a 9050-token context (priced at 16384: the 4096 curve, T(8) = 1274/s):
    # 0.001 x (5000 / 39900 + 100 / 1274) = 0.001 x 0.2038066 = $0.00020381.
    prices = meter.prices.unit_prices("gpu", "m", 8, context=9050)
    usage = Usage(9000, 100, cached_tokens=4000, source="reported")
    attributed = cost_usd(usage, prices)
    assert float(attributed) == pytest.approx(PER_S * (5000 / 39900 + 100 / 1274), rel=1e-6)
    assert attributed < held.cost_usd
    # The worst case it reserved for (batch 1, no cache hit, every token produced) is
    # attributed at most the reservation.
    alone = cost_usd(
        Usage(9000, 100, source="reported"), meter.prices.unit_prices("gpu", "m", 1, context=9050)
    )
    assert alone <= held.cost_usd
    await admission.settle(held, usage.total_tokens, attributed)
    # The budget now holds exactly the attributed cost: what is left fits, a cent more not.
    left = Decimal("0.000752") - attributed
    fits = await admission.reserve("t", 0, left)
    await admission.release(fits)
    with pytest.raises(AdmissionRejected):
        await admission.reserve("t", 0, left + Decimal("0.000000001"))


# --- what a request that never answered settles to, and the rows it leaves ------------------

TWO = """
backends:
  - name: gpu
    kind: vllm
    base_url: http://127.0.0.1:9/v1
    models: {m: m}
    gpu: {price_per_hour: 3.6, profile: llama-3.1-8b-h200}
  - name: prov
    base_url: http://127.0.0.1:9/v1
    models: {m: prov-m, pm: prov-m, odd: prov-m}
    price: {input_per_million: 1.0, output_per_million: 2.0}
    model_prices:
      pm: {input_per_million: 3.0, output_per_million: 4.0}
      odd: {input_per_million: 0.1234567891, output_per_million: 0.9876543216}
models:
  - name: m
    backends: [gpu, prov]
  - name: pm
    backends: [prov]
  - name: odd
    backends: [prov]
tenants:
  - name: t
"""


async def _meter_with_ledger(
    tmp_path: Path,
    limits: TenantLimits,
    *,
    clock: Callable[[], float] = time.time,
    counting: CountingPool | None = None,
    metrics: GatewayMetrics | None = None,
    tokenizer: Tokenizer | None = None,
) -> tuple[Meter, Admission, LedgerWriter, Tenant, ModelSpec]:
    config = parse_config(TWO)
    live = LiveState({b.name: b for b in config.backends}, 0.0)
    admission = Admission({"t": limits}, clock=clock)
    ledger = LedgerWriter(SqliteLedger(tmp_path / "ledger.db"))
    await ledger.start()
    meter = Meter(
        tokenizer or Tokenizer.estimate(),
        metrics or GatewayMetrics(),
        ledger,
        admission,
        live,
        counting=counting,
    )
    return meter, admission, ledger, Tenant.from_spec(config.tenants[0]), config.models[0]


def _completion(held: Reservation | None, prompt: int, model: str = "m") -> Completion:
    inbound = InboundRequest(
        "chat", {}, model, stream=True, include_usage=False, max_tokens=50, n=1
    )
    return Completion(
        "rid-1",
        "t",
        inbound,
        Estimate(prompt, 50, 50, True),
        held,
        time.monotonic(),
        client_request_id="client-1",
    )


def _ledger_rows(path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM ledger ORDER BY attempt")]
    finally:
        conn.close()


async def _fits(admission: Admission, cost: Decimal, tokens: int = 0) -> bool:
    try:
        held = await admission.reserve("t", tokens, cost, budget_tokens=tokens)
    except AdmissionRejected:
        return False
    await admission.release(held)
    return True


async def test_a_client_that_left_pays_the_prompt_of_its_first_attempt_and_the_hedge_is_ours(
    tmp_path: Path,
) -> None:
    budget = Decimal("0.01")
    meter, admission, ledger, tenant, model = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=budget, tokens_per_day=5000)
    )
    est = Estimate(1000, 50, 50, True)
    held = await meter.reserve(tenant, model, est)
    completion = _completion(held, 1000, "pm")
    # Handed over in any order: attempt 1 (the provider) is the tenant's, the hedge (2, the
    # GPU, at batch 8) the operator's.
    sent = [SentAttempt("gpu", "m", 2), SentAttempt("prov", "prov-m", 1)]
    await meter.left_before_answer(completion, sent, lambda b: 8 if b == "gpu" else 3)
    await ledger.close()
    first, hedge = _ledger_rows(tmp_path / "ledger.db")
    # 1000 prompt tokens at pm's $3 per million: $0.003; nothing delivered, nothing else charged.
    assert (first["tenant"], first["backend"], first["backend_model"]) == ("t", "prov", "prov-m")
    assert first["cost_nusd"] == 3_000_000
    assert (first["prompt_tokens"], first["completion_tokens"]) == (1000, 0)
    assert (first["token_source"], first["counted_prompt_tokens"]) == ("estimated", 1000)
    assert first["outcome"] == "client_disconnect" and first["divergent"] == 0
    assert first["batch_size"] is None and first["is_local"] == 0
    assert first["client_request_id"] == "client-1" and first["stream"] == 1
    assert 0 <= first["total_s"] < 60
    assert (hedge["tenant"], hedge["backend"], hedge["attempt"]) == ("(operator)", "gpu", 2)
    assert hedge["batch_size"] == 8 and hedge["is_local"] == 1 and hedge["divergent"] == 0
    assert hedge["outcome"] == "client_disconnect"
    # The tenant's budget now holds exactly its row: $0.003 and 1000 tokens.
    assert await _fits(admission, budget - Decimal("0.003"))
    assert not await _fits(admission, budget - Decimal("0.003") + Decimal("0.000000001"))
    assert await _fits(admission, Decimal(0), 4000)
    assert not await _fits(admission, Decimal(0), 4001)


async def test_a_client_that_left_before_any_attempt_went_out_gets_it_all_back(
    tmp_path: Path,
) -> None:
    budget = Decimal("0.01")
    meter, admission, ledger, tenant, model = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=budget, tokens_per_day=5000)
    )
    held = await meter.reserve(tenant, model, Estimate(1000, 50, 50, True))
    await meter.left_before_answer(_completion(held, 1000), [], lambda b: 1)
    await ledger.close()
    assert _ledger_rows(tmp_path / "ledger.db") == []
    assert await _fits(admission, budget, 5000)


async def test_a_gpu_attempt_the_client_left_is_priced_at_the_prompts_length(
    tmp_path: Path,
) -> None:
    """The client left while its one attempt, on the GPU, had a 2000-token prompt: the GPU
    prefilled it at the profile's speed for that length (2048: 46,500 tokens/s), not at its
    reference prompt (512: 41,900/s): $0.001/s / 46,500 = $0.021505376 per million, 2000 of
    them 43,011 nano-dollars, and that is what the tenant's budget keeps of its reservation."""
    budget = Decimal("0.01")
    meter, admission, ledger, tenant, model = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=budget)
    )
    held = await meter.reserve(tenant, model, Estimate(2000, 50, 50, True))
    await meter.left_before_answer(
        _completion(held, 2000), [SentAttempt("gpu", "m", 1)], lambda b: 8
    )
    await ledger.close()
    (row,) = _ledger_rows(tmp_path / "ledger.db")
    assert (row["tenant"], row["backend"], row["batch_size"]) == ("t", "gpu", 8)
    assert row["price_in_nusd_per_m"] == 21_505_376
    assert (row["prompt_tokens"], row["cost_nusd"]) == (2000, 43_011)
    assert await _fits(admission, budget - Decimal("0.000043011"))
    assert not await _fits(admission, budget - Decimal("0.000043010"))


async def test_a_row_that_could_not_be_priced_still_hands_the_reservation_back(
    tmp_path: Path,
) -> None:
    budget = Decimal("0.01")
    meter, admission, ledger, tenant, model = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=budget, tokens_per_day=5000)
    )
    held = await meter.reserve(tenant, model, Estimate(1000, 50, 50, True))
    with pytest.raises(KeyError):  # a backend the live state no longer knows
        await meter.left_before_answer(
            _completion(held, 1000), [SentAttempt("gone", "x", 1)], lambda b: 1
        )
    await ledger.close()
    assert await _fits(admission, budget, 5000)


async def test_a_rate_limit_is_a_rate_limit_and_a_budget_a_budget(tmp_path: Path) -> None:
    meter, _, ledger, tenant, model = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal("0.0001"), tokens_per_minute=500)
    )
    with pytest.raises(LimitExceeded) as rate:
        await meter.reserve(tenant, model, Estimate(1000, 50, 50, True))
    assert not isinstance(rate.value, BudgetExceeded)
    assert rate.value.code == "tokens_per_minute"
    with pytest.raises(BudgetExceeded) as budget:
        await meter.reserve(tenant, model, Estimate(100, 50, 50, True))
    assert budget.value.code == "usd_total"
    await ledger.close()


async def test_attempts_cut_mid_answer_are_the_operators_prompt(tmp_path: Path) -> None:
    budget = Decimal("0.01")
    meter, admission, ledger, tenant, model = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=budget)
    )
    held = await meter.reserve(tenant, model, Estimate(2000, 50, 50, True))
    completion = _completion(held, 2000, "pm")
    broken = [SentAttempt("prov", "prov-m", 1), SentAttempt("gpu", "m", 2)]
    await meter.broken_attempts(completion, broken, lambda b: 5 if b == "gpu" else 7)
    await ledger.close()
    prov, gpu = _ledger_rows(tmp_path / "ledger.db")
    # 2000 prompt tokens at pm's $3 per million: $0.006, the operator's.
    assert (prov["tenant"], prov["outcome"], prov["cost_nusd"]) == (
        "(operator)",
        "upstream_cut",
        6_000_000,
    )
    assert (prov["prompt_tokens"], prov["completion_tokens"], prov["batch_size"]) == (2000, 0, None)
    assert prov["price_in_nusd_per_m"] == 3_000_000_000
    assert (gpu["tenant"], gpu["attempt"], gpu["batch_size"]) == ("(operator)", 2, 5)
    # The GPU prefilled 2000 tokens at the profile's speed for that length (2048: 46,500/s),
    # not at its reference prompt (512: 41,900/s): $0.001/s / 46,500 = $0.021505376 per
    # million, 2000 of them $0.000043010752 -> 43,011 nano-dollars.
    assert gpu["price_in_nusd_per_m"] == 21_505_376
    assert gpu["cost_nusd"] == 43_011
    # Not the tenant's: its reservation is still held whole (released here, all back).
    assert not await _fits(admission, budget)
    await admission.release(held)
    assert await _fits(admission, budget)


async def test_a_lost_hedge_is_priced_when_the_race_ends_and_metered_as_ours(
    tmp_path: Path,
) -> None:
    meter, _, ledger, tenant, model = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal("0.01"))
    )
    loser = SentAttempt("prov", "prov-m", 2)
    gpu_loser = SentAttempt("gpu", "m", 3)
    losers = meter.hedge_prices(
        (loser, gpu_loser), "pm", lambda b: 4 if b == "gpu" else 9, prompt_tokens=3000
    )
    assert [(s, b) for s, _, b in losers] == [(loser, 9), (gpu_loser, 4)]
    prov_prices = losers[0][1]
    assert (prov_prices.input_per_m, prov_prices.output_per_m) == (Decimal(3), Decimal(4))
    # The GPU's price at the batch it had and its prompt's length (3000: the 4096 bucket),
    # not its reference prompt's (the cut attempts' test works one such price by hand).
    assert losers[1][1] == meter.prices.unit_prices("gpu", "pm", 4, context=3000)
    assert losers[1][1] != meter.prices.unit_prices("gpu", "pm", 4)
    assert losers[1][1] != meter.prices.unit_prices("gpu", "pm", 9, context=3000)
    completion = _completion(await meter.reserve(tenant, model, Estimate(3000, 50, 50, True)), 3000)
    completion.hedge_losers = losers
    await meter.finish(completion, outcome="ok")  # the winner delivered nothing metered here
    await ledger.close()
    prov, gpu = _ledger_rows(tmp_path / "ledger.db")
    assert (prov["tenant"], prov["outcome"], prov["cost_nusd"]) == (
        "(operator)",
        "hedge_cancelled",
        9_000_000,  # 3000 prompt tokens at pm's $3 per million, priced when the race ended
    )
    assert (gpu["tenant"], gpu["batch_size"]) == ("(operator)", 4)


async def test_a_provider_only_model_reserves_at_its_list_price(tmp_path: Path) -> None:
    meter, _, ledger, tenant, _ = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(1))
    )
    pm = next(m for m in parse_config(TWO).models if m.name == "pm")
    held = await meter.reserve(tenant, pm, Estimate(1000, 50, 50, True))
    # pm's own price on prov: 1000 x $3/M + 50 x $4/M = $0.0032
    assert held.cost_usd == Decimal("0.0032")
    await ledger.close()


async def test_a_budget_that_resets_soon_says_retry_after_and_should_retry(
    tmp_path: Path,
) -> None:
    half_past_23 = datetime(2026, 12, 4, 23, 30, tzinfo=UTC).timestamp()
    meter, admission, ledger, tenant, _ = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_per_day=Decimal("0.005")), clock=lambda: half_past_23
    )
    pm = next(m for m in parse_config(TWO).models if m.name == "pm")
    first = await meter.reserve(tenant, pm, Estimate(1000, 50, 50, True))  # $0.0032 held
    with pytest.raises(BudgetExceeded) as refused:
        await meter.reserve(tenant, pm, Estimate(1000, 50, 50, True))
    # It would fit the day's empty budget, which starts again in 30 minutes.
    assert refused.value.should_retry is True and refused.value.retry_after_s == 1800
    assert refused.value.headers()["x-should-retry"] == "true"
    await admission.release(first)
    await ledger.close()


async def test_reported_usage_far_from_the_count_is_flagged_divergent(tmp_path: Path) -> None:
    # Counting off (every count estimated): the pool given is the one used.
    pool = CountingPool(inline_bytes=-1, max_count_bytes=-1)
    metrics = GatewayMetrics()
    meter, _, ledger, tenant, model = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(1)), counting=pool, metrics=metrics
    )
    completion = _completion(await meter.reserve(tenant, model, Estimate(10, 50, 50, True)), 10)
    completion.backend, completion.backend_model, completion.attempt = "prov", "prov-m", 1
    completion.prices = meter.prices.unit_prices("prov", "m", 1)
    # 400 completion tokens reported for a two-character answer: off by far more than 10%.
    answer = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 400, "total_tokens": 410},
    }
    usage = await meter.finish(completion, outcome="ok", answer=answer, answer_bytes=100)
    await ledger.close()
    assert pool.estimated == 1
    assert usage is not None and usage.completion_tokens == 400
    (row,) = _ledger_rows(tmp_path / "ledger.db")
    assert row["divergent"] == 1 and row["completion_tokens"] == 400
    # Counted under the backend that reported it.
    diverged = metrics.registry.get_sample_value(
        "neogate_usage_divergence_total", {"backend": "prov"}
    )
    assert diverged == 1
    # 10 x $1/M + 400 x $2/M = $0.00081
    assert row["cost_nusd"] == 810_000


async def test_gpu_prices_at_the_profiles_figures(tmp_path: Path) -> None:
    meter, _, ledger, tenant, model = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(100))
    )
    # At the reference prompt (512 tokens: 41,900 tokens/s), $0.001 per GPU-second:
    # 0.001 / 41900 x 1e6 = $0.023866348 per million prompt tokens.
    plain = meter.prices.unit_prices("gpu", "m", 8)
    assert plain.input_per_m == Decimal("0.023866348")
    assert plain.version.endswith("/gpu@b8")
    # A one-token context is bucket 1, priced at its own prefill speed and named so.
    assert meter.prices.unit_prices("gpu", "m", 8, context=1).version.endswith("/gpu@b8c1")
    assert meter.prices.unit_prices("gpu", "m", 8, context=9050).version.endswith("/gpu@b8c16384")
    # The most a token can cost here (what budgets hold): prefill at 39,900/s and decoding
    # at 190/s: $0.025062657 and $5.263157895 per million (rounded to the nano-dollar).
    # 10M prompt and 10M output tokens: 10 x 0.025062657 + 10 x 5.263157895 = $52.88220552.
    held = await meter.reserve(tenant, model, Estimate(10_000_000, 10_000_000, 1, True))
    assert held.cost_usd == Decimal("52.88220552")
    await ledger.close()


async def test_prices_in_force_are_whole_nano_dollars_per_million(tmp_path: Path) -> None:
    """The price a ledger row stores (integer nano-dollars per million) is the very price
    its cost was computed with: prices are rounded to 9 decimals of a dollar per million."""
    meter, _, ledger, _, _ = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(1))
    )
    odd = meter.prices.unit_prices("prov", "odd", 0)
    assert (odd.input_per_m, odd.output_per_m) == (Decimal("0.123456789"), Decimal("0.987654322"))
    for prices in (
        odd,
        meter.prices.unit_prices("gpu", "m", 1),
        meter.prices.unit_prices("gpu", "m", 8, context=9050),
        meter.prices.unit_prices("gpu", "m", 3, context=700),
    ):
        assert Decimal(prices.nusd[0]) == prices.input_per_m * 10**9
        assert Decimal(prices.nusd[1]) == prices.output_per_m * 10**9
    await ledger.close()


async def test_a_fed_cache_write_price_is_in_force(tmp_path: Path) -> None:
    meter, _, ledger, _, _ = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(1))
    )
    assert meter.prices.unit_prices("prov", "pm", 0).cache_write_input_per_m is None
    meter._live.prices.set(
        "prov", Price(3e-6, 4e-6, cache_write_input_per_token=3.75e-6), model="pm"
    )
    fed = meter.prices.unit_prices("prov", "pm", 0)
    assert fed.cache_write_input_per_m == Decimal("3.75")
    assert (fed.input_per_m, fed.output_per_m) == (Decimal(3), Decimal(4))
    await ledger.close()


@pytest.mark.parametrize("counting_off", [False, True])
async def test_a_stream_is_counted_by_the_pool_given_or_a_default_one(
    tmp_path: Path, counting_off: bool
) -> None:
    pool = CountingPool(inline_bytes=-1, max_count_bytes=-1) if counting_off else None
    meter, _, ledger, tenant, model = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(1)), counting=pool
    )
    completion = _completion(await meter.reserve(tenant, model, Estimate(10, 50, 50, True)), 10)
    completion.backend, completion.backend_model, completion.attempt = "prov", "prov-m", 1
    completion.prices = meter.prices.unit_prices("prov", "m", 1)
    stream = completion.stream_meter()
    stream.feed(b'data: {"choices": [{"index": 0, "delta": {"content": "hello world"}}]}')
    usage = await meter.finish(completion, outcome="ok", meter=stream)
    await ledger.close()
    # No usage reported: "hello world" is 11 characters, about 4 per token: 3 tokens.
    assert usage is not None and usage.completion_tokens == 3
    assert usage.source == "estimated"
    if pool is not None:
        assert pool.estimated == 1


async def test_a_long_prompt_is_billed_at_the_tier_it_reached(tmp_path: Path) -> None:
    meter, _, ledger, tenant, _ = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(1))
    )
    # pm on prov: $3/$4 per M, from 200,000 prompt tokens $6/$8, from 1M $9 input (and the
    # base output rate: a tier's None keeps the base rate, not the tier below's).
    tiers = (PriceTier(200_000, 6e-6, 8e-6), PriceTier(1_000_000, 9e-6))
    meter._live.prices.set("prov", Price(3e-6, 4e-6, tiers=tiers), model="pm")
    pm = next(m for m in parse_config(TWO).models if m.name == "pm")
    completion = _completion(await meter.reserve(tenant, pm, Estimate(10, 5, 5, True)), 10, "pm")
    completion.backend, completion.backend_model, completion.attempt = "prov", "prov-m", 1
    # Prices looked up without a prompt length are the base tier's, and a real prompt below
    # the first tier keeps them: nothing to re-tier.
    completion.prices = meter.prices.unit_prices("prov", "pm", 1)
    assert meter.tiered_prices(completion, Usage(10, 5, source="reported")) is None
    completion.prices = base = meter.prices.unit_prices("prov", "pm", 1, prompt_tokens=10)
    assert (base.input_per_m, base.output_per_m) == (Decimal(3), Decimal(4))
    assert meter.tiered_prices(completion, Usage(199_999, 5, source="reported")) is None
    at_200k = meter.tiered_prices(completion, Usage(200_000, 5, source="reported"))
    assert at_200k is not None
    assert (at_200k.input_per_m, at_200k.output_per_m) == (Decimal(6), Decimal(8))
    at_1m = meter.tiered_prices(completion, Usage(1_000_000, 5, source="reported"))
    assert at_1m is not None
    assert (at_1m.input_per_m, at_1m.output_per_m) == (Decimal(9), Decimal(4))  # None: base
    # The row of a request whose estimate missed the tier: 200,000 x $6/M + 5 x $8/M.
    answer = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
        "usage": {"prompt_tokens": 200_000, "completion_tokens": 5, "total_tokens": 200_005},
    }
    await meter.finish(completion, outcome="ok", answer=answer, answer_bytes=200)
    await ledger.close()
    (row,) = _ledger_rows(tmp_path / "ledger.db")
    assert row["cost_nusd"] == 1_200_040_000
    assert row["price_in_nusd_per_m"] == 6_000_000_000
    # A price from another book version (the book moved on) is not re-tiered.
    completion.prices = base
    meter._live.prices.set("prov", Price(3e-6, 4e-6, tiers=tiers), model="pm")
    assert meter.tiered_prices(completion, Usage(200_000, 5, source="reported")) is None
    # A GPU is not tiered.
    completion.backend = "gpu"
    assert meter.tiered_prices(completion, Usage(200_000, 5, source="reported")) is None


async def test_cached_and_cache_write_prices_are_whole_nano_dollars_per_million(
    tmp_path: Path,
) -> None:
    """Like the input and output prices: 0.1234567891 $/M cached and 0.3456789012 $/M for a
    cache write are in force as 0.123456789 and 0.345678901 (9 decimals)."""
    meter, _, ledger, _, _ = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(1))
    )
    meter._live.prices.set(
        "prov",
        Price(
            3e-6,
            4e-6,
            cached_input_per_token=1.234567891e-7,
            cache_write_input_per_token=3.456789012e-7,
        ),
        model="pm",
    )
    fed = meter.prices.unit_prices("prov", "pm", 0)
    assert fed.cached_input_per_m == Decimal("0.123456789")
    assert fed.cache_write_input_per_m == Decimal("0.345678901")
    assert fed.nusd[2] == 123_456_789
    await ledger.close()


async def test_a_row_carries_routings_marginal_cost_and_its_counterfactual(tmp_path: Path) -> None:
    """Served by prov for pm ($3/$4 per M, from 100 prompt tokens $6/$8): routing predicted
    $0.00004 for prov and named prov the alternative. The real prompt (200 tokens) reached
    the tier: 200 x $6/M + 5 x $8/M = $0.00124, and the counterfactual is priced at that same
    tier of pm (not the backend's base $1/$2, not the untiered $3/$4)."""
    meter, _, ledger, tenant, _ = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(1))
    )
    tiers = (PriceTier(100, 6e-6, 8e-6),)
    meter._live.prices.set("prov", Price(3e-6, 4e-6, tiers=tiers), model="pm")
    pm = next(m for m in parse_config(TWO).models if m.name == "pm")
    completion = _completion(await meter.reserve(tenant, pm, Estimate(10, 5, 5, True)), 10, "pm")
    completion.backend, completion.backend_model, completion.attempt = "prov", None, 1
    completion.prices = meter.prices.unit_prices("prov", "pm", 1, prompt_tokens=10)
    routed = Candidate("prov", 0.00004, 0.1, 0.01, 0.5, True)
    completion.decision = RouteDecision(
        candidates=(Candidate("gpu", 0.00001, 0.2, 0.02, 0.9, True), routed),
        reason="cheapest",
        price_version=0,
        policy="cost",
        alternative="prov",
        alternative_cost_usd=0.00004,
    )
    answer = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
        "usage": {"prompt_tokens": 200, "completion_tokens": 5, "total_tokens": 205},
    }
    await meter.finish(completion, outcome="ok", answer=answer, answer_bytes=200)
    await ledger.close()
    (row,) = _ledger_rows(tmp_path / "ledger.db")
    assert row["cost_nusd"] == 1_240_000
    assert row["marginal_cost_nusd"] == 40_000
    assert (row["counterfactual_backend"], row["counterfactual_cost_nusd"]) == ("prov", 1_240_000)
    assert row["backend_model"] == ""
    # What routing learns from: prov's own candidate, the estimate it planned with (10
    # prompt tokens, not the 200 reported), the 5 tokens delivered, no byte timed.
    ended = completion.outcome
    assert ended is not None
    assert (ended.backend, ended.model, ended.status, ended.ttft_s) == ("prov", "pm", "ok", None)
    assert (ended.prompt_tokens, ended.completion_tokens) == (10, 5)
    assert ended.predicted == routed and ended.timings is None
    assert 0 <= ended.total_s < 60


async def test_a_backend_routing_did_not_rank_has_no_marginal_cost(tmp_path: Path) -> None:
    """Routing ranked only the GPU; the answer came from prov: no candidate, no marginal
    cost, nothing predicted; the counterfactual is still priced (1000 x $3/M + 5 x $4/M)."""
    meter, _, ledger, tenant, _ = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(1))
    )
    pm = next(m for m in parse_config(TWO).models if m.name == "pm")
    completion = _completion(await meter.reserve(tenant, pm, Estimate(10, 5, 5, True)), 10, "pm")
    completion.backend, completion.backend_model, completion.attempt = "prov", "prov-m", 1
    completion.prices = meter.prices.unit_prices("prov", "pm", 1, prompt_tokens=10)
    completion.decision = RouteDecision(
        candidates=(Candidate("gpu", 0.00001, 0.2, 0.02, 0.9, True),),
        reason="cheapest",
        price_version=0,
        policy="cost",
        alternative="prov",
    )
    assert completion.candidate() is None
    answer = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 5, "total_tokens": 1005},
    }
    await meter.finish(completion, outcome="ok", answer=answer, answer_bytes=200)
    await ledger.close()
    (row,) = _ledger_rows(tmp_path / "ledger.db")
    assert row["marginal_cost_nusd"] is None
    assert (row["counterfactual_backend"], row["counterfactual_cost_nusd"]) == ("prov", 3_020_000)
    assert completion.outcome is not None and completion.outcome.predicted is None


async def test_an_attempt_that_delivered_nothing_has_no_row_and_gives_it_all_back(
    tmp_path: Path,
) -> None:
    """prov answered with an error: nothing delivered, so no row, and the reservation
    ($0.0032 and 1050 tokens) comes back whole. A request no backend took is counted
    under the backend "none"."""
    budget = Decimal("0.01")
    metrics = GatewayMetrics()
    meter, admission, ledger, tenant, _ = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=budget, tokens_per_day=5000), metrics=metrics
    )
    pm = next(m for m in parse_config(TWO).models if m.name == "pm")
    held = await meter.reserve(tenant, pm, Estimate(1000, 50, 50, True))
    completion = _completion(held, 1000, "pm")
    completion.backend, completion.backend_model, completion.attempt = "prov", "prov-m", 1
    completion.prices = meter.prices.unit_prices("prov", "pm", 1, prompt_tokens=1000)
    assert not await _fits(admission, budget)
    assert await meter.finish(completion, outcome="upstream_error") is None
    assert await _fits(admission, budget, 5000)
    assert not await _fits(admission, budget + Decimal("0.000000001"))
    assert not await _fits(admission, Decimal(0), 5001)
    ended = completion.outcome
    assert ended is not None and (ended.backend, ended.status) == ("prov", "upstream_error")
    assert (ended.prompt_tokens, ended.completion_tokens, ended.timings) == (1000, 0, None)
    unrouted = _completion(await meter.reserve(tenant, pm, Estimate(1000, 50, 50, True)), 1000)
    assert await meter.finish(unrouted, outcome="no_backend") is None
    assert unrouted.outcome is None
    await ledger.close()
    assert _ledger_rows(tmp_path / "ledger.db") == []
    assert await _fits(admission, budget, 5000)
    sample = metrics.registry.get_sample_value
    served = {"backend": "prov", "model": "pm"}
    assert sample("neogate_requests_total", {**served, "outcome": "upstream_error"}) == 1
    unserved = {"backend": "none", "model": "m", "outcome": "no_backend"}
    assert sample("neogate_requests_total", unserved) == 1
    assert sample("neogate_tokens_total", {**served, "kind": "prompt"}) == 0
    assert sample("neogate_cost_usd_total", served) == 0


@pytest.mark.parametrize(("tokens", "itl"), [(1, None), (2, 6.0), (3, 3.0)])
async def test_a_streams_metrics(tmp_path: Path, tokens: int, itl: float | None) -> None:
    """A stream that arrived 10 s ago, its first byte at 4 s, 10 prompt and `tokens`
    completion tokens reported (prov: $1/$2 per M): 6 s of decoding over tokens - 1 gaps."""
    metrics = GatewayMetrics()
    meter, _, ledger, tenant, model = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(1)), metrics=metrics
    )
    completion = _completion(await meter.reserve(tenant, model, Estimate(10, 50, 50, True)), 10)
    completion.backend, completion.backend_model, completion.attempt = "prov", "prov-m", 1
    completion.prices = meter.prices.unit_prices("prov", "m", 1, prompt_tokens=10)
    completion.arrived = time.monotonic() - 10.0
    completion.first_byte_at = completion.arrived + 4.0
    stream = completion.stream_meter()
    stream.feed(b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}')
    stream.feed(
        b'data: {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": %d}}' % tokens
    )
    await meter.finish(completion, outcome="ok", meter=stream)
    await ledger.close()
    sample = metrics.registry.get_sample_value
    labels = {"backend": "prov", "model": "m"}
    assert sample("neogate_requests_total", {**labels, "outcome": "ok"}) == 1
    assert sample("neogate_tokens_total", {**labels, "kind": "prompt"}) == 10
    assert sample("neogate_tokens_total", {**labels, "kind": "completion"}) == tokens
    assert sample("neogate_cost_usd_total", labels) == pytest.approx((10 + 2 * tokens) / 1e6)
    assert sample("neogate_time_to_first_token_seconds_sum", labels) == pytest.approx(4.0)
    took = sample("neogate_request_duration_seconds_sum", labels)
    assert took is not None and 10.0 <= took < 13.0  # 10 s, and the time finish took
    gaps = sample("neogate_inter_token_latency_seconds_count", labels)
    if itl is None:
        assert not gaps  # one token: no gap to time
    else:
        assert gaps == 1
        mean = sample("neogate_inter_token_latency_seconds_sum", labels)
        assert mean is not None and itl <= mean < itl + 3.0 / (tokens - 1)


@pytest.mark.parametrize(
    ("inline_bytes", "max_count_bytes", "answer_bytes", "tokens", "source"),
    [
        (4096, 8 << 20, 100, 2, "counted"),  # inline
        (0, 8 << 20, 100, 2, "counted"),  # on the worker thread
        (0, 0, 100, 3, "estimated"),  # too big to count: ~4 characters a token
        (0, 0, None, 2, "counted"),  # its size not given: counted inline
    ],
)
async def test_an_answer_without_usage_is_counted_where_its_size_says(
    tmp_path: Path,
    inline_bytes: int,
    max_count_bytes: int,
    answer_bytes: int | None,
    tokens: int,
    source: str,
) -> None:
    """No usage reported: "hello world" is 2 tokens of cl100k_base (11 characters: 3 by
    the estimate), and the prompt is the gateway's estimate (10 tokens at prov's $1/$2)."""
    pool = CountingPool(inline_bytes=inline_bytes, max_count_bytes=max_count_bytes)
    meter, _, ledger, tenant, model = await _meter_with_ledger(
        tmp_path,
        TenantLimits.of(usd_total=Decimal(1)),
        counting=pool,
        tokenizer=Tokenizer.from_source("bpe-openai", "cl100k_base"),
    )
    completion = _completion(await meter.reserve(tenant, model, Estimate(10, 50, 50, True)), 10)
    completion.backend, completion.backend_model, completion.attempt = "prov", "prov-m", 1
    completion.prices = meter.prices.unit_prices("prov", "m", 1, prompt_tokens=10)
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hello world"}}]}
    if answer_bytes is None:
        usage = await meter.finish(completion, outcome="ok", answer=answer)
    else:
        usage = await meter.finish(
            completion, outcome="ok", answer=answer, answer_bytes=answer_bytes
        )
    pool.close()
    await ledger.close()
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (10, tokens, source)
    assert (usage.counted_prompt_tokens, usage.counted_completion_tokens) == (10, tokens)
    assert pool.offloaded == (1 if (inline_bytes, max_count_bytes) == (0, 8 << 20) else 0)
    assert pool.estimated == (1 if source == "estimated" else 0)
    (row,) = _ledger_rows(tmp_path / "ledger.db")
    assert row["cost_nusd"] == (10 * 1 + tokens * 2) * 1000


async def test_budgets_hold_the_keys_output_cap_when_the_request_set_none(tmp_path: Path) -> None:
    """1000 prompt tokens, 50 output expected, the key's cap of 3000 held: 4000 of the
    tenant's 5000 tokens a day are held, 1000 left."""
    meter, admission, ledger, tenant, model = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(1), tokens_per_day=5000)
    )
    held = await meter.reserve(
        tenant, model, Estimate(1000, 50, 50, True, reserved_output_tokens=3000)
    )
    assert held.tokens == 4000
    assert await _fits(admission, Decimal(0), 1000)
    assert not await _fits(admission, Decimal(0), 1001)
    await ledger.close()


async def test_each_model_reserves_at_its_own_price_in_force(tmp_path: Path) -> None:
    """On one meter: pm at $3/$4 per M (1000 x 3 + 50 x 4 = $0.0032), then odd at its own
    $0.123456789/$0.987654322 (123.456789 + 49.3827161 = 172.8395051 micro-dollars:
    $0.00017284 to the nano-dollar), then pm again after its price moved to $5/$6 ($0.0053)."""
    meter, _, ledger, tenant, _ = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(1))
    )
    models = {m.name: m for m in parse_config(TWO).models}
    est = Estimate(1000, 50, 50, True)
    assert (await meter.reserve(tenant, models["pm"], est)).cost_usd == Decimal("0.0032")
    assert (await meter.reserve(tenant, models["odd"], est)).cost_usd == Decimal("0.00017284")
    meter._live.prices.set("prov", Price(5e-6, 6e-6), model="pm")
    assert (await meter.reserve(tenant, models["pm"], est)).cost_usd == Decimal("0.0053")
    await ledger.close()


async def test_a_price_asked_without_a_prompt_length_is_the_base_rate(tmp_path: Path) -> None:
    """pm on prov at $3/$4 per M, $6/$8 from the first prompt token: a lookup that names no
    prompt length gets the base rates, one that names a one-token prompt the tier's."""
    meter, _, ledger, _, _ = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(1))
    )
    tiers = (PriceTier(1, 6e-6, 8e-6),)
    meter._live.prices.set("prov", Price(3e-6, 4e-6, tiers=tiers), model="pm")
    base = meter.prices.unit_prices("prov", "pm", 0)
    assert (base.input_per_m, base.output_per_m) == (Decimal(3), Decimal(4))
    one = meter.prices.unit_prices("prov", "pm", 0, prompt_tokens=1)
    assert (one.input_per_m, one.output_per_m) == (Decimal(6), Decimal(8))
    await ledger.close()


async def test_a_request_without_prompt_tokens_reserves_at_the_base_rate(tmp_path: Path) -> None:
    """pm on prov at $3/$4 per M, $6/$8 from the first prompt token: a request whose prompt
    counts no token reaches no tier, so 50 output tokens hold 50 x $4/M = $0.0002, not
    50 x $8/M = $0.0004; one prompt token reaches the tier: 1 x $6/M + 50 x $8/M."""
    meter, _, ledger, tenant, _ = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(1))
    )
    meter._live.prices.set("prov", Price(3e-6, 4e-6, tiers=(PriceTier(1, 6e-6, 8e-6),)), model="pm")
    pm = next(m for m in parse_config(TWO).models if m.name == "pm")
    empty = await meter.reserve(tenant, pm, Estimate(0, 50, 50, True))
    assert empty.cost_usd == Decimal("0.0002")
    one = await meter.reserve(tenant, pm, Estimate(1, 50, 50, True))
    assert one.cost_usd == Decimal("0.000406")
    await ledger.close()


async def test_attempts_that_never_answered_are_priced_at_the_tier_the_prompt_reached(
    tmp_path: Path,
) -> None:
    """pm on prov: $3/$4 per M, $6/$8 from 200,000 prompt tokens. A 250,000-token prompt
    sent and never answered costs 250,000 x $6/M = $1.50 on each row (a cut attempt's, the
    client's that left, a lost hedge's), not $0.75 at the base rate."""
    meter, admission, ledger, tenant, _ = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(10))
    )
    tiers = (PriceTier(200_000, 6e-6, 8e-6),)
    meter._live.prices.set("prov", Price(3e-6, 4e-6, tiers=tiers), model="pm")
    pm = next(m for m in parse_config(TWO).models if m.name == "pm")
    est = Estimate(250_000, 50, 50, True)
    completion = _completion(await meter.reserve(tenant, pm, est), 250_000, "pm")
    await meter.broken_attempts(completion, [SentAttempt("prov", "prov-m", 1)], lambda b: 1)
    await meter.left_before_answer(completion, [SentAttempt("prov", "prov-m", 2)], lambda b: 1)
    ((_, hedge, _),) = meter.hedge_prices(
        (SentAttempt("prov", "prov-m", 3),), "pm", lambda b: 1, prompt_tokens=250_000
    )
    assert (hedge.input_per_m, hedge.output_per_m) == (Decimal(6), Decimal(8))
    await ledger.close()
    cut, left = _ledger_rows(tmp_path / "ledger.db")
    assert (cut["outcome"], cut["cost_nusd"]) == ("upstream_cut", 1_500_000_000)
    assert (left["outcome"], left["cost_nusd"]) == ("client_disconnect", 1_500_000_000)
    assert left["price_in_nusd_per_m"] == 6_000_000_000
    # The tenant's budget holds exactly its row: $1.50 of its $10.
    assert await _fits(admission, Decimal("8.5"))
    assert not await _fits(admission, Decimal("8.500000001"))


async def test_a_reservation_bounds_every_backend_and_the_tier_the_prompt_reaches(
    tmp_path: Path,
) -> None:
    """The budget holds the most the request can cost wherever it is served.

    m on gpu (at most $0.025062657/M prompt, $5.263157895/M output: the profile's slowest
    figures) and prov ($1/$2): a 1,000,000-token prompt with 1 output token costs at most
    1.0 + 0.000002 = $1.000002 on prov, against $0.025062657 + $0.000005263 on the GPU (the
    dearer backend by its prices' sum). pm on prov at $3/$4, $6/$8 from 200,000 prompt tokens:
    250,000 x $6/M + 50 x $8/M = $1.5004, not $0.7502 at the base rate."""
    meter, _, ledger, tenant, _ = await _meter_with_ledger(
        tmp_path, TenantLimits.of(usd_total=Decimal(10))
    )
    models = {m.name: m for m in parse_config(TWO).models}
    long_prompt = await meter.reserve(tenant, models["m"], Estimate(1_000_000, 1, 1, True))
    assert long_prompt.cost_usd == Decimal("1.000002")
    long_output = await meter.reserve(tenant, models["m"], Estimate(1, 1_000_000, 1, True))
    assert long_output.cost_usd == Decimal("5.263157920")  # the GPU: 0.000000025 + 5.263157895
    tiers = (PriceTier(200_000, 6e-6, 8e-6),)
    meter._live.prices.set("prov", Price(3e-6, 4e-6, tiers=tiers), model="pm")
    tiered = await meter.reserve(tenant, models["pm"], Estimate(250_000, 50, 50, True))
    assert tiered.cost_usd == Decimal("1.5004")
    below = await meter.reserve(tenant, models["pm"], Estimate(199_999, 50, 50, True))
    assert below.cost_usd == Decimal("0.600197")  # 199,999 x $3/M + 50 x $4/M: the base tier
    await ledger.close()


async def test_without_a_ledger_the_budget_settles_to_the_rows_cost_all_the_same() -> None:
    """No ledger (no row is built): the budget is still charged what the row would have
    cost, rounded to the nano-dollar as a row is. odd's prices in force, $0.123456789 and
    $0.987654322 per million: 2000 x 0.123456789 + 10 x 0.987654322 = 256.79012122
    micro-dollars, 256,790 nano-dollars."""
    config = parse_config(TWO)
    live = LiveState({b.name: b for b in config.backends}, 0.0)
    budget = Decimal("0.001")
    admission = Admission({"t": TenantLimits.of(usd_total=budget)})
    meter = Meter(Tokenizer.estimate(), GatewayMetrics(), None, admission, live)
    odd = next(m for m in config.models if m.name == "odd")
    held = await meter.reserve(
        Tenant.from_spec(config.tenants[0]), odd, Estimate(1000, 50, 50, True)
    )
    completion = _completion(held, 1000, "odd")
    completion.backend, completion.backend_model, completion.attempt = "prov", "prov-m", 1
    completion.prices = meter.prices.unit_prices("prov", "odd", 1)
    answer = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 2000, "completion_tokens": 10, "total_tokens": 2010},
    }
    usage = await meter.finish(completion, outcome="ok", answer=answer, answer_bytes=100)
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (2000, 10)
    assert await _fits(admission, budget - Decimal("0.00025679"))
    assert not await _fits(admission, budget - Decimal("0.00025679") + Decimal("0.000000001"))
