"""LedgerRow: every field lands where its name says, in the INSERT's order and the spool's."""

from __future__ import annotations

import time

import pytest

from gateway.metering.ledger.rows import COLUMNS, LedgerRow, utc_day
from gateway.metering.money import UnitPrices
from gateway.metering.usage import Usage


def test_from_usage_puts_each_value_in_its_field() -> None:
    # Every value distinct, so a field built from the wrong argument shows.
    prices = UnitPrices.of("0.5", "1.5", "0.25", version="v7")
    alt = UnitPrices.of(2, 4, version="v7")
    usage = Usage(
        1000,
        200,
        cached_tokens=300,
        reasoning_tokens=40,
        source="counted",
        counted_prompt_tokens=1001,
        counted_completion_tokens=201,
    )
    row = LedgerRow.from_usage(
        request_id="req-1",
        attempt=3,
        ts=1_750_000_000.5,
        tenant="acme",
        model="m",
        backend="b",
        backend_model="bm",
        usage=usage,
        prices=prices,
        ttft_s=0.125,
        total_s=0.75,
        stream=True,
        outcome="upstream_cut",
        divergent=True,
        batch_size=6,
        is_local=True,
        client_request_id="client-9",
        marginal_cost_usd=0.000123,
        counterfactual=("alt", alt),
    )
    # 700 uncached x 0.5 + 300 cached x 0.25 + 200 x 1.5 = 725 micro-dollars
    assert row._asdict() == {
        "request_id": "req-1",
        "attempt": 3,
        "ts": 1_750_000_000.5,
        "tenant": "acme",
        "model": "m",
        "backend": "b",
        "backend_model": "bm",
        "prompt_tokens": 1000,
        "completion_tokens": 200,
        "cached_tokens": 300,
        "reasoning_tokens": 40,
        "token_source": "counted",
        "counted_prompt_tokens": 1001,
        "counted_completion_tokens": 201,
        "divergent": True,
        "price_in_nusd_per_m": 500_000_000,
        "price_out_nusd_per_m": 1_500_000_000,
        "price_cached_nusd_per_m": 250_000_000,
        "price_version": "v7",
        "cost_nusd": 725_000,
        "ttft_s": 0.125,
        "total_s": 0.75,
        "stream": True,
        "outcome": "upstream_cut",
        "batch_size": 6,
        "is_local": True,
        "client_request_id": "client-9",
        "marginal_cost_nusd": 123_000,
        # 1000 x 2 + 200 x 4 = 2800 micro-dollars (no cached price: input price)
        "counterfactual_cost_nusd": 2_800_000,
        "counterfactual_backend": "alt",
    }
    values = dict(zip(COLUMNS, row.as_tuple(), strict=True))
    assert values == {**row._asdict(), "day": "2025-06-15"}
    assert LedgerRow.from_json(row.to_json()) == row


@pytest.mark.parametrize(
    "ts", [0.0, 86_399.999, 86_400.0, 951_782_400.0, 1_750_000_000.5, 4_102_444_799.9, -0.5]
)
def test_utc_day_is_gmtimes_day(ts: float) -> None:
    assert utc_day(ts) == time.strftime("%Y-%m-%d", time.gmtime(ts))
