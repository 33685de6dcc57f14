"""What one client connection can cost, on both roads (the edge and aiohttp): no decompressed
request bodies, and a deadline on every head, body and idle wait (`listen.*`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.http.app import create_admin_app
from gateway.http.edge_site import open_site
from gateway.runtime import RUNTIME
from tests.conftest import Gateway, GatewayFactory
from tests.integration.faultkit import MESSAGES, SimFactory, Upstream, policy
from tests.integration.test_edge import Conn

TENANT_KEY = "ng-tenant-key-for-connection-limits"
BODY = json.dumps({"model": "m", "messages": MESSAGES, "max_tokens": 4}).encode()
DEADLINE_S = 0.5  # head and body deadlines of these tests
KEEPALIVE_S = 1.0


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """~1 MB of gzip that inflates to 1 GiB of zeros."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    out = [packer.compress(zeros) for _ in range(1024)]
    out.append(packer.flush())
    return b"".join(out)


@pytest.fixture(params=[True, False], ids=["edge", "aiohttp"])
async def gw(
    request: pytest.FixtureRequest,
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Gateway:
    """A gateway that needs a key, with short connection deadlines, on the road under test."""
    monkeypatch.setenv("NEOGATE_TEST_TENANT_KEY", TENANT_KEY)
    sim = await sims()
    pol = policy(tmp_path, [Upstream("sim", sim.v1)])
    pol["listen"].update(
        fast_edge=request.param,
        head_timeout_s=DEADLINE_S,
        body_timeout_s=DEADLINE_S,
        keepalive_s=KEEPALIVE_S,
    )
    pol["auth"] = {"allow_anonymous_on_loopback": False}
    pol["tenants"] = [{"name": "t", "api_keys": ["env:NEOGATE_TEST_TENANT_KEY"]}]
    return await gateway_factory(pol, anonymous=False)


def head(path: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


async def _healthz_worst(url: str, stop: asyncio.Event) -> float:
    """The slowest /healthz answer while `stop` is not set."""
    worst = 0.0
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            t0 = time.monotonic()
            async with s.get(url + "/healthz") as r:
                await r.read()
            worst = max(worst, time.monotonic() - t0)
            await asyncio.sleep(0.01)
    return worst


# --- request Content-Encoding ----------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/admin/keys"])
async def test_a_gzip_bomb_without_a_key_is_refused_fast_and_stalls_nothing(
    gw: Gateway, gzip_bomb: bytes, path: str
) -> None:
    stop = asyncio.Event()
    watcher = asyncio.create_task(_healthz_worst(gw.url, stop))
    await asyncio.sleep(0.05)
    conn = await Conn.open(gw.url)
    t0 = time.monotonic()
    conn.writer.write(head(path, len(gzip_bomb), "Content-Encoding: gzip\r\n") + gzip_bomb)
    status, _, body = await conn.response()
    took = time.monotonic() - t0
    stop.set()
    worst = await watcher
    conn.close()
    assert status == 415, body
    assert json.loads(body)["error"]["code"] == "unsupported_content_encoding"
    assert took < 1.0, f"answered after {took:.2f}s"
    assert worst < 0.3, f"/healthz waited {worst:.2f}s"


async def test_gzip_with_a_plain_body_is_a_415_not_a_500(gw: Gateway) -> None:
    auth = {"Authorization": f"Bearer {TENANT_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        for coding in ("gzip", "deflate", "br", "gzip, identity"):
            hdrs = {**auth, "Content-Encoding": coding}
            async with s.post(gw.v1 + "/chat/completions", data=BODY, headers=hdrs) as r:
                assert r.status == 415, (coding, await r.read())
        # A real gzip body with a valid key: still never decompressed.
        hdrs = {**auth, "Content-Encoding": "gzip"}
        packed = zlib.compress(BODY, wbits=31)
        async with s.post(gw.v1 + "/chat/completions", data=packed, headers=hdrs) as r:
            assert r.status == 415
        # `identity` is no encoding; the connection goes on after a 415.
        hdrs = {**auth, "Content-Encoding": "identity"}
        async with s.post(gw.v1 + "/chat/completions", data=BODY, headers=hdrs) as r:
            assert r.status == 200, await r.read()


# --- time limits -------------------------------------------------------------------------


async def _cut_within(conn: Conn, seconds: float) -> float:
    """Seconds until the server closed the connection (fails past `seconds`)."""
    t0 = time.monotonic()
    while True:
        try:
            data = await asyncio.wait_for(conn.reader.read(65536), seconds)
        except ConnectionResetError:
            data = b""
        if not data:
            return time.monotonic() - t0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/healthz"])
async def test_a_head_sent_a_byte_at_a_time_is_cut(gw: Gateway, path: str) -> None:
    conn = await Conn.open(gw.url)
    data = head(path, len(BODY), "X-Padding: " + "a" * 200 + "\r\n")
    t0 = time.monotonic()
    closed = asyncio.create_task(_cut_within(conn, 5.0))
    try:
        for i in range(len(data)):  # 0.05 s a byte: the head would take > 10 s
            if closed.done():
                break
            conn.writer.write(data[i : i + 1])
            await asyncio.sleep(0.05)
    except ConnectionError:
        pass
    await closed
    took = time.monotonic() - t0
    conn.close()
    assert took < DEADLINE_S + 1.0, f"cut after {took:.2f}s"


async def test_a_body_that_stalls_after_an_authenticated_head_is_cut(gw: Gateway) -> None:
    conn = await Conn.open(gw.url)
    t0 = time.monotonic()
    await conn.send(
        head("/v1/chat/completions", len(BODY), f"Authorization: Bearer {TENANT_KEY}\r\n")
    )
    await conn.send(BODY[:10])
    rest = await asyncio.wait_for(conn.reader.read(), 5.0)  # whatever comes, then the close
    took = time.monotonic() - t0
    conn.close()
    assert took < DEADLINE_S + 1.0, f"cut after {took:.2f}s"
    if rest:
        assert rest.startswith(b"HTTP/1.1 408"), rest


async def test_a_connection_that_never_sends_a_byte_is_cut(gw: Gateway) -> None:
    conn = await Conn.open(gw.url)
    took = await _cut_within(conn, 5.0)
    conn.close()
    assert took < DEADLINE_S + 1.0, f"cut after {took:.2f}s"


async def test_an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not(
    gw: Gateway,
) -> None:
    conn = await Conn.open(gw.url)
    auth = f"Authorization: Bearer {TENANT_KEY}\r\n"
    for _ in range(3):  # requests spaced under the keep-alive time keep the connection
        await conn.send(head("/v1/chat/completions", len(BODY), auth) + BODY)
        assert (await conn.response())[0] == 200
        await asyncio.sleep(KEEPALIVE_S / 3)
    took = await _cut_within(conn, 5.0)
    conn.close()
    assert KEEPALIVE_S / 2 < took + KEEPALIVE_S / 3 < KEEPALIVE_S + 1.0, took


async def test_a_slow_but_steady_body_within_the_deadline_is_served(gw: Gateway) -> None:
    conn = await Conn.open(gw.url)
    await conn.send(
        head("/v1/chat/completions", len(BODY), f"Authorization: Bearer {TENANT_KEY}\r\n")
    )
    for i in range(0, len(BODY), len(BODY) // 4 + 1):
        await conn.send(BODY[i : i + len(BODY) // 4 + 1])
        await asyncio.sleep(DEADLINE_S / 8)
    status, _, body = await conn.response()
    conn.close()
    assert status == 200, body


async def test_the_separate_admin_port_keeps_the_same_limits(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """`admin.port`: aiohttp reads it, behind the same deadlines, 415 and quiet log."""
    runner = web.AppRunner(create_admin_app(gw.app[RUNTIME]), access_log=None)
    await runner.setup()
    try:
        url = (await open_site(runner, "127.0.0.1", 0, fast_edge=False)).name
        idle = await Conn.open(url)
        assert await _cut_within(idle, 5.0) < DEADLINE_S + 1.0
        idle.close()
        conn = await Conn.open(url)
        await conn.send(head("/admin/keys", 2, "Content-Encoding: gzip\r\n") + b"{}")
        assert (await conn.response())[0] == 415
        conn.close()
        caplog.clear()
        caplog.set_level(logging.DEBUG)
        conn = await Conn.open(url)
        await conn.send(b"POST /admin/keys HTTP/1.1\nHost: x\nAuthorization: Bearer ng-x1y2\n\n")
        assert (await conn.response())[0] == 400
        conn.close()
        assert "ng-x1y2" not in caplog.text and "Traceback" not in caplog.text
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("fast_edge", [True, False], ids=["edge", "aiohttp"])
async def test_a_chunked_body_holding_a_last_chunk_lookalike_keeps_its_body_deadline(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fast_edge: bool,
) -> None:
    """aiohttp reads chunked bodies (the edge hands them over); the deadline guard in front
    follows the framing with llhttp. JSON may hold `\\n0\\r\\n\\r\\n` as whitespace around a
    number: a pattern-matching follower took it for the last chunk and cut the slow rest of
    the body at the head deadline."""
    monkeypatch.setenv("NEOGATE_TEST_TENANT_KEY", TENANT_KEY)
    sim = await sims()
    pol = policy(tmp_path, [Upstream("sim", sim.v1)])
    pol["listen"].update(fast_edge=fast_edge, head_timeout_s=0.5, body_timeout_s=5.0)
    pol["auth"] = {"allow_anonymous_on_loopback": False}
    pol["tenants"] = [{"name": "t", "api_keys": ["env:NEOGATE_TEST_TENANT_KEY"]}]
    gw = await gateway_factory(pol, anonymous=False)
    first = b'{"model": "m", "messages": ' + json.dumps(MESSAGES).encode()
    first += b', "max_tokens": 4, "temperature":\n0\r\n\r\n'
    conn = await Conn.open(gw.url)
    await conn.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TENANT_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + b"%x\r\n%b\r\n" % (len(first), first)
    )
    await asyncio.sleep(1.0)  # past the head deadline, well within the body's
    await conn.send(b"1\r\n}\r\n0\r\n\r\n")
    status, _, body = await conn.response()
    conn.close()
    assert status == 200, body


async def test_a_chunked_body_that_stalls_after_a_last_chunk_lookalike_is_cut(gw: Gateway) -> None:
    """The pattern-matching follower took the lookalike for the body's end and disarmed:
    the stalled rest was then held with no deadline at all (aiohttp has none of its own)."""
    first = b'{"model": "m", "messages": ' + json.dumps(MESSAGES).encode()
    first += b', "max_tokens": 4, "temperature":\n0\r\n\r\n'
    conn = await Conn.open(gw.url)
    await conn.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TENANT_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + b"%x\r\n%b\r\n" % (len(first), first)
    )
    took = await _cut_within(conn, 5.0)
    conn.close()
    assert took < DEADLINE_S + 1.0, f"cut after {took:.2f}s"
