"""Replicas sharing state through the real Redis (and the ledger through the real PostgreSQL).

The first half runs `SharedState` objects side by side in this process, each with
its own Redis connection and its own LiveState, as separate replicas would have.
The second half runs real `neogate serve` processes against a shared Redis and
PostgreSQL and drives them over HTTP.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
import yaml
from multidict import CIMultiDict

from gateway.config import GatewayConfig, RedisSpec, parse_config
from gateway.metering.ledger.key_tables import SqliteKeyBackend
from gateway.state.keys import KeyStore
from gateway.state.live import LiveState
from gateway.state.shared import publish_keys_changed
from gateway.state.shared.redis_limits import connect
from gateway.state.shared.redis_state import SharedState
from policies.latency import LatencySample
from policies.pricebook import Price
from tests.integration.test_redis_limits import PrivateRedis

REDIS_URL = "redis://127.0.0.1:6379/0"


def small_config() -> GatewayConfig:
    text = yaml.safe_dump(
        {
            "backends": [
                {
                    "name": name,
                    "kind": "openai_compatible",
                    "base_url": f"http://127.0.0.1:{port}/v1",
                    "models": {"m": "m"},
                    "price": {"input_per_million": 1.0, "output_per_million": 2.0},
                }
                for name, port in (("cheap", 9), ("dear", 10))
            ],
            "models": [{"name": "m", "backends": ["cheap", "dear"]}],
        }
    )
    return parse_config(text)


async def wait_for(cond: Callable[[], bool], timeout: float = 1.0) -> float:
    """Seconds until `cond` held (another replica makes it true); fails past `timeout`."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


