"""Budgets and rate limits through the real gateway: reservations under concurrency, 429s, restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
from aiohttp import web
from openai import AsyncOpenAI

from tests.integration.test_metering_e2e import (
    ADMIN_KEY,
    MSG,
    e2e_policy,
    metric,
    new_rid,
    only_row,
    rows_for,
    scrape,
    sqlite_rows,
    start_gateway,
    start_sims,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

# One reservation on groq-8b with max_tokens=1000 holds ~1000 x 0.08 $/M = ~8.1e-5 USD:
# one fits in this budget, two do not.
CAPPED_USD = 0.00012
SEEDED_TOKENS = 150
# slow-8b reserves ~50 tokens x 3.82 $/M (a GPU at batch 1) = ~1.9e-4 USD: one fits, two do not.
LEAVING_USD = 0.0003


def budget_policy(urls: dict[str, str], data: Path) -> dict[str, Any]:
    policy = e2e_policy(urls, data)
    policy["tenants"] = [
        {"name": "capped", "budgets": {"usd_total": CAPPED_USD}},
        {"name": "limited", "rate_limits": {"requests_per_minute": 2}},
        {"name": "seeded", "budgets": {"tokens_total": SEEDED_TOKENS}},
        {"name": "leaving", "budgets": {"usd_total": LEAVING_USD}},
    ]
    return policy


@dataclass
class Env:
    url: str
    ledger: Path
    policy: dict[str, Any]
    keys: dict[str, str]

    def client(self, tenant: str, **kw: Any) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.url + "/v1", api_key=self.keys[tenant], **kw)


async def create_key(url: str, tenant: str) -> str:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url + "/admin/keys",
            json={"tenant": tenant, "label": "e2e"},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ) as r,
    ):
        assert r.status == 201, await r.text()
        key: str = (await r.json())["key"]
        return key


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    data = tmp_path_factory.mktemp("budgets")
    # A provider slow enough (~0.1 s to the first token) that concurrent requests overlap.
    urls, sims = await start_sims(provider_time_scale=0.5)
    policy = budget_policy(urls, data)
    runner, url = await start_gateway(policy, anonymous=False)
    try:
        keys = {t: await create_key(url, t) for t in ("capped", "limited", "seeded", "leaving")}
        yield Env(url, data / "ledger.db", policy, keys)
    finally:
        await runner.cleanup()
        for r in sims:
            await r.cleanup()


async def test_two_concurrent_requests_race_one_budget(env: Env) -> None:
    before = await scrape(env.url)
    rids = [new_rid("race"), new_rid("race")]
    # Default SDK retries on: `x-should-retry: false` must stop it from trying again.
    async with env.client("capped") as oai:

        async def one(rid: str) -> Any:
            return await oai.chat.completions.with_raw_response.create(
                model="groq-8b", messages=MSG, max_tokens=1000, extra_headers={"x-request-id": rid}
            )

        results = await asyncio.gather(*(one(r) for r in rids), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(ok) == 1 and len(refused) == 1, results
    err = refused[0]
    assert isinstance(err, openai.RateLimitError)
    assert err.status_code == 429
    assert err.code == "usd_total"
    assert err.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in err.response.headers
    after = await scrape(env.url)
    rejected = metric(after, "neogate_rejections_total", reason="usd_total") - metric(
        before, "neogate_rejections_total", reason="usd_total"
    )
    assert rejected == 1, "the SDK did not retry the refused request"
    # Only the admitted request has a row; its real cost settled the reservation.
    winner = ok[0].headers["x-client-request-id"]
    loser = next(r for r in rids if r != winner)
    row = only_row(await rows_for(env.ledger, winner))
    assert row["tenant"] == "capped" and 0 < row["cost_nusd"] < CAPPED_USD * 1e9
    assert await rows_for(env.ledger, loser) == []
    # Settled at the real (smaller) cost: the next request fits again.
    async with env.client("capped", max_retries=0) as oai:
        reply = await oai.chat.completions.create(model="groq-8b", messages=MSG, max_tokens=1000)
        assert reply.choices


async def test_rate_limit_429_with_retry_after(env: Env) -> None:
    async with env.client("limited", max_retries=0) as oai:
        refused: openai.RateLimitError | None = None
        for _ in range(4):
            try:
                await oai.chat.completions.create(model="local-8b", messages=MSG, max_tokens=2)
            except openai.RateLimitError as exc:
                refused = exc
                break
    assert refused is not None, "2 requests per minute must refuse within 4 requests"
    assert refused.code == "requests_per_minute"
    headers = refused.response.headers
    assert float(headers["retry-after"]) > 0 and int(headers["retry-after-ms"]) > 0
    assert headers["x-should-retry"] == "true"
    body = refused.body
    assert isinstance(body, dict) and "requests per minute" in body["message"]


async def test_token_budget_survives_restart(env: Env) -> None:
    """Budgets start from what the ledger says was spent: a restart does not reset them."""
    used = 0
    async with env.client("seeded", max_retries=0) as oai:
        with pytest.raises(openai.RateLimitError) as refused:
            for _ in range(10):
                reply = await oai.chat.completions.create(
                    model="groq-8b", messages=MSG, max_tokens=20
                )
                assert reply.usage is not None
                used += reply.usage.total_tokens
    assert refused.value.code == "tokens_total"
    assert 0 < used <= SEEDED_TOKENS
    rows = await asyncio.to_thread(sqlite_rows, env.ledger, "tenant = ?", ["seeded"])
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows) == used
    # A second gateway over the same ledger (a restart) refuses the same tenant at once.
    runner: web.AppRunner | None = None
    try:
        runner, url = await start_gateway(env.policy, anonymous=False)
        async with AsyncOpenAI(
            base_url=url + "/v1", api_key=env.keys["seeded"], max_retries=0
        ) as oai:
            with pytest.raises(openai.RateLimitError) as again:
                await oai.chat.completions.create(model="groq-8b", messages=MSG, max_tokens=20)
        assert again.value.code == "tokens_total"
    finally:
        if runner is not None:
            await runner.cleanup()


async def settled(url: str, within_s: float = 10.0) -> None:
    """Wait until no request is in flight at any backend (polled, not slept: CI is noisy)."""
    deadline = time.monotonic() + within_s
    while metric(await scrape(url), "neogate_backend_inflight_requests") > 0:
        assert time.monotonic() < deadline, "a request that the client left is still in flight"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True])
async def test_client_that_leaves_gives_its_reservation_back(env: Env, stream: bool) -> None:
    """A client that hangs up must not keep budget reserved: the next request is admitted."""
    async with env.client("leaving", max_retries=0, timeout=0.15) as oai:
        for _ in range(3):
            # ~50 tokens at ~9 ms each: the client leaves long before the answer is done.
            if stream:
                chunks = await oai.chat.completions.create(
                    model="slow-8b", messages=MSG, max_tokens=50, stream=True
                )
                async for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        break
                await chunks.close()
            else:
                with pytest.raises(openai.APITimeoutError):
                    await oai.chat.completions.create(model="slow-8b", messages=MSG, max_tokens=50)
            await settled(env.url)  # the gateway noticed the hang-up and settled
