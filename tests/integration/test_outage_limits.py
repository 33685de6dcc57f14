"""Limits that hold: a burst of requests without max_tokens, and `serve --workers 2` through a Redis outage.

During a fail-open outage each of the N processes takes 1/N of what was left of every
budget and rate window at the last sync, and when Redis returns (even empty) rate
windows are rebuilt, so the processes together stay within each limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp import web

from loadtest.sim.common import start_site
from loadtest.sim.static import create_static_app
from tests.conftest import GatewayFactory
from tests.integration.test_redis_limits import PrivateRedis, TcpProxy, free_port

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parents[2]
KEY = "ng-outage-limits-key-0001"
SERVE = [sys.executable, "-m", "gateway.cli", "serve"]
# The static upstream's answer: 10 prompt + 16 completion tokens at $1/M in, $2/M out.
COST_NUSD = 10 * 1_000 + 16 * 2_000
NUSD = 1_000_000_000


# --- requests without max_tokens --------------------------------------------------------

LONG_ANSWER_TOKENS = 2000


async def _long_answers() -> tuple[web.AppRunner, int]:
    """An upstream whose answers run long when the request sets no max_tokens."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(0.3)  # every request of the burst is in flight at once
        completion = body.get("max_tokens") or LONG_ANSWER_TOKENS
        return web.json_response(
            {
                "id": "chatcmpl-long",
                "object": "chat.completion",
                "created": 1,
                "model": "long",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "word " * 50},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 10,
                    "completion_tokens": completion,
                    "total_tokens": 10 + completion,
                },
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return await start_site(app)


async def test_a_burst_without_max_tokens_stays_within_its_budget(
    gateway_factory: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, port = await _long_answers()
    monkeypatch.setenv("NEOGATE_BURST_KEY", KEY)
    budget = 0.41
    policy: dict[str, Any] = {
        "backends": [
            {
                "name": "long",
                "base_url": f"http://127.0.0.1:{port}/v1",
                "models": {"m": "long"},
                "price": {"input_per_million": 1.0, "output_per_million": 10.0},
            }
        ],
        "models": [{"name": "m", "backends": ["long"]}],
        "tenants": [
            {
                "name": "bursty",
                "api_keys": ["env:NEOGATE_BURST_KEY"],
                "budgets": {"usd_total": budget},
                "limits": {"max_tokens": 2048},
            }
        ],
        "ledger": {
            "kind": "sqlite",
            "path": str(tmp_path / "ledger.db"),
            "spool_path": str(tmp_path / "ledger.spool"),
        },
        "tokenizer": {"source": "bpe-openai"},
    }
    try:
        gw = await gateway_factory(policy, anonymous=False)
        body = {"model": "m", "messages": [{"role": "user", "content": "Tell me a story."}]}
        headers = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession() as http:

            async def one() -> int:
                async with http.post(gw.v1 + "/chat/completions", json=body, headers=headers) as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(one() for _ in range(50)))
        assert set(statuses) <= {200, 429}
        assert statuses.count(200) >= 5  # the budget is used, not refused outright
        with sqlite3.connect(tmp_path / "ledger.db") as db:
            (spent,) = db.execute("SELECT sum(cost_nusd) FROM ledger").fetchone()
        # Each answer costs ~$0.02: holding only the expected 256 tokens admitted all 50
        # ($1.00, 2.4x the budget); holding the key's 2,048-token cap keeps it within.
        assert spent <= budget * NUSD * 1.10, (spent, statuses.count(200))
    finally:
        await runner.cleanup()


# --- serve --workers 2 through a Redis outage ------------------------------------------


