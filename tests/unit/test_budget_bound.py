"""A budget reservation is an upper bound of the attributed cost it settles to (local GPU)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.admission import Admission, AdmissionRejected, TenantLimits
from gateway.auth import Tenant
from gateway.config import parse_config
from gateway.estimate import Estimate
from gateway.live import LiveState
from gateway.metering import Meter
from gateway.metrics import GatewayMetrics
from gateway.tokenizer import Tokenizer
from gateway.usage import Usage, cost_usd

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
    prices = meter.unit_prices("gpu", "m", 8, context=9050)
    usage = Usage(9000, 100, cached_tokens=4000, source="reported")
    attributed = cost_usd(usage, prices)
    assert float(attributed) == pytest.approx(PER_S * (5000 / 39900 + 100 / 1274), rel=1e-6)
    assert attributed < held.cost_usd
    # The worst case it reserved for (batch 1, no cache hit, every token produced) is
    # attributed at most the reservation.
    alone = cost_usd(
        Usage(9000, 100, source="reported"), meter.unit_prices("gpu", "m", 1, context=9050)
    )
    assert alone <= held.cost_usd
    await admission.settle(held, usage.total_tokens, attributed)
    # The budget now holds exactly the attributed cost: what is left fits, a cent more not.
    left = Decimal("0.000752") - attributed
    fits = await admission.reserve("t", 0, left)
    await admission.release(fits)
    with pytest.raises(AdmissionRejected):
        await admission.reserve("t", 0, left + Decimal("0.000000001"))
