"""Replicas sharing state through the real Redis (and the ledger through the real PostgreSQL).

The first half runs `SharedState` objects side by side in this process, each with
its own Redis connection and its own LiveState, as separate replicas would have.
The second half runs real `neogate serve` processes against a shared Redis and
PostgreSQL and drives them over HTTP.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml

from gateway.config import GatewayConfig, RedisSpec, parse_config
from gateway.keys import KeyStore, SqliteKeyBackend
from gateway.live import LiveState
from gateway.shared import publish_keys_changed
from gateway.shared.redis_limits import connect
from gateway.shared.redis_state import SharedState
from policies.latency import LatencySample
from policies.pricebook import Price

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
    # B adopted it; B does not publish it back as its own discovery.
    await asyncio.sleep(0.1)
    assert out_updates(b, "eject") == 0
    assert out_updates(a, "eject") == 1


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
    await asyncio.sleep(0.1)
    assert out_updates(b, "price") == 0  # applied, not re-published


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
