"""Versioned price book and price-feed parsing, including feeds that must be refused."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.metering.money import UnitPrices, cost_usd
from gateway.metering.usage import parse_usage_object
from policies.pricebook import (
    FeedError,
    Price,
    PriceBook,
    PriceTier,
    parse_neogate_feed,
    parse_openrouter_feed,
    parse_openrouter_rows,
)

OPENROUTER = {
    "data": [
        {
            "id": "meta-llama/llama-3.1-8b-instruct",
            "name": "Meta: Llama 3.1 8B Instruct",
            "pricing": {"prompt": "0.00000002", "completion": "0.00000005", "request": "0"},
        },
        {
            "id": "openai/gpt-4o-mini",
            "pricing": {
                "prompt": "0.00000015",
                "completion": "0.0000006",
                "input_cache_read": "0.000000075",
            },
        },
        {"id": "openrouter/auto", "pricing": {"prompt": "-1", "completion": "-1"}},
    ]
}


def test_price_per_million_and_cost_with_cached_tokens() -> None:
    p = Price.per_million(0.15, 0.60, 0.075)
    assert p.input_per_token == pytest.approx(0.15e-6)
    # 1000 prompt tokens of which 400 cached, 100 completion tokens.
    assert p.cost(1000, 100, cached_tokens=400) == pytest.approx(
        600 * 0.15e-6 + 400 * 0.075e-6 + 100 * 0.60e-6
    )
    # Without a cached price, cached tokens pay the input price.
    assert Price.per_million(1, 2).cost(1000, 0, cached_tokens=400) == pytest.approx(1000e-6)


def test_book_versions_and_lookup() -> None:
    book = PriceBook()
    b1 = book.with_price("groq", Price.per_million(0.05, 0.08))
    b2 = b1.with_price("groq", Price.per_million(0.59, 0.79), model="llama-3.3-70b-versatile")
    assert (book.version, b1.version, b2.version) == (0, 1, 2)
    assert b2.get("groq", "llama-3.3-70b-versatile") == Price.per_million(0.59, 0.79)
    assert b2.get("groq", "llama-3.1-8b-instant") == Price.per_million(0.05, 0.08)
    assert b2.get("together") is None
    assert book.get("groq") is None  # the old book is unchanged
    with pytest.raises(TypeError):
        b2.prices["x"] = Price(0, 0)  # type: ignore[index]


def test_with_prices_bumps_once_and_only_on_change() -> None:
    book = PriceBook().with_prices(
        {"groq": Price.per_million(0.05, 0.08), ("together", "m"): Price.per_million(0.18, 0.18)}
    )
    assert book.version == 1
    same = book.with_prices({"groq": Price.per_million(0.05, 0.08, source="feed", updated_at=9)})
    assert same is book
    moved = book.with_prices({"groq": Price.per_million(0.04, 0.08)})
    assert moved.version == 2 and moved.get("together", "m") is not None


def test_parse_openrouter_feed() -> None:
    prices = parse_openrouter_feed(json.loads(json.dumps(OPENROUTER)), now=5.0)
    assert set(prices) == {"meta-llama/llama-3.1-8b-instruct", "openai/gpt-4o-mini"}
    llama = prices["meta-llama/llama-3.1-8b-instruct"]
    assert llama.input_per_token == pytest.approx(2e-8)
    assert llama.output_per_token == pytest.approx(5e-8)
    assert llama.cached_input_per_token is None
    assert (llama.source, llama.updated_at) == ("openrouter", 5.0)
    assert prices["openai/gpt-4o-mini"].cached_input_per_token == pytest.approx(7.5e-8)


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ([], "not a JSON object"),
        ({"models": []}, "no 'data' list"),
        ({"data": ["x"]}, "data[0] is not an object"),
        ({"data": [{"pricing": {"prompt": "0", "completion": "0"}}]}, "id is missing"),
        ({"data": [{"id": "m"}]}, "pricing is missing"),
        ({"data": [{"id": "m", "pricing": {"prompt": "abc", "completion": "0"}}]}, "not a number"),
        ({"data": [{"id": "m", "pricing": {"prompt": "0.1", "completion": "0"}}]}, "implausible"),
        (
            {"data": [{"id": "m", "pricing": {"prompt": None, "completion": "0"}}]},
            "expected a number",
        ),
        ({"data": [{"id": "m", "pricing": {"prompt": "NaN", "completion": "0"}}]}, "finite"),
        ({"data": []}, "no usable prices"),
    ],
)
def test_malformed_openrouter_feeds_are_refused(feed: Any, message: str) -> None:
    with pytest.raises(FeedError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_openrouter_feed(feed)


def test_parse_neogate_feed() -> None:
    feed = {
        "prices": [
            {"backend": "groq", "input_per_million": 0.05, "output_per_million": 0.08},
            {
                "backend": "groq",
                "model": "llama-3.3-70b-versatile",
                "input_per_million": "0.59",
                "output_per_million": 0.79,
                "cached_input_per_million": 0.295,
            },
        ]
    }
    prices = parse_neogate_feed(feed)
    assert prices["groq"] == Price.per_million(0.05, 0.08, source="neogate-feed")
    big = prices[("groq", "llama-3.3-70b-versatile")]
    assert big.output_per_token == pytest.approx(0.79e-6)
    assert big.cached_input_per_token == pytest.approx(0.295e-6)
    book = PriceBook().with_prices(prices)
    assert book.get("groq", "llama-3.3-70b-versatile") is big


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ("prices", "not a JSON object"),
        ({"prices": {}}, "no 'prices' list"),
        ({"prices": [{"input_per_million": 1, "output_per_million": 1}]}, "backend is missing"),
        ({"prices": [{"backend": "g", "input_per_million": 1}]}, "required"),
        (
            {"prices": [{"backend": "g", "input_per_million": -1, "output_per_million": 1}]},
            "non-neg",
        ),
        (
            {"prices": [{"backend": "g", "input_per_million": True, "output_per_million": 1}]},
            "number",
        ),
        (
            {
                "prices": [
                    {"backend": "g", "model": 3, "input_per_million": 1, "output_per_million": 1}
                ]
            },
            "model",
        ),
        (
            {"prices": [{"backend": "g", "input_per_million": 1, "output_per_million": 1}] * 2},
            "listed twice",
        ),
        ({"prices": []}, "no prices"),
    ],
)
def test_malformed_neogate_feeds_are_refused(feed: Any, message: str) -> None:
    with pytest.raises(FeedError, match=message):
        parse_neogate_feed(feed)


# --- the recorded OpenRouter rows (tests/fixtures/wire/openrouter_models.json) -------------

WIRE = Path(__file__).resolve().parents[1] / "fixtures" / "wire"


def _listing() -> Any:
    return json.loads((WIRE / "openrouter_models.json").read_text())


def test_openrouter_rows_tiers_and_cache_writes() -> None:
    feed = parse_openrouter_rows(_listing(), now=1.0)
    assert "openrouter/auto" not in feed.prices and feed.skipped == ()
    sonnet = feed.prices["anthropic/claude-sonnet-4.5"]
    assert sonnet.cache_write_input_per_token == pytest.approx(3.75e-6)
    assert sonnet.tiers == (PriceTier(200000, input_per_token=6e-6),)
    long = sonnet.at_prompt(250_000)
    assert (long.input_per_token, long.output_per_token) == (6e-6, 15e-6)
    assert sonnet.at_prompt(199_999) is sonnet
    # 250k prompt: 10k cached, 40k written to the cache, 200k plain; 1k out.
    assert sonnet.cost(250_000, 1000, cached_tokens=10_000, cache_write_tokens=40_000) == (
        pytest.approx(200_000 * 6e-6 + 10_000 * 3e-7 + 40_000 * 3.75e-6 + 1000 * 15e-6)
    )
    opus = feed.prices["anthropic/claude-opus-4.8-fast"]
    assert opus.cache_write_input_per_token == pytest.approx(1.25e-5)


def test_one_bad_row_is_skipped_and_named() -> None:
    listing = _listing()
    listing["data"].insert(1, {"id": "bad/one", "pricing": {"prompt": "x", "completion": "0"}})
    listing["data"].append(
        {
            "id": "bad/tier",
            "pricing": {**listing["data"][0]["pricing"], "overrides": [{"prompt": "1"}]},
        }
    )
    listing["data"].append("not a row")
    feed = parse_openrouter_rows(listing)
    assert "openai/gpt-5" in feed.prices and "anthropic/claude-sonnet-4.5" in feed.prices
    assert [(s.id, s.index) for s in feed.skipped] == [("bad/one", 1), ("bad/tier", 6), ("", 7)]
    assert "min_prompt_tokens" in feed.skipped[1].reason
    assert parse_openrouter_feed(listing).keys() == feed.prices.keys()


def test_cache_write_tokens_are_parsed_and_priced_in_the_ledger_cost() -> None:
    usage = parse_usage_object(
        {
            "prompt_tokens": 1000,
            "completion_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 600},
        }
    )
    assert usage is not None and usage.cache_write_tokens == 600
    prices = UnitPrices.of(3, 15, 0.3, cache_write_input_per_m=3.75)
    assert cost_usd(usage, prices) == (
        Decimal(300 * 3 + 100 * Decimal("0.3") + 600 * Decimal("3.75") + 10 * 15) / 1_000_000
    )
