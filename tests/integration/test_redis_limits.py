"""Shared limits on the real Redis: the Lua scripts, exactness across processes, outages and reconciliation."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway.config import RedisSpec
from gateway.flow.admission import Admission, AdmissionRejected, TenantLimits
from gateway.metering.ledger.reports import TenantSpend
from gateway.state.limits import (
    CounterCheck,
    LimitStore,
    MemoryLimitStore,
    RateCheck,
    Refusal,
)
from gateway.state.shared.metrics import SharedMetrics
from gateway.state.shared.outage import FailoverLimitStore, SharedStateUnavailable
from gateway.state.shared.outage_deltas import OutageDeltas, epoch_cutoff, make_epoch
from gateway.state.shared.redis_limits import (
    Applied,
    CounterDelta,
    EpochMissing,
    RedisLimitStore,
    connect,
    connect_fast,
)
from gateway.state.shared.resp import RespClient, encode, read_reply

REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[2]


async def delete_prefix(client: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own on the shared Redis, deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    client = connect(RedisSpec(url=REDIS_URL))
    try:
        await delete_prefix(client, name)
    finally:
        await client.aclose()


@pytest.fixture(params=["pipelined", "redis-py"])
async def store(prefix: str, request: pytest.FixtureRequest) -> AsyncIterator[RedisLimitStore]:
    """The store with its scripts over the pipelined client, and over redis-py."""
    spec = RedisSpec(url=REDIS_URL)
    fast = connect_fast(spec) if request.param == "pipelined" else None
    s = RedisLimitStore(connect(spec), prefix, fast)
    await s.ensure_epoch()
    yield s
    await s.aclose()


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition that another task or process makes true."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# --- the scripts -----------------------------------------------------------------------


async def test_scripts_behave_like_the_memory_store(store: RedisLimitStore) -> None:
    """A random mix of reserve/adjust/seed gives the same answers as the in-process store."""
    mem = MemoryLimitStore()
    rng = random.Random(7)
    keys = ["a:usd:t", "a:tok:d:x", "b:usd:t"]
    now = 1_800_000_000.0
    for step in range(300):
        now += rng.choice((0.0, 0.05, 0.3, 2.0))
        op = rng.random()
        counters = [
            CounterCheck(k, rng.randint(0, 40), rng.choice((None, 150, 400)), 3600.0)
            for k in rng.sample(keys, rng.randint(1, 3))
        ]
        rates = [RateCheck("a:rpm", 1, 0.5, 3.0)] if rng.random() < 0.5 else []
        if rng.random() < 0.3:
            rates.append(RateCheck("a:tpm", rng.randint(1, 30), 0.01, 2.0))
        if op < 0.7:
            got = await store.reserve(counters, rates, now)
            want = await mem.reserve(counters, rates, now)
            assert (got is None) == (want is None), step
            if got is not None and want is not None:
                assert got.key == want.key, step
                if want.retry_after_s is None:
                    assert got.retry_after_s is None
                else:
                    assert got.retry_after_s == pytest.approx(want.retry_after_s, abs=1e-4)
        elif op < 0.95:
            deltas = [CounterCheck(c.key, rng.randint(-20, 20), None, c.ttl_s) for c in counters]
            rate_deltas = [RateCheck(r.key, rng.randint(-3, 3), r.interval_s) for r in rates]
            await store.adjust(deltas, rate_deltas, now)
            await mem.adjust(deltas, rate_deltas, now)
        else:
            seeds = [CounterCheck(k, rng.randint(0, 100), None, 3600.0) for k in keys]
            await store.seed(seeds, now)
            await mem.seed(seeds, now)
        for k in keys:
            assert await store.value(k) == mem.value(k, now), (step, k)


async def test_reserve_is_all_or_nothing_and_names_the_first_failure(
    store: RedisLimitStore,
) -> None:
    now = time.time()
    ok = CounterCheck("t:usd:t", 5, 100, None)
    over = CounterCheck("t:tok:t", 11, 10, None)
    rate = RateCheck("t:rpm", 1, 1.0, 60.0)
    assert await store.reserve([ok, over], [rate], now) == Refusal("t:tok:t", None)
    assert await store.value("t:usd:t") == 0
    assert await store.client.get(f"{store.prefix}:lim:t:rpm") is None
    # A rate over its burst: refused with the exact wait, counters untouched.
    burst = RateCheck("t:rpm", 3, 1.0, 2.0)
    refusal = await store.reserve([ok], [burst], now)
    assert refusal is not None and refusal.key == "t:rpm"
    assert refusal.retry_after_s == pytest.approx(1.0, abs=1e-4)
    assert await store.value("t:usd:t") == 0
    applied = await store.reserve_values([ok], [rate], now)
    # The counters' new values, and the rate's new theoretical arrival time.
    assert applied == Applied((5,), (pytest.approx(now + 1.0, abs=1e-5),))


async def test_counters_keep_their_period_ttl(store: RedisLimitStore) -> None:
    now = time.time()
    await store.reserve([CounterCheck("t:usd:d:x", 1, None, 120.0)], [], now)
    ttl_ms = await store.client.pttl(f"{store.prefix}:lim:t:usd:d:x")
    assert 110_000 < ttl_ms <= 120_000
    # Later reservations do not extend the period.
    await store.client.pexpire(f"{store.prefix}:lim:t:usd:d:x", 5_000)
    await store.reserve([CounterCheck("t:usd:d:x", 1, None, 120.0)], [], now)
    assert await store.client.pttl(f"{store.prefix}:lim:t:usd:d:x") <= 5_000


async def test_transfer_is_applied_once_per_id(store: RedisLimitStore) -> None:
    epoch = await store.ensure_epoch()
    deltas = {"t:usd:t": CounterDelta(7, None), "t:tok:t": CounterDelta(-2, None)}
    assert await store.transfer(deltas, epoch, "x1") == 1
    assert await store.transfer(deltas, epoch, "x1") == 0  # the retry of a lost reply
    assert await store.value("t:usd:t") == 7
    assert await store.value("t:tok:t") == -2
    assert await store.transfer(deltas, "another-epoch", "x2") == -2
    await store.client.delete(store.epoch_key)
    assert await store.transfer(deltas, epoch, "x3") == -1
    assert await store.value("t:usd:t") == 7


async def test_scripts_refuse_to_act_without_an_epoch(store: RedisLimitStore) -> None:
    await store.client.delete(store.epoch_key)
    with pytest.raises(EpochMissing):
        await store.reserve([CounterCheck("t:usd:t", 1, 10, None)], [], time.time())
    with pytest.raises(EpochMissing):
        await store.adjust([CounterCheck("t:usd:t", 1, None, None)], [], time.time())
    assert await store.value("t:usd:t") == 0


# --- admission on Redis ----------------------------------------------------------------


async def test_two_admissions_share_one_budget_and_rate(prefix: str) -> None:
    """Two Admission objects, each with its own connection, as two processes would be."""
    limits = {"acme": TenantLimits.of(usd_total=1, requests_per_minute=1000)}
    clients = [connect(RedisSpec(url=REDIS_URL)) for _ in range(2)]
    try:
        stores = [RedisLimitStore(c, prefix) for c in clients]
        await stores[0].ensure_epoch()
        a, b = (Admission(limits, s) for s in stores)
        ra = await a.reserve("acme", 100, 0.6)
        with pytest.raises(AdmissionRejected) as exc:
            await b.reserve("acme", 100, 0.6)
        assert exc.value.limit == "usd_total"
        await a.settle(ra, 50, 0.2)  # the real cost was lower: room for b now
        rb = await b.reserve("acme", 100, 0.6)
        await b.settle(rb, 10, 0.1)
        assert await stores[0].value("acme:usd:t") == 300_000_000
        assert await stores[1].value("acme:tok:t") == 0  # no token budget: not counted
    finally:
        for c in clients:
            await c.aclose()


_RACER = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.flow.admission import Admission, AdmissionRejected, TenantLimits
    from gateway.config import RedisSpec
    from gateway.state.shared.redis_limits import RedisLimitStore, connect

    async def main(url, prefix, n):
        client = connect(RedisSpec(url=url), timeout_s=10.0)
        await client.ping()
        limits = {"acme": TenantLimits.of(usd_total=2.5, requests_per_minute=400)}
        adm = Admission(limits, RedisLimitStore(client, prefix))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        results = []
        async def worker():
            # Sequential within a worker, so the two processes interleave over many round trips.
            for _ in range(n // 20):
                try:
                    await adm.reserve("acme", 10, 0.01)
                    results.append("ok")
                except AdmissionRejected as exc:
                    results.append(exc.limit)
        await asyncio.gather(*(worker() for _ in range(20)))
        await client.aclose()
        print(results.count("ok"), results.count("usd_total"), flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


@pytest.mark.slow
async def test_limits_are_exact_across_two_processes(store: RedisLimitStore) -> None:
    """Two OS processes race 2 x 300 reservations: exactly the budget's worth is admitted."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _RACER,
            REDIS_URL,
            store.prefix,
            "300",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdout is not None
        assert (await asyncio.wait_for(p.stdout.readline(), 30)).strip() == b"ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    outs = [await p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    counts = [tuple(int(x) for x in out.split()) for out, _ in outs]
    # $2.50 at $0.01 each is 250 requests; 400 rpm of burst is not what binds here.
    assert sum(c[0] for c in counts) == 250, counts
    assert sum(c[1] for c in counts) == 350, counts
    assert all(c[0] > 0 for c in counts), counts  # both processes got a share
    assert await store.value("acme:usd:t") == 250 * 10_000_000


