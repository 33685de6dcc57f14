"""The price feed end to end: a real feed server, the gateway's poller, prices in force, failures kept out.

A tiny aiohttp server serves a neogate JSON feed and an OpenRouter `/api/v1/models`
body; the gateway polls it every 50 ms. Two providers serve the public model (both
backed by one simulated provider), and the cost policy sends each request to the one
that is cheaper at the prices in force, so a price the feed applies shows up in where
traffic goes as well as in GET /admin/prices.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from loadtest.sim.common import start_site
from loadtest.sim.provider import ProviderOptions, create_provider_app
from tests.conftest import ADMIN_KEY, GatewayFactory
from tests.integration.test_metering_e2e import metric, scrape

PUBLIC = "llama-3.1-8b"
BACKEND_MODEL = "llama-3.1-8b-instant"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG = [{"role": "user", "content": "Price check."}]
OR_ID = "meta-llama/llama-3.1-8b-instruct:cheap"
WIRE = Path(__file__).resolve().parents[1] / "fixtures" / "wire"


@dataclass
class Feed:
    """What the feed server answers: a JSON body, broken JSON, or an error status."""

    neogate: Any = None
    openrouter: Any = None
    mode: str = "ok"  # ok | malformed | error
    hits: dict[str, int] = field(default_factory=lambda: {"neogate": 0, "openrouter": 0})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/neogate.json", self._serve("neogate"))
        app.router.add_get("/api/v1/models", self._serve("openrouter"))
        return app

    def _serve(self, which: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            self.hits[which] += 1
            if self.mode == "error":
                return web.Response(status=500, text="feed backend down")
            if self.mode == "malformed":
                return web.Response(
                    body=b'{"prices": [{"backend": ', content_type="application/json"
                )
            return web.json_response(getattr(self, which))

        return handler


@dataclass
class Setup:
    gw: str
    feed: Feed
    feed_runner: web.AppRunner


@pytest.fixture
async def provider_url() -> AsyncIterator[str]:
    runner, port = await start_site(
        create_provider_app(ProviderOptions(time_scale=0.05, ttft_s_mean=0.2))
    )
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


def gateway_policy(url: str, feed: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    def backend(name: str, inp: float, out: float) -> dict[str, Any]:
        return {
            "name": name,
            "kind": "groq",
            "base_url": url,
            "models": {PUBLIC: BACKEND_MODEL},
            "price": {"input_per_million": inp, "output_per_million": out},
        }

    return {
        "backends": [backend("cheap", 0.05, 0.08), backend("dear", 0.5, 0.8)],
        "models": [{"name": PUBLIC, "backends": ["cheap", "dear"], "policy": {"kind": "cost"}}],
        "price_feed": {"interval_s": 0.05, **feed},
        "ledger": {
            "kind": "sqlite",
            "path": str(tmp_path / "ledger.db"),
            "spool_path": str(tmp_path / "ledger.spool"),
        },
        "tokenizer": {"source": "estimate"},
    }


async def prices(http: aiohttp.ClientSession, gw: str) -> dict[str, Any]:
    async with http.get(gw + "/admin/prices", headers=ADMIN) as r:
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


def price_of(book: dict[str, Any], backend: str, model: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = next(
        p for p in book["prices"] if p["backend"] == backend and p["model"] == model
    )
    return row


async def routed(http: aiohttp.ClientSession, gw: str) -> tuple[str, int]:
    """Backend and price version of one request's answer."""
    body = {"model": PUBLIC, "messages": MSG, "max_tokens": 8}
    async with http.post(gw + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        return r.headers["x-neogate-backend"], int(r.headers["x-neogate-price-version"])


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll a condition on the running servers until it holds (the poller runs on its own clock)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def failures(gw: str) -> float:
    return metric(await scrape(gw), "neogate_price_feed_failures_total")


async def test_neogate_feed_applies_prices_and_keeps_last_good_on_failures(
    gateway_factory: GatewayFactory,
    provider_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="neogate.background")
    feed = Feed(
        neogate={
            "prices": [{"backend": "cheap", "input_per_million": 2.0, "output_per_million": 2.0}]
        }
    )
    feed_runner, port = await start_site(feed.app())
    try:
        gw = await gateway_factory(
            gateway_policy(
                provider_url,
                {"url": f"http://127.0.0.1:{port}/neogate.json", "format": "neogate"},
                tmp_path,
            )
        )
        async with aiohttp.ClientSession() as http:

            async def feed_applied() -> bool:
                return price_of(await prices(http, gw.url), "cheap")["source"] == "neogate-feed"

            await eventually(feed_applied)
            book1 = await prices(http, gw.url)
            moved = await routed(http, gw.url)

            # A model-specific price naming the backend's own model id (as the feed format
            # documents it) prices that backend's public model.
            feed.neogate = {
                "prices": [
                    {"backend": "cheap", "input_per_million": 2.0, "output_per_million": 2.0},
                    {"backend": "dear", "model": BACKEND_MODEL,
                     "input_per_million": 3.0, "output_per_million": 3.0},
                ]
            }  # fmt: skip

            async def version_moved() -> bool:
                return (await prices(http, gw.url))["version"] > book1["version"]

            await eventually(version_moved)
            book2 = await prices(http, gw.url)
            back = await routed(http, gw.url)
            # Unchanged rates on later polls do not move the version.
            hits = feed.hits["neogate"]
            await eventually(lambda: _more(feed, "neogate", hits + 3))
            steady = (await prices(http, gw.url))["version"]

            # Broken feeds: counted and logged, the last good prices stay in force.
            for mode in ("malformed", "error"):
                feed.mode = mode
                before = await failures(gw.url)
                await eventually(lambda b=before: _more_failures(gw.url, b))
                assert (await prices(http, gw.url)) == book2
            await feed_runner.cleanup()  # unreachable
            before = await failures(gw.url)
            await eventually(lambda: _more_failures(gw.url, before))
            kept = await prices(http, gw.url)
            still = await routed(http, gw.url)
    finally:
        await feed_runner.cleanup()

    v1 = book1["version"]
    assert v1 >= 1
    assert price_of(book1, "cheap")["output_per_million"] == pytest.approx(2.0)
    assert moved == ("dear", v1)  # cheap now costs 2 $/M, dear 0.8
    assert book2["version"] == steady > v1
    assert price_of(book2, "dear", PUBLIC)["output_per_million"] == pytest.approx(3.0)
    assert back == ("cheap", book2["version"])  # dear's model now costs 3 $/M
    assert kept == book2 and still == back
    assert any("price feed" in r.getMessage() for r in caplog.records)


async def _more(feed: Feed, which: str, n: int) -> bool:
    return feed.hits[which] >= n


async def _more_failures(gw: str, before: float) -> bool:
    return await failures(gw) > before


async def test_openrouter_feed_prices_mapped_ids_and_rejects_malformed(
    gateway_factory: GatewayFactory, provider_url: str, tmp_path: Path
) -> None:
    feed = Feed(
        openrouter={
            "data": [
                {"id": OR_ID, "pricing": {"prompt": "0.000002", "completion": "0.000002"}},
                # Router-priced entries ("-1") and unmapped ids are ignored.
                {"id": "openrouter/auto", "pricing": {"prompt": "-1", "completion": "-1"}},
                {"id": "other/model", "pricing": {"prompt": "0.001", "completion": "0.001"}},
            ]
        }
    )
    feed_runner, port = await start_site(feed.app())
    try:
        gw = await gateway_factory(
            gateway_policy(
                provider_url,
                {
                    "url": f"http://127.0.0.1:{port}/api/v1/models",
                    "format": "openrouter",
                    "map": {OR_ID: f"cheap/{PUBLIC}"},
                },
                tmp_path,
            )
        )
        async with aiohttp.ClientSession() as http:

            async def feed_applied() -> bool:
                book = await prices(http, gw.url)
                return any(p["source"] == "openrouter" for p in book["prices"])

            await eventually(feed_applied)
            book = await prices(http, gw.url)
            moved = await routed(http, gw.url)
            # Well-formed JSON in the wrong shape is as bad as broken JSON.
            feed.openrouter = {"data": [{"id": OR_ID}]}
            before = await failures(gw.url)
            await eventually(lambda: _more_failures(gw.url, before))
            kept = await prices(http, gw.url)
            still = await routed(http, gw.url)
    finally:
        await feed_runner.cleanup()

    row = price_of(book, "cheap", PUBLIC)
    assert row["source"] == "openrouter"
    assert (row["input_per_million"], row["output_per_million"]) == pytest.approx((2.0, 2.0))
    assert {p["backend"] for p in book["prices"]} == {"cheap", "dear"}
    assert moved == ("dear", book["version"]) and book["version"] >= 1
    assert kept == book and still == moved


async def test_one_bad_openrouter_row_is_skipped_and_reported_not_the_whole_feed(
    gateway_factory: GatewayFactory, provider_url: str, tmp_path: Path
) -> None:
    """The recorded OpenRouter rows (tests/fixtures/wire/openrouter_models.json, with tiers,
    cache-write prices and a "-1" router row) plus one malformed row."""
    listing = json.loads((WIRE / "openrouter_models.json").read_text())
    listing["data"].append({"id": "broken/model", "pricing": {"prompt": "n/a", "completion": "0"}})
    feed = Feed(openrouter=listing)
    feed_runner, port = await start_site(feed.app())
    try:
        gw = await gateway_factory(
            gateway_policy(
                provider_url,
                {
                    "url": f"http://127.0.0.1:{port}/api/v1/models",
                    "format": "openrouter",
                    "map": {"anthropic/claude-sonnet-4.5": f"cheap/{PUBLIC}"},
                },
                tmp_path,
            )
        )
        async with aiohttp.ClientSession() as http:

            async def feed_applied() -> bool:
                book = await prices(http, gw.url)
                return any(p["source"] == "openrouter" for p in book["prices"])

            await eventually(feed_applied)
            book = await prices(http, gw.url)
            samples = await scrape(gw.url)
    finally:
        await feed_runner.cleanup()
    row = price_of(book, "cheap", PUBLIC)
    assert (row["input_per_million"], row["output_per_million"]) == pytest.approx((3.0, 15.0))
    assert row["cached_input_per_million"] == pytest.approx(0.3)
    assert row["cache_write_input_per_million"] == pytest.approx(3.75)
    assert len(row["tiers"]) == 1 and row["tiers"][0]["min_prompt_tokens"] == 200000
    assert row["tiers"][0]["input_per_million"] == pytest.approx(6.0)
    (skipped,) = book["feed_skipped_rows"]
    assert skipped["id"] == "broken/model" and "not a number" in skipped["reason"]
    assert metric(samples, "neogate_price_feed_skipped_rows") == 1
    assert metric(samples, "neogate_price_feed_failures_total") == 0


async def test_a_long_prompt_is_billed_at_its_openrouter_tier(
    gateway_factory: GatewayFactory, provider_url: str, tmp_path: Path
) -> None:
    """A row shaped like the recorded claude-sonnet-4.5 one (tests/fixtures/wire/
    openrouter_models.json), its `overrides` tier moved down to 200 prompt tokens so a
    test prompt can reach it."""
    row = json.loads((WIRE / "openrouter_models.json").read_text())["data"][0]
    row["pricing"]["overrides"][0]["min_prompt_tokens"] = 200
    feed = Feed(openrouter={"data": [row]})
    feed_runner, port = await start_site(feed.app())
    try:
        policy = gateway_policy(
            provider_url,
            {
                "url": f"http://127.0.0.1:{port}/api/v1/models",
                "format": "openrouter",
                "map": {row["id"]: f"cheap/{PUBLIC}"},
            },
            tmp_path,
        )
        policy["models"][0]["policy"] = {"kind": "pinned", "order": ["cheap", "dear"]}
        gw = await gateway_factory(policy)
        async with aiohttp.ClientSession() as http:

            async def feed_applied() -> bool:
                book = await prices(http, gw.url)
                return any(p["source"] == "openrouter" for p in book["prices"])

            await eventually(feed_applied)
            for rid, words in (("short-prompt", 10), ("long-prompt", 400)):
                body = {
                    "model": PUBLIC,
                    "messages": [{"role": "user", "content": " ".join(["price"] * words)}],
                    "max_tokens": 4,
                }
                async with http.post(
                    gw.url + "/v1/chat/completions", json=body, headers={"x-request-id": rid}
                ) as r:
                    assert r.status == 200, await r.text()
    finally:
        await feed_runner.cleanup()
    conn = sqlite3.connect(f"file:{tmp_path / 'ledger.db'}?mode=ro", uri=True)
    try:
        got = dict(
            conn.execute(
                "SELECT client_request_id, price_in_nusd_per_m FROM ledger"
                " WHERE client_request_id IN ('short-prompt', 'long-prompt')"
            ).fetchall()
        )
    finally:
        conn.close()
    assert got == {"short-prompt": 3_000_000_000, "long-prompt": 6_000_000_000}  # $3 / $6 per M