class Replicas:
    """Builds in-process replicas on one Redis prefix; closes them all."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.config = small_config()
        self.states: list[SharedState] = []
        self.clients: list[aioredis.Redis] = []

    async def start(self, keys: KeyStore | None = None) -> SharedState:
        client = connect(RedisSpec(url=REDIS_URL))
        self.clients.append(client)
        live = LiveState({b.name: b for b in self.config.backends}, time.time())
        state = SharedState(client, self.prefix, live, keys, tick_s=0.02)
        await state.start()
        self.states.append(state)
        return state

    async def close(self) -> None:
        for s in self.states:
            await s.close()
        for c in self.clients:
            keys = [k async for k in c.scan_iter(match=f"{self.prefix}:*")]
            if keys:
                await c.delete(*keys)
            await c.aclose()


@pytest.fixture
async def replicas() -> AsyncIterator[Replicas]:
    r = Replicas(f"test-{uuid.uuid4().hex[:12]}")
    yield r
    await r.close()


def out_updates(state: SharedState, kind: str) -> float:
    value = state.metrics.updates.labels("out", kind)._value.get()
    return float(value)


async def test_an_ejection_reaches_the_other_replica_within_a_second(replicas: Replicas) -> None:
    a, b = await replicas.start(), await replicas.start()
    now = time.time()
    breaker_a = a.live.backends["cheap"].breaker
    for _ in range(breaker_a.config.consecutive_failures):
        breaker_a.on_failure(now)
    assert not breaker_a.available(now)
    took = await wait_for(lambda: not b.live.backends["cheap"].breaker.available(time.time()))
    assert took < 1.0
    assert b.live.backends["dear"].breaker.available(time.time())
    assert out_updates(a, "eject") == 1
    # B adopted it; B does not publish it back as its own discovery. No fixed wait: B then
    # makes a discovery of its own, and once A has it, anything B queued before it (a
    # re-published "cheap") has gone out too: B's updates leave in order.
    breaker_b = b.live.backends["dear"].breaker
    for _ in range(breaker_b.config.consecutive_failures):
        breaker_b.on_failure(time.time())
    await wait_for(lambda: not a.live.backends["dear"].breaker.available(time.time()))
    assert out_updates(b, "eject") == 1, "B re-published the ejection it adopted"


async def test_cooldown_latency_and_headroom_are_shared(replicas: Replicas) -> None:
    a, b = await replicas.start(), await replicas.start()
    now = time.time()
    a.live.observe_429("dear", 30.0, now)
    a.live.observe_headers(
        "cheap",
        {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "10",
         "x-ratelimit-reset-tokens": "20s"},
        now,
    )  # fmt: skip
    for _ in range(5):
        a.live.observe_latency("cheap", "m", LatencySample(ttft_s=2.0, itl_s=0.05))
    await wait_for(lambda: b.live.backends["dear"].headroom.cooling_down(time.time()))
    await wait_for(lambda: b.live.backends["cheap"].headroom.remaining_tokens == 10)
    room = b.live.backends["cheap"].headroom
    assert room.limit_tokens == 1000
    assert room.reset_tokens_at == pytest.approx(now + 20, abs=0.01)
    # The remote estimate is folded in: B's prior (0.35 s) moves to what A measured.
    await wait_for(lambda: b.live.backends["cheap"].estimate("m").ttft.mean > 1.5)
    assert b.live.backends["cheap"].estimate("m").itl.mean == pytest.approx(0.05, rel=0.2)


async def test_a_price_change_reaches_every_replica(replicas: Replicas) -> None:
    a, b, c = await replicas.start(), await replicas.start(), await replicas.start()
    before = b.live.prices.book.version
    a.live.prices.set("dear", Price.per_million(0.1, 0.2, source="admin"), "m")
    for other in (b, c):
        book = other.live.prices
        await wait_for(lambda b=book: b.book.prices.get(("dear", "m")) is not None)  # type: ignore[misc]
        got = book.book.get("dear", "m")
        assert got is not None
        assert got.output_per_token == pytest.approx(0.2e-6)
        assert got.source == "admin"
    assert b.live.prices.book.version == before + 1
    # Applied, not re-published: B's own later change reaches A, and B published only that
    # one (its updates leave in order, so a re-publish would have gone out first).
    b.live.prices.set("cheap", Price.per_million(0.3, 0.4, source="admin"), "m")
    await wait_for(lambda: a.live.prices.book.prices.get(("cheap", "m")) is not None)
    assert out_updates(b, "price") == 1, "B re-published the price it applied"


async def test_a_late_joiner_catches_up_from_the_snapshot(replicas: Replicas) -> None:
    a = await replicas.start()
    now = time.time()
    breaker = a.live.backends["cheap"].breaker
    for _ in range(breaker.config.consecutive_failures):
        breaker.on_failure(now)
    a.live.prices.set("cheap", Price.per_million(5.0, 6.0, source="admin"))
    a.tick()
    await a.flush()
    late = await replicas.start()  # started after the messages went out
    assert not late.live.backends["cheap"].breaker.available(time.time())
    price = late.live.prices.book.get("cheap")
    assert price is not None and price.input_per_token == pytest.approx(5e-6)


async def test_a_key_change_makes_other_replicas_refresh_at_once(
    replicas: Replicas, tmp_path: Path
) -> None:
    db = tmp_path / "keys.db"
    store_a = KeyStore(SqliteKeyBackend(db), b"secret")
    store_b = KeyStore(SqliteKeyBackend(db), b"secret")
    await store_a.open()
    key_id, key = await store_a.create("acme")
    await store_b.open()
    assert store_b.authenticate(key) == "acme"
    a = await replicas.start(store_a)
    await replicas.start(store_b)
    await store_a.revoke(key_id)
    a.keys_changed()
    took = await wait_for(lambda: store_b.authenticate(key) is None)
    assert took < 1.0
    # The CLI, outside any replica, can do the same.
    key_id2, key2 = await store_a.create("acme")
    await store_b.refresh()
    await store_a.revoke(key_id2)
    await publish_keys_changed(RedisSpec(url=REDIS_URL, key_prefix=replicas.prefix))
    await wait_for(lambda: store_b.authenticate(key2) is None)


async def test_a_backend_the_other_config_lacks_is_ignored(replicas: Replicas) -> None:
    a, b = await replicas.start(), await replicas.start()
    b.receive(
        b'{"o": "elsewhere", "u": [{"k": "eject", "b": "nope", "until": 1e12, "t": 1.0},'
        b' {"k": "lat", "b": "cheap", "m": "unknown-model", "ttft": 1, "t": 1.0}, {"k": 3}]}'
    )
    b.receive(b"not json")
    b.tick()
    assert all(x.breaker.available(time.time()) for x in b.live.backends.values())
    assert "unknown-model" not in b.live.backends["cheap"].latency
    del a


# --- real `neogate serve` processes ----------------------------------------------------

ADMIN = "ng-admin-replicas-test-0001"
ACME_KEY = "ng-acme-replicas-test-0001"
BETA_KEY = "ng-beta-replicas-test-0001"
GAMMA_KEY = "ng-gamma-replicas-test-0001"
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
ROOT = Path(__file__).resolve().parents[2]
# Static upstream answers: 10 prompt + 16 completion tokens at $1/M in, $2/M out.
COST_NUSD = 10 * 1_000 + 16 * 2_000


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Replica:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    log_file: Any

    def tail(self) -> str:
        return f"--- {self.name} ---\n" + "\n".join(
            self.log.read_text(errors="replace").splitlines()[-40:]
        )


class Cluster:
    """Gateway processes sharing one Redis prefix and one PostgreSQL schema."""

    def __init__(self, tmp: Path, redis_url: str = REDIS_URL, on_outage: str = "open") -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        self.on_outage = on_outage
        self.prefix = f"test-{uuid.uuid4().hex[:12]}"
        self.schema = f"t_{uuid.uuid4().hex[:12]}"
        self.replicas: list[Replica] = []
        self.upstream: Any = None

    async def start_upstream(self) -> None:
        from loadtest.sim.common import start_site
        from loadtest.sim.static import create_static_app

        self.upstream, self.upstream_port = await start_site(create_static_app())

    def policy(self, port: int) -> dict[str, Any]:
        static = {"input_per_million": 1.0, "output_per_million": 2.0}
        return {
            "listen": {"host": "127.0.0.1", "port": port},
            "admin": {"api_key": "env:NEOGATE_ADMIN_KEY"},
            "auth": {"server_secret": "env:NEOGATE_SECRET"},
            "backends": [
                {
                    "name": "static",
                    "base_url": f"http://127.0.0.1:{self.upstream_port}/v1",
                    "models": {"m": "static-model", "m2": "static-model"},
                    "price": static,
                },
                {
                    # Nothing listens here: every attempt fails at connect.
                    "name": "broken",
                    "base_url": f"http://127.0.0.1:{free_port()}/v1",
                    "models": {"m2": "x"},
                    "price": {"input_per_million": 0.01, "output_per_million": 0.01},
                    "timeouts": {"connect_s": 0.5},
                },
            ],
            "models": [
                {"name": "m", "backends": ["static"]},
                {"name": "m2", "backends": ["broken", "static"]},
            ],
            "tenants": [
                {
                    "name": "acme",
                    "api_keys": ["env:ACME_KEY"],
                    "budgets": {"usd_total": 0.002},
                },
                {
                    "name": "beta",
                    "api_keys": ["env:BETA_KEY"],
                    "rate_limits": {"requests_per_minute": 30},
                },
                {
                    "name": "gamma",
                    "api_keys": ["env:GAMMA_KEY"],
                    "budgets": {"usd_total": 1000},
                    "rate_limits": {"requests_per_minute": 1_000_000},
                },
            ],
            "ledger": {
                "kind": "postgres",
                "dsn": PG_DSN,
                "schema_name": self.schema,
                "spool_path": str(self.tmp / f"spool-{port}"),
            },
            "tokenizer": {"source": "bpe-openai"},
            "redis": {
                "url": self.redis_url,
                "key_prefix": self.prefix,
                "on_outage": self.on_outage,
            },
        }

    async def start(self, n: int = 2) -> None:
        if self.upstream is None:
            await self.start_upstream()
        env = dict(os.environ)
        env.update(
            NEOGATE_ADMIN_KEY=ADMIN,
            NEOGATE_SECRET="replicas-test-secret",
            ACME_KEY=ACME_KEY,
            BETA_KEY=BETA_KEY,
            GAMMA_KEY=GAMMA_KEY,
            PYTHONUNBUFFERED="1",
        )
        started = []
        for i in range(n):
            port = free_port()
            cfg = self.tmp / f"replica-{i}.yaml"
            cfg.write_text(yaml.safe_dump(self.policy(port)))
            log = self.tmp / f"replica-{i}.log"
            log_file = log.open("wb")
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
            started.append(Replica(f"replica-{i}", f"http://127.0.0.1:{port}", proc, log, log_file))
        self.replicas += started
        async with aiohttp.ClientSession() as http:
            for r in started:
                await self._ready(http, r)

    async def _ready(self, http: aiohttp.ClientSession, r: Replica) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if r.proc.poll() is not None:
                raise AssertionError(f"{r.name} exited\n{r.tail()}")
            try:
                async with http.get(r.url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"{r.name} not ready\n{r.tail()}")

    async def stop(self) -> None:
        for r in self.replicas:
            if r.proc.poll() is None:
                os.killpg(r.proc.pid, signal.SIGTERM)
        for r in self.replicas:
            try:
                await asyncio.to_thread(r.proc.wait, 30)
            except subprocess.TimeoutExpired:
                os.killpg(r.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(r.proc.wait, 10)
            r.log_file.close()
        if self.upstream is not None:
            await self.upstream.cleanup()
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [k async for k in client.scan_iter(match=f"{self.prefix}:*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
        finally:
            await conn.close()

    async def redis_counter(self, key: str) -> int:
        client = aioredis.Redis.from_url(self.redis_url)
        try:
            raw = await client.get(f"{self.prefix}:lim:{key}")
        finally:
            await client.aclose()
        return 0 if raw is None else int(raw)

    async def ledger(self, tenant: str) -> tuple[int, int, int]:
        """(rows, distinct (request_id, attempt), total cost in nano-USD) for `tenant`."""
        conn = await asyncpg.connect(PG_DSN)
        try:
            row = await conn.fetchrow(
                f"SELECT count(*), count(DISTINCT (request_id, attempt)), "
                f"coalesce(sum(cost_nusd), 0) FROM {self.schema}.ledger WHERE tenant = $1",
                tenant,
            )
        finally:
            await conn.close()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        await c.stop()


async def chat(
    http: aiohttp.ClientSession, url: str, key: str, model: str = "m"
) -> tuple[int, dict[str, Any], CIMultiDict[str]]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    async with http.post(
        url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        return resp.status, await resp.json(), CIMultiDict(resp.headers)


async def load(
    http: aiohttp.ClientSession, urls: list[str], key: str, n: int, concurrency: int
) -> list[int]:
    """`n` requests spread round-robin over `urls`, `concurrency` at a time per URL."""
    statuses: list[int] = []
    queue = list(range(n))

    async def worker(url: str) -> None:
        while queue:
            queue.pop()
            status, _, _ = await chat(http, url, key)
            statuses.append(status)

    await asyncio.gather(*(worker(u) for u in urls for _ in range(concurrency)))
    return statuses


@pytest.mark.slow
async def test_two_processes_under_load_keep_one_budget_and_one_rate_limit(
    cluster: Cluster,
) -> None:
    await cluster.start(2)
    urls = [r.url for r in cluster.replicas]
    async with aiohttp.ClientSession() as http:
        statuses = await load(http, urls, ACME_KEY, 160, concurrency=8)
        ok = statuses.count(200)
        assert statuses.count(429) == len(statuses) - ok
        # $0.002 at $0.000042 a request is 47 requests. A reservation holds the estimate
        # (the gateway counts the prompt, the upstream reports its own count), so the spend
        # may pass the budget by what is in flight: the goal allows one request per replica.
        budget_nusd = 2_000_000
        rows, distinct, cost = await cluster.ledger("acme")
        assert rows == distinct == ok  # every replica wrote its rows, once each
        assert cost == ok * COST_NUSD
        assert cost <= budget_nusd + len(urls) * COST_NUSD, (ok, cost)
        assert ok >= 40  # the shared budget: not per replica (that would admit ~94)

        start = time.monotonic()
        beta = await load(http, urls, BETA_KEY, 100, concurrency=8)
        elapsed = time.monotonic() - start
        # 30 a minute: a burst of 30, then one more every 2 s. Per replica it would be 60.
        assert 30 <= beta.count(200) <= 30 + int(elapsed / 2) + 1, (beta.count(200), elapsed)
        status, body, headers = await chat(http, urls[1], BETA_KEY)
        assert status == 429 and body["error"]["code"] == "requests_per_minute"
        assert "retry-after" in headers


@pytest.mark.slow
async def test_a_key_revoked_on_one_replica_is_refused_by_the_other_within_a_second(
    cluster: Cluster,
) -> None:
    await cluster.start(2)
    a, b = cluster.replicas
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(a.url + "/admin/keys", json={"tenant": "acme"}, headers=admin) as r:
            assert r.status == 201
            created = await r.json()
        key = created["key"]
        deadline = time.monotonic() + 5  # B learns of the new key too
        while (await chat(http, b.url, key))[0] != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        async with http.delete(a.url + f"/admin/keys/{created['key_id']}", headers=admin) as r:
            assert r.status == 200
        revoked_at = time.monotonic()
        while True:
            status, body, _ = await chat(http, b.url, key)
            if status == 401:
                break
            assert status == 200
            assert time.monotonic() - revoked_at < 1.0, "still accepted after a second"
            await asyncio.sleep(0.02)
        assert body["error"]["code"] == "invalid_api_key"


async def backend_health(http: aiohttp.ClientSession, url: str, name: str) -> bool:
    async with http.get(url + "/admin/backends", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        data = await r.json()
    return bool(next(b for b in data["backends"] if b["name"] == name)["health"]["healthy"])


async def upstream_errors(http: aiohttp.ClientSession, url: str, backend: str) -> float:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("neogate_upstream_errors_total{") and f'backend="{backend}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
async def test_a_backend_ejected_by_one_replica_is_avoided_by_the_other(cluster: Cluster) -> None:
    await cluster.start(2)
    a, b = cluster.replicas
    async with aiohttp.ClientSession() as http:
        # A tries the cheap broken backend first, fails over, and after enough failures ejects it.
        for _ in range(20):
            status, _, headers = await chat(http, a.url, ACME_KEY, "m2")
            assert status == 200 and headers["x-neogate-backend"] == "static"
            if not await backend_health(http, a.url, "broken"):
                break
        else:
            raise AssertionError("replica A never ejected the broken backend")
        ejected_at = time.monotonic()
        while await backend_health(http, b.url, "broken"):
            assert time.monotonic() - ejected_at < 1.0, "B did not learn of the ejection"
            await asyncio.sleep(0.02)
        for _ in range(5):
            status, _, headers = await chat(http, b.url, ACME_KEY, "m2")
            assert status == 200 and headers["x-neogate-backend"] == "static"
        # B never spent an attempt on the broken backend: A's discovery was enough.
        assert await upstream_errors(http, b.url, "broken") == 0
        assert await upstream_errors(http, a.url, "broken") >= 1


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.slow
async def test_a_redis_restart_mid_load_fails_open_and_reconciles_from_the_ledger(
    tmp_path: Path,
) -> None:
    redis = PrivateRedis(free_port())
    await redis.start()
    cluster = Cluster(tmp_path, redis_url=redis.url, on_outage="open")
    try:
        await cluster.start(2)
        urls = [r.url for r in cluster.replicas]
        statuses: list[int] = []
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as http:

            async def client(url: str) -> None:
                while not stop.is_set():
                    statuses.append((await chat(http, url, GAMMA_KEY))[0])

            clients = [asyncio.create_task(client(u)) for u in urls for _ in range(4)]
            await asyncio.sleep(1.0)
            redis.kill()  # no persistence: it comes back empty
            await asyncio.sleep(1.5)
            await redis.start()
            await asyncio.sleep(1.5)
            stop.set()
            await asyncio.gather(*clients)
            for url in urls:
                deadline = time.monotonic() + 5
                while await metric(http, url, "neogate_redis_up") != 1.0:
                    assert time.monotonic() < deadline, "a replica did not return to redis"
                    await asyncio.sleep(0.05)
                assert await metric(http, url, "neogate_redis_outages_total") >= 1
            reseeds = [await metric(http, u, "neogate_redis_reseeds_total") for u in urls]
        # Fail open: no request was refused or failed while Redis was away.
        assert statuses and set(statuses) == {200}, set(statuses)
        assert sum(reseeds) >= 1  # the empty Redis was rebuilt from the ledger
        rows, distinct, cost = await cluster.ledger("gamma")
        assert rows == distinct == len(statuses)
        # Rebuilt from the ledger, outage-time deltas not added on top: the shared counter
        # matches the ledger, up to the requests in flight at the rebuild (8 here).
        counter = await cluster.redis_counter("gamma:usd:t")
        assert abs(counter - cost) <= 8 * COST_NUSD, (counter, cost, len(statuses))
    finally:
        await cluster.stop()
        redis.kill()


# --- `neogate serve --workers N` -------------------------------------------------------


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


async def slow_upstream(delay_s: float) -> tuple[Any, int]:
    """An OpenAI-compatible upstream that answers every chat request after `delay_s`."""
    from aiohttp import web

    from loadtest.sim.common import start_site

    async def chat_completion(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(delay_s)
        return web.json_response(
            {
                "id": "chatcmpl-slow",
                "object": "chat.completion",
                "created": 1,
                "model": "slow",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completion)
    runner, port = await start_site(app)
    return runner, port


def spawn_workers(
    cfg: Path, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`neogate serve --config CFG --workers 2` in a session of its own, output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg), "--workers", "2"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )


@pytest.mark.slow
async def test_workers_share_a_port_restart_after_a_crash_and_drain_on_sigterm(
    tmp_path: Path,
) -> None:
    runner, up_port = await slow_upstream(0.8)
    port = free_port()
    cfg = tmp_path / "workers.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "listen": {"host": "127.0.0.1", "port": port},
                "admin": {"api_key": None},
                "auth": {"allow_anonymous_on_loopback": True, "server_secret": None},
                "backends": [
                    {
                        "name": "slow",
                        "base_url": f"http://127.0.0.1:{up_port}/v1",
                        "models": {"m": "slow"},
                        "price": {"input_per_million": 1, "output_per_million": 1},
                    }
                ],
                "models": [{"name": "m", "backends": ["slow"]}],
                "ledger": {
                    "path": str(tmp_path / "ledger.db"),
                    "spool_path": str(tmp_path / "spool"),
                },
                "tokenizer": {"source": "bpe-openai"},
            }
        )
    )
    log = tmp_path / "workers.log"
    proc = spawn_workers(cfg, log)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while len(children(proc.pid)) < 2 or not await _answers(http, url):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
            # Both workers listen on the port (SO_REUSEPORT), the supervisor does not.
            # One answering does not mean the other has finished starting: wait for both.
            while (listening := await _listeners(port)) != set(first := children(proc.pid)):
                assert time.monotonic() < deadline, (listening, first, log.read_text())
                await asyncio.sleep(0.1)
            assert len(first) == 2
            # A worker may have been restarted on a busy machine, but none crashed.
            assert "Traceback" not in log.read_text(), log.read_text()

            os.kill(first[0], signal.SIGKILL)  # a crash
            deadline = time.monotonic() + 15
            while len(set(children(proc.pid)) - {first[0]}) < 2:
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
            assert first[1] in children(proc.pid)
            while not await _answers(http, url):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)

            # SIGTERM while requests are in flight: every one is answered, then all exit.
            workers = children(proc.pid)
            inflight = [asyncio.create_task(chat(http, url, "anonymous")) for _ in range(6)]
            await asyncio.sleep(0.3)
            os.kill(proc.pid, signal.SIGTERM)
            results = await asyncio.gather(*inflight)
            assert [r[0] for r in results] == [200] * 6
            code = await asyncio.to_thread(proc.wait, 30)
            assert code == 0, log.read_text()
            for pid in workers:
                assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        await runner.cleanup()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def _answers(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url + "/healthz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def _listeners(port: int) -> set[int]:
    """PIDs holding a listening socket on `port` (from `ss`)."""
    out = await asyncio.to_thread(
        subprocess.run, ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True
    )
    return {int(p) for p in re.findall(r"pid=(\d+)", out.stdout)}


@pytest.mark.slow
async def test_an_admin_reload_in_one_worker_reloads_every_worker(tmp_path: Path) -> None:
    runner, up_port = await slow_upstream(0.0)
    port = free_port()
    cfg = tmp_path / "workers.yaml"

    def write(model: str) -> None:
        doc = {
            "listen": {"host": "127.0.0.1", "port": port},
            "admin": {"api_key": "env:RELOAD_TEST_ADMIN_KEY"},
            "auth": {"allow_anonymous_on_loopback": True, "server_secret": None},
            "backends": [
                {
                    "name": "static",
                    "base_url": f"http://127.0.0.1:{up_port}/v1",
                    "models": {model: "slow"},
                    "price": {"input_per_million": 1, "output_per_million": 1},
                }
            ],
            "models": [{"name": model, "backends": ["static"]}],
            "ledger": {"path": str(tmp_path / "ledger.db"), "spool_path": str(tmp_path / "spool")},
            "tokenizer": {"source": "bpe-openai"},
        }
        tmp = cfg.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc))
        tmp.replace(cfg)

    write("before")
    log = tmp_path / "workers.log"
    proc = spawn_workers(cfg, log, {"RELOAD_TEST_ADMIN_KEY": "reload-admin-key"})
    url = f"http://127.0.0.1:{port}"

    async def models_seen(n: int) -> set[str]:
        """Model lists from `n` fresh connections: SO_REUSEPORT spreads them over workers."""
        seen: set[str] = set()
        for _ in range(n):
            async with aiohttp.ClientSession() as s, s.get(url + "/v1/models") as r:
                seen |= {m["id"] for m in (await r.json())["data"]}
        return seen

    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while len(children(proc.pid)) < 2 or await _listeners(port) != set(children(proc.pid)):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
            assert await models_seen(20) == {"before"}
            write("after")
            async with http.post(
                url + "/admin/reload", headers={"Authorization": "Bearer reload-admin-key"}
            ) as r:
                assert r.status == 200, await r.text()
            # The supervisor's SIGHUP reloads both workers; the one that took the call
            # answered with its own reload's outcome.
            deadline = time.monotonic() + 10
            while (seen := await models_seen(20)) != {"after"}:
                assert time.monotonic() < deadline, (seen, log.read_text())
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            assert log.read_text().count("reloaded ") == 2, log.read_text()  # once per worker
            cfg.write_text("backends: [oops\n")
            async with http.post(
                url + "/admin/reload", headers={"Authorization": "Bearer reload-admin-key"}
            ) as r:
                assert r.status == 400, await r.text()
                assert (await r.json())["error"]["code"] == "invalid_config"
            assert await models_seen(10) == {"after"}  # the running config stays
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        await runner.cleanup()