# --- outages ---------------------------------------------------------------------------


class TcpProxy:
    """A loopback TCP relay to Redis that can be taken down and brought back (a network outage)."""

    def __init__(self, port: int = 6379) -> None:
        self.target = port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    p = TcpProxy()
    await p.up()
    yield p
    if p._server is not None:
        await p.down()


def failover(url: str, prefix: str, mode: str, **kw: object) -> FailoverLimitStore:
    spec = RedisSpec(url=url, key_prefix=prefix, on_outage=mode)  # type: ignore[arg-type]
    return FailoverLimitStore(
        RedisLimitStore(connect(spec), prefix, connect_fast(spec)),
        spec.on_outage,
        probe_interval_s=0.05,
        **kw,  # type: ignore[arg-type]
    )


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_fail_open_decides_locally_then_reconciles_exactly_once(
    proxy: TcpProxy, store: RedisLimitStore
) -> None:
    registry = CollectorRegistry()
    fo = failover(proxy.url, store.prefix, "open", metrics=SharedMetrics(registry))
    await fo.start()
    limits = {"acme": TenantLimits.of(usd_total=1)}
    adm = Admission(limits, fo)
    try:
        held = await adm.reserve("acme", 10, 0.30)  # in Redis
        settled = await adm.reserve("acme", 10, 0.20)
        await adm.settle(settled, 5, 0.10)  # Redis: 0.40
        await proxy.down()
        # The local fallback starts from the last value seen (0.40), not from zero.
        local = await adm.reserve("acme", 10, 0.50)  # 0.90 locally
        assert fo.degraded
        assert sample(registry, "neogate_redis_up") == 0
        assert sample(registry, "neogate_limits_decided_locally_total", op="reserve") == 1
        with pytest.raises(AdmissionRejected):
            await adm.reserve("acme", 10, 0.20)  # 1.10 > 1: refused locally too
        await adm.settle(held, 10, 0.25)  # -0.05, reserved in Redis, settled locally
        await adm.settle(local, 10, 0.45)  # -0.05, reserved and settled locally
        assert fo.pending_deltas() == {"acme:usd:t": 400_000_000}
        assert await store.value("acme:usd:t") == 400_000_000  # Redis kept its value
        await proxy.up()
        await wait_until(lambda: not fo.degraded)
        # 0.10 + 0.25 + 0.45: every request counted once, nothing twice.
        assert await store.value("acme:usd:t") == 800_000_000
        assert fo.pending_deltas() == {}
        assert sample(registry, "neogate_redis_up") == 1
        assert sample(registry, "neogate_redis_transfers_total", result="applied") == 1
        # And it is back on Redis: a second process's view agrees.
        other = Admission(limits, store)
        with pytest.raises(AdmissionRejected):
            await other.reserve("acme", 10, 0.25)
    finally:
        await fo.close()
        await fo.redis.aclose()