class Workers:
    """`neogate serve --workers 2` on one SQLite ledger, its limits shared through Redis."""

    def __init__(self, tmp: Path, redis_url: str) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        self.prefix = f"test-{uuid.uuid4().hex[:12]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "workers.log"

    def config(self, upstream_port: int, tenant: dict[str, Any]) -> dict[str, Any]:
        return {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "backends": [
                {
                    "name": "static",
                    "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                    "models": {"m": "static-model"},
                    "price": {"input_per_million": 1.0, "output_per_million": 2.0},
                }
            ],
            "models": [{"name": "m", "backends": ["static"]}],
            "tenants": [{"name": "t", "api_keys": ["env:NEOGATE_OUTAGE_KEY"], **tenant}],
            "ledger": {
                "kind": "sqlite",
                "path": str(self.tmp / "ledger.db"),
                "spool_path": str(self.tmp / "ledger.spool"),
            },
            "tokenizer": {"source": "bpe-openai"},
            "redis": {"url": self.redis_url, "key_prefix": self.prefix, "on_outage": "open"},
        }

    async def start(self, upstream_port: int, tenant: dict[str, Any]) -> None:
        cfg = self.tmp / "workers.yaml"
        cfg.write_text(yaml.safe_dump(self.config(upstream_port, tenant)))
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*SERVE, "--config", str(cfg), "--workers", "2"],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "NEOGATE_OUTAGE_KEY": KEY, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        # Ready when both workers have joined the limits' membership and the port answers.
        await self.wait_members(2, timeout=60)
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/readyz") as r:
                        if r.status == 200:
                            return
                assert self.proc.poll() is None and time.monotonic() < deadline, self.tail()
                await asyncio.sleep(0.05)

    async def members(self) -> int:
        client = aioredis.Redis.from_url(self.redis_url, socket_timeout=0.5)
        try:
            return int(await client.zcard(f"{self.prefix}:members"))
        except (OSError, aioredis.ConnectionError, aioredis.TimeoutError):
            return 0
        finally:
            await client.aclose()

    async def wait_members(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while await self.members() < n:
            assert self.proc is not None and self.proc.poll() is None, self.tail()
            assert time.monotonic() < deadline, self.tail()
            await asyncio.sleep(0.1)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait, 10)

    def spent_nusd(self) -> tuple[int, int]:
        """(rows, total cost) in the shared ledger."""
        with sqlite3.connect(self.tmp / "ledger.db") as db:
            rows, cost = db.execute(
                "SELECT count(*), coalesce(sum(cost_nusd), 0) FROM ledger"
            ).fetchone()
        return int(rows), int(cost)


@contextlib.asynccontextmanager
async def static_upstream() -> AsyncIterator[int]:
    runner, port = await start_site(create_static_app())
    try:
        yield port
    finally:
        await runner.cleanup()


async def requests(url: str, n: int, concurrency: int = 4) -> list[int]:
    """`n` chat requests, a new connection each (so both workers get a share)."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    headers = {"Authorization": f"Bearer {KEY}"}
    statuses: list[int] = []
    left = [n]
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                    await r.read()
                    statuses.append(r.status)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


@pytest.mark.slow
async def test_two_workers_share_what_was_left_of_a_budget_through_an_outage(
    tmp_path: Path,
) -> None:
    proxy = TcpProxy()
    await proxy.up()
    workers = Workers(tmp_path, proxy.url)
    budget_nusd = 2_000_000  # $0.002: 47 answers
    try:
        async with static_upstream() as port:
            await workers.start(port, {"budgets": {"usd_total": budget_nusd / NUSD}})
            first = await requests(workers.url, 30)
            assert first.count(200) == 30
            await asyncio.sleep(1.2)  # two syncs: both workers know the budget's state
            await proxy.down()  # Redis unreachable: each worker decides alone
            during = await requests(workers.url, 60)
            assert set(during) <= {200, 429}, during
            await proxy.up()
        rows, spent = workers.spent_nusd()
        assert rows == 30 + during.count(200)
        # Each worker seeding from the counters it last saw let both spend all that was
        # left (the budget ended ~1.4-2x over); 1/2 each keeps the pair within it, up to
        # one answer per worker (the reservation holds the gateway's own prompt count).
        assert spent <= budget_nusd + 2 * COST_NUSD, (spent, during.count(200))
        assert during.count(200) >= 5  # what was left was shared, not refused
    finally:
        await workers.stop()
        with contextlib.suppress(AssertionError):
            await proxy.down()


@pytest.mark.slow
async def test_two_workers_share_a_rate_limit_through_an_outage_and_an_empty_redis(
    tmp_path: Path,
) -> None:
    redis = PrivateRedis(free_port())
    await redis.start()
    workers = Workers(tmp_path, redis.url)
    rpm = 30  # a burst of 30, then one every 2 s
    admitted: list[int] = []
    try:
        async with static_upstream() as port:
            await workers.start(port, {"rate_limits": {"requests_per_minute": rpm}})
            started = time.monotonic()
            admitted += await requests(workers.url, 10)
            await asyncio.sleep(1.2)  # two syncs
            redis.kill()  # an outage; it comes back empty (no persistence)
            outage_end = time.monotonic() + 6
            while time.monotonic() < outage_end:
                admitted += await requests(workers.url, 8)
                await asyncio.sleep(0.2)
            in_outage = admitted.count(200) - 10
            await redis.start()
            await workers.wait_members(2)  # both workers are back on Redis
            admitted += await requests(workers.url, 40)  # a burst right after it returned
            elapsed = time.monotonic() - started
        assert set(admitted) <= {200, 429}
        # GCRA at 30/min admits at most 30 + elapsed/2 in `elapsed` seconds. Each worker on a
        # fresh local window admitted ~60 in the outage alone, and an empty Redis gave every
        # tenant a new minute of burst on its return.
        assert admitted.count(200) <= rpm + elapsed / 2 + 2, (admitted.count(200), elapsed)
        assert in_outage >= 5, in_outage  # what was left was shared, not refused
    finally:
        await workers.stop()
        redis.kill()