async def test_fail_closed_refuses_with_a_clear_503_but_keeps_settlements(
    proxy: TcpProxy, store: RedisLimitStore
) -> None:
    registry = CollectorRegistry()
    fo = failover(proxy.url, store.prefix, "closed", metrics=SharedMetrics(registry))
    await fo.start()
    adm = Admission({"acme": TenantLimits.of(usd_total=1)}, fo)
    try:
        held = await adm.reserve("acme", 10, 0.30)
        await proxy.down()
        with pytest.raises(SharedStateUnavailable) as exc:
            await adm.reserve("acme", 10, 0.10)
        err = exc.value
        assert err.http_status() == 503
        body = orjson.loads(err.body())["error"]
        assert body["code"] == "shared_state_unavailable"
        assert "retry" in body["message"]
        assert err.headers()["retry-after"] == "1"
        assert sample(registry, "neogate_limits_refused_redis_down_total") == 1
        await adm.settle(held, 10, 0.10)  # a request already admitted still settles
        await proxy.up()
        await wait_until(lambda: not fo.degraded)
        assert await store.value("acme:usd:t") == 100_000_000
        await adm.reserve("acme", 10, 0.10)
    finally:
        await fo.close()
        await fo.redis.aclose()


class PrivateRedis:
    """A redis-server of this test's own, without persistence: a restart loses every key."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = aioredis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    await client.ping()
                    return
                except (OSError, aioredis.ConnectionError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    r = PrivateRedis(free_port())
    await r.start()
    yield r
    r.kill()


def ledger_hook(
    spend: dict[str, TenantSpend], limits: dict[str, TenantLimits]
) -> tuple[list[int], Callable[[LimitStore, float], Awaitable[None]]]:
    calls: list[int] = []

    async def reseed(target: LimitStore, cutoff: float) -> None:
        calls.append(1)
        await Admission(limits, target).seed(spend)

    return calls, reseed


async def test_redis_restart_loses_counters_which_are_rebuilt_from_the_ledger(
    private_redis: PrivateRedis,
) -> None:
    limits = {"acme": TenantLimits.of(usd_total=1)}
    # What the ledger says after the outage: every completed request, local ones included.
    ledger = {"acme": TenantSpend(total_nusd=700_000_000, total_tokens=70)}
    calls, reseed = ledger_hook(ledger, limits)
    fo = failover(private_redis.url, "rr", "open", reseed=reseed)
    await fo.start()
    assert calls == [1]  # an empty Redis is seeded from the ledger before first use
    adm = Admission(limits, fo)
    try:
        ra = await adm.reserve("acme", 10, 0.1)
        private_redis.kill()
        rb = await adm.reserve("acme", 10, 0.1)  # local
        assert fo.degraded
        await adm.settle(ra, 10, 0.1)
        await private_redis.start()  # empty: no epoch, no counters
        await wait_until(lambda: not fo.degraded)
        assert calls == [1, 1]
        # Rebuilt from the ledger; the outage-time deltas were dropped, not added on top.
        assert fo.pending_deltas() == {}
        assert await fo.redis.value("acme:usd:t") == 700_000_000
        await adm.settle(rb, 10, 0.1)  # in flight across the rebuild: its delta is 0
        with pytest.raises(AdmissionRejected):
            await adm.reserve("acme", 10, 0.31)
    finally:
        await fo.close()
        await fo.redis.aclose()


async def test_a_flushed_redis_is_rebuilt_on_the_next_reservation(store: RedisLimitStore) -> None:
    limits = {"acme": TenantLimits.of(usd_total=1)}
    calls, reseed = ledger_hook({"acme": TenantSpend(total_nusd=900_000_000)}, limits)
    fo = FailoverLimitStore(store, "open", reseed=reseed)
    await fo.start()
    assert calls == []  # the epoch exists: nothing to rebuild
    adm = Admission(limits, fo)
    await adm.reserve("acme", 1, 0.05)
    await delete_prefix(store.client, store.prefix)  # FLUSHALL of our keys
    with pytest.raises(AdmissionRejected):
        await adm.reserve("acme", 1, 0.15)  # 0.90 from the ledger + 0.15 > 1
    assert calls == [1]
    assert not fo.degraded
    await adm.reserve("acme", 1, 0.05)
    assert await store.value("acme:usd:t") == 950_000_000
    await fo.close()


async def test_start_with_redis_down_is_degraded_not_fatal() -> None:
    port = free_port()  # nothing listens here
    fo = failover(f"redis://127.0.0.1:{port}/0", "down", "open")
    await fo.start()
    try:
        assert fo.degraded
        adm = Admission({"acme": TenantLimits.of(requests_per_minute=2)}, fo)
        await adm.reserve("acme", 1, 0)
        await adm.reserve("acme", 1, 0)
        with pytest.raises(AdmissionRejected):
            await adm.reserve("acme", 1, 0)
    finally:
        await fo.close()
        await fo.redis.aclose()


async def test_deltas_after_another_replicas_rebuild_are_carried_over_once(
    proxy: TcpProxy, store: RedisLimitStore
) -> None:
    """Replica B rebuilt Redis from the ledger at t=1002 while A was cut off.

    A's change from before the rebuild is in the ledger (dropped); its later one is not
    (carried over, once).
    """
    clock = [1000.0]
    limits = {"acme": TenantLimits.of(usd_total=10)}
    spec = RedisSpec(url=proxy.url, key_prefix=store.prefix)
    fo = FailoverLimitStore(
        RedisLimitStore(connect(spec), store.prefix, connect_fast(spec)),
        "open",
        probe_interval_s=0.05,
        clock=lambda: clock[0],
    )
    await fo.start()
    adm = Admission(limits, fo, clock=lambda: clock[0])
    try:
        first = await adm.reserve("acme", 1, 1.0)  # in Redis
        await proxy.down()
        clock[0] = 1001.0
        second = await adm.reserve("acme", 1, 2.0)  # local, before the rebuild
        await adm.settle(second, 1, 1.5)
        # B: Redis came back empty, B rebuilt it from the ledger (which holds `second`).
        await delete_prefix(store.client, store.prefix)
        await store.seed([CounterCheck("acme:usd:t", 2_500_000_000, None, None)], 1002.0)
        await store.ensure_epoch(make_epoch(1002.0))
        clock[0] = 1003.0
        await adm.settle(first, 1, 0.5)  # local, after the rebuild: -0.5 still to apply
        assert fo.pending_deltas() == {"acme:usd:t": 1_000_000_000}
        await proxy.up()
        await wait_until(lambda: not fo.degraded)
        assert await store.value("acme:usd:t") == 2_000_000_000  # 2.5 - 0.5
        assert fo.pending_deltas() == {}
    finally:
        await fo.close()
        await fo.redis.aclose()


def test_outage_deltas_are_cut_by_time() -> None:
    d = OutageDeltas()
    d.add([CounterCheck("k", 5, None, None)], 10.004)
    d.add([CounterCheck("k", 7, None, None), CounterCheck("j", 1, None, 60.0)], 10.02)
    assert {k: v.amount for k, v in d.merged().items()} == {"k": 12, "j": 1}
    assert d.drop_before(10.01) == 1
    assert {k: v.amount for k, v in d.merged().items()} == {"k": 7, "j": 1}
    # Slots are 1 ms: a delta made 1.5 ms after the cut-off is kept, not lost with it.
    d.add([CounterCheck("k", 3, None, None)], 10.012)
    assert d.drop_before(10.0105) == 0
    assert {k: v.amount for k, v in d.merged().items()} == {"k": 10, "j": 1}
    assert epoch_cutoff(make_epoch(12.5)) == 12.5
    assert epoch_cutoff("legacy-epoch") == float("inf")
    assert d.drop_before(epoch_cutoff("legacy-epoch")) == 3
    assert not d


# --- the pipelined client --------------------------------------------------------------


async def test_resp_encoding_and_replies() -> None:
    assert encode((b"GET", "k", 5)) == b"*3\r\n$3\r\nGET\r\n$1\r\nk\r\n$1\r\n5\r\n"
    reader = asyncio.StreamReader()
    reader.feed_data(b"*4\r\n:1\r\n$3\r\nabc\r\n$-1\r\n*1\r\n+OK\r\n-ERR bad thing\r\n")
    assert await read_reply(reader) == [1, b"abc", None, ["OK"]]
    err = await read_reply(reader)
    assert isinstance(err, aioredis.ResponseError) and str(err) == "ERR bad thing"


async def test_pipelined_client_reloads_flushed_scripts_and_keeps_order(prefix: str) -> None:
    spec = RedisSpec(url=REDIS_URL)
    store = RedisLimitStore(connect(spec), prefix, connect_fast(spec))
    try:
        await store.ensure_epoch()
        await store.client.script_flush()  # as after a Redis restart
        now = time.time()
        results = await asyncio.gather(
            *(store.reserve([CounterCheck("o:usd:t", 1, 50, None)], [], now) for _ in range(80))
        )
        assert results.count(None) == 50
        assert [r.key for r in results if r is not None] == ["o:usd:t"] * 30
        assert await store.value("o:usd:t") == 50
    finally:
        await store.aclose()


async def test_pipelined_client_times_out_on_a_silent_server() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RespClient(f"redis://127.0.0.1:{port}/0", None, timeout_s=0.1)
    try:
        started = time.monotonic()
        with pytest.raises(aioredis.TimeoutError):
            await client.evalsha("0" * 40, "return 1", [], [])
        assert time.monotonic() - started < 1.0
        with pytest.raises(aioredis.TimeoutError):
            await client.call((b"PING",))
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    refused = RespClient(f"redis://127.0.0.1:{port}/0", None, timeout_s=0.1)
    with pytest.raises(aioredis.ConnectionError):
        await refused.call((b"PING",))
    await refused.aclose()
