"""The hot-path client (`OpenAICompatBackend` over `PooledTransport`, `adapters.fasthttp`) against real loopback servers.

aiohttp servers for well-formed answers; scripted raw asyncio servers where the bytes on
the wire, their splitting or the connection's fate must be exact.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
import uvloop
from aiohttp import web

from adapters.aiohttp_transport import AiohttpTransport
from adapters.backend import OpenAICompatBackend
from adapters.base import AttemptTimeouts
from adapters.fasthttp import ConnectionPool
from adapters.http_transport import PooledTransport
from gateway.errors import (
    GatewayError,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.process import upstream_session
from loadtest.sim.common import start_site

KEY = "sk-fasthttp-canary-7d1c0b"
T = AttemptTimeouts(connect_s=2.0, first_byte_s=5.0, idle_s=5.0, total_s=10.0)
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
GONE_S = 3.0  # how long a test waits for the server to see a disconnect


# -- scripted raw servers ----------------------------------------------------------------


@dataclass
class Raw:
    """A raw TCP server running `script` per connection; counts connections and requests."""

    port: int = 0
    connections: int = 0
    requests: int = 0
    disconnects: int = 0
    gone: asyncio.Event = field(default_factory=asyncio.Event)


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Raw], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader, raw: Raw) -> bytes | None:
    """One request's body (None at EOF)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.decode().split("\r\n"):
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    raw.requests += 1
    return await reader.readexactly(length)


async def until_eof(reader: asyncio.StreamReader, raw: Raw) -> None:
    """Wait for the client to close; what it sends meanwhile is ignored."""
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass
    raw.disconnects += 1
    raw.gone.set()


async def send(writer: asyncio.StreamWriter, *pieces: bytes, gap_s: float = 0.0) -> None:
    """Write pieces as separate TCP segments (the gap lets each arrive on its own)."""
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        if gap_s:
            await asyncio.sleep(gap_s)


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Script], Awaitable[Raw]]]:
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[None]] = set()

    async def start(script: Script) -> Raw:
        raw = Raw()

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raw.connections += 1
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)  # type: ignore[arg-type]
            try:
                await script(reader, writer, raw)
            except ConnectionError:
                raw.gone.set()
            finally:
                writer.close()
                tasks.discard(task)  # type: ignore[arg-type]

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        servers.append(server)
        raw.port = server.sockets[0].getsockname()[1]
        return raw

    yield start
    for task in list(tasks):
        task.cancel()
    for server in servers:
        server.close()
        await server.wait_closed()


def pool_of(b: OpenAICompatBackend) -> ConnectionPool:
    """The keep-alive pool of a backend on the plain-http road."""
    assert isinstance(b.transport, PooledTransport), "the plain-http road is used"
    return b.transport.pool


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., OpenAICompatBackend]]:
    """Backends on a shared (unused for http) session; pools are closed at the end."""
    made: list[OpenAICompatBackend] = []
    async with aiohttp.ClientSession() as session:

        def build(port: int, **kw: object) -> OpenAICompatBackend:
            b = OpenAICompatBackend(
                name="up",
                base_url=f"http://127.0.0.1:{port}/v1",
                api_key=KEY,
                session=session,
                is_local=False,
                **kw,
            )
            made.append(b)
            return b

        yield build
        for b in made:
            b.close()


@pytest.fixture
async def site() -> AsyncIterator[Callable[[web.Application], Awaitable[int]]]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> int:
        runner, port = await start_site(app)
        runners.append(runner)
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


def no_key(exc: BaseException) -> None:
    """Neither the error nor anything it was raised from mentions the API key."""
    seen: BaseException | None = exc
    while seen is not None:
        assert KEY not in str(seen) and KEY not in repr(seen)
        seen = seen.__cause__ or seen.__context__


# -- well-formed answers from aiohttp ----------------------------------------------------


def recording_app(seen: list[web.Request], peers: set[object]) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        await request.read()
        kind = request.headers.get("X-Kind", "json")
        if kind == "chunked":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for piece in (b'{"a":', b'"chunked",', b'"n":3}'):
                await resp.write(piece)
            await resp.write_eof()
            return resp
        if kind == "sse":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(3):
                await resp.write(b'data: {"i":%d}\n\n' % i)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        if kind == "429":
            return web.Response(
                status=429,
                body=b'{"error":{"message":"slow down"}}',
                headers={"retry-after": "7"},
            )
        if kind == "503":
            return web.Response(status=503, body=b"busy", headers={"Retry-After-Ms": "1500"})
        if kind == "400":
            return web.Response(status=400, body=b'{"error":{"message":"bad"}}')
        body = await request.read()
        return web.json_response({"echo": len(body)}, headers={"X-Upstream": "yes"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def test_content_length_answer_and_the_request_on_the_wire(site, make) -> None:
    seen: list[web.Request] = []
    port = await site(recording_app(seen, set()))
    b = make(port)
    resp = await b.open(
        "/chat/completions",
        BODY,
        {
            "X-Request-Id": "rid-1",
            "traceparent": "00-ab",
            "Authorization": "Bearer client",
            "Accept-Encoding": "gzip",
        },
        T,
    )
    assert resp.status == 200
    assert resp.headers["x-upstream"] == "yes"
    assert await resp.read() == b'{"echo": %d}' % len(BODY)
    resp.close()
    h = seen[0].headers
    assert seen[0].path == "/v1/chat/completions" and seen[0].method == "POST"
    assert h.getall("Authorization") == [f"Bearer {KEY}"]
    assert h["Content-Type"] == "application/json"
    assert h["Host"] == f"127.0.0.1:{port}"
    assert h["X-Request-Id"] == "rid-1" and h["traceparent"] == "00-ab"
    assert h.getall("Accept-Encoding") == ["identity"]  # answers are read: never compressed


async def test_chunked_answer_is_read_whole(site, make) -> None:
    port = await site(recording_app([], set()))
    resp = await make(port).open("/chat/completions", BODY, {"X-Kind": "chunked"}, T)
    assert resp.headers["Transfer-Encoding"] == "chunked"
    assert await resp.read() == b'{"a":"chunked","n":3}'


async def test_sequential_requests_reuse_one_connection(site, make) -> None:
    peers: set[object] = set()
    port = await site(recording_app([], peers))
    b = make(port)
    for kind in ("json", "sse", "chunked", "429", "json", "sse"):
        try:
            resp = await b.open("/chat/completions", BODY, {"X-Kind": kind}, T)
        except UpstreamStatus:
            continue
        if kind == "sse":
            assert [e async for e in resp.events()][-1] == b"data: [DONE]"
        else:
            await resp.read()
        resp.close()
    assert len(peers) == 1
    assert pool_of(b).size == 1 and pool_of(b).idle == 1


async def test_error_statuses_carry_body_and_retry_after(site, make) -> None:
    port = await site(recording_app([], set()))
    b = make(port)
    with pytest.raises(UpstreamStatus) as e429:
        await b.open("/chat/completions", BODY, {"X-Kind": "429"}, T)
    assert e429.value.upstream_status == 429 and e429.value.retry_after_s == 7.0
    assert e429.value.upstream_body == b'{"error":{"message":"slow down"}}'
    with pytest.raises(UpstreamStatus) as e503:
        await b.open("/chat/completions", BODY, {"X-Kind": "503"}, T)
    assert e503.value.upstream_status == 503 and e503.value.retry_after_s == 1.5
    with pytest.raises(UpstreamStatus) as e400:
        await b.open("/chat/completions", BODY, {"X-Kind": "400"}, T)
    assert e400.value.upstream_status == 400 and e400.value.upstream_body.startswith(b'{"error"')
    for exc in (e429.value, e503.value, e400.value):
        no_key(exc)
    assert pool_of(b).size == 1  # the error bodies were read: reused


async def test_metrics_are_scraped_through_aiohttp(site) -> None:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="vllm:num_requests_running 3\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    port = await site(app)
    async with aiohttp.ClientSession() as session:
        b = OpenAICompatBackend(
            name="w",
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key=None,
            session=session,
            is_local=True,
            metrics_url=f"http://127.0.0.1:{port}/metrics",
        )
        assert await b.fetch_metrics() == "vllm:num_requests_running 3\n"
        b.close()


# -- exact bytes, odd splits -------------------------------------------------------------

SSE_WIRE = (
    b'data: {"a":1}\r\n\r\n'
    b'data: {"b":2}\r\n\r\n'
    b": comment\n\n"
    b'data: {"c":3}\r\n\r\n'
    b"data: [DONE]\r\n\r\n"
)
SSE_EVENTS = [b'data: {"a":1}', b'data: {"b":2}', b": comment", b'data: {"c":3}', b"data: [DONE]"]
# Cuts inside "data:", between CR and LF, between the two CRLFs, and inside the JSON.
CUTS = (3, 15, 16, 17, 18, 33, 34, 46, 60)


def pieces_of(wire: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    points = [0, *(c for c in cuts if c < len(wire)), len(wire)]
    return [wire[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.parametrize("framing", ["chunked", "until-close"])
async def test_sse_in_odd_tcp_splits_with_crlf(raw_server, make, framing: str) -> None:
    async def script(reader, writer, raw: Raw) -> None:
        await read_request(reader, raw)
        if framing == "chunked":
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            frames = [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces_of(SSE_WIRE, CUTS)]
            wire = b"".join(frames) + b"0\r\n\r\n"
        else:
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
            wire = SSE_WIRE
        # Split the head too, and the chunk framing at odd places.
        await send(writer, *pieces_of(head + wire, (7, 20, 61, 80, 83, 100, 101, 140)), gap_s=0.005)
        if framing == "until-close":
            writer.close()
        else:
            await until_eof(reader, raw)

    raw = await raw_server(script)
    resp = await make(raw.port).open("/chat/completions", BODY, {}, T)
    assert resp.headers["content-type"] == "text/event-stream"
    assert [e async for e in resp.events()] == SSE_EVENTS
    resp.close()


async def test_connection_close_answer_is_not_reused(raw_server, make) -> None:
    async def script(reader, writer, raw: Raw) -> None:
        await read_request(reader, raw)
        await send(writer, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await until_eof(reader, raw)

    raw = await raw_server(script)
    b = make(raw.port)
    for _ in range(2):
        resp = await b.open("/chat/completions", BODY, {}, T)
        assert await resp.read() == b"ok"
    assert raw.connections == 2
    assert pool_of(b).size == 0


async def test_garbage_instead_of_http_is_a_protocol_error(raw_server, make) -> None:
    async def script(reader, writer, raw: Raw) -> None:
        await read_request(reader, raw)
        await send(writer, b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await until_eof(reader, raw)

    raw = await raw_server(script)
    with pytest.raises(UpstreamProtocolError):
        await make(raw.port).open("/chat/completions", BODY, {}, T)


# -- failures ----------------------------------------------------------------------------


async def test_server_closing_mid_body_is_a_cut(raw_server, make) -> None:
    async def script(reader, writer, raw: Raw) -> None:
        await read_request(reader, raw)
        await send(writer, b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial":')

    raw = await raw_server(script)
    resp = await make(raw.port).open("/chat/completions", BODY, {}, T)
    with pytest.raises(UpstreamProtocolError) as info:
        await resp.read()
    no_key(info.value)


async def test_stream_cut_mid_event_yields_whole_events_then_fails(raw_server, make) -> None:
    async def script(reader, writer, raw: Raw) -> None:
        await read_request(reader, raw)
        await send(
            writer,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b'13\r\ndata: {"a":1}\r\n\r\n\r\n',
            b'9\r\ndata: {"b',
            gap_s=0.005,
        )

    raw = await raw_server(script)
    resp = await make(raw.port).open("/chat/completions", BODY, {}, T)
    got = []
    with pytest.raises(UpstreamProtocolError):
        async for event in resp.events():
            got.append(event)
    assert got == [b'data: {"a":1}']


async def test_refused_port_is_unavailable(make) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    b = make(port)
    with pytest.raises(UpstreamUnavailable) as info:
        await b.open("/chat/completions", BODY, {}, T)
    no_key(info.value)
    assert pool_of(b).size == 0


async def test_slow_first_byte_times_out_and_closes_the_socket(raw_server, make) -> None:
    async def script(reader, writer, raw: Raw) -> None:
        await read_request(reader, raw)
        await until_eof(reader, raw)  # never answers

    raw = await raw_server(script)
    b = make(raw.port)
    t0 = time.monotonic()
    with pytest.raises(UpstreamTimeout) as info:
        await b.open("/chat/completions", BODY, {}, AttemptTimeouts(2.0, 0.2, 5.0, 10.0))
    assert 0.15 < time.monotonic() - t0 < 2.0
    no_key(info.value)
    await asyncio.wait_for(raw.gone.wait(), GONE_S)
    assert pool_of(b).size == 0


@pytest.mark.parametrize("streamed", [False, True])
async def test_idle_gap_in_the_body_times_out(raw_server, make, streamed: bool) -> None:
    async def script(reader, writer, raw: Raw) -> None:
        await read_request(reader, raw)
        await send(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n", b'data: {"a":1}\n\n')
        await until_eof(reader, raw)  # then silence

    raw = await raw_server(script)
    resp = await make(raw.port).open(
        "/chat/completions", BODY, {}, AttemptTimeouts(2.0, 5.0, 0.2, 10.0)
    )
    t0 = time.monotonic()
    got = []
    with pytest.raises(UpstreamTimeout):
        if streamed:
            async for event in resp.events():
                got.append(event)
        else:
            await resp.read()
    assert 0.1 < time.monotonic() - t0 < 2.0
    assert got == ([b'data: {"a":1}'] if streamed else [])
    await asyncio.wait_for(raw.gone.wait(), GONE_S)


async def test_total_deadline_cuts_a_trickling_body(raw_server, make) -> None:
    async def script(reader, writer, raw: Raw) -> None:
        await read_request(reader, raw)
        await send(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):  # a byte every 20 ms: never idle, never done in time
            await send(writer, b"x", gap_s=0.02)

    raw = await raw_server(script)
    t0 = time.monotonic()
    resp = await make(raw.port).open(
        "/chat/completions", BODY, {}, AttemptTimeouts(2.0, 5.0, 0.5, 0.4)
    )
    with pytest.raises(UpstreamTimeout):
        await resp.read()
    assert 0.3 < time.monotonic() - t0 < 2.0


async def test_a_slow_consumer_pauses_reading_without_tripping_the_idle_timeout(
    raw_server, make
) -> None:
    event = b"data: " + b"x" * 1000 + b"\n\n"
    count = 4000  # about 4 MB: well past the client's high-water mark

    async def script(reader, writer, raw: Raw) -> None:
        await read_request(reader, raw)
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(event) * count)
        await send(writer, head, event * count)
        await until_eof(reader, raw)

    raw = await raw_server(script)
    resp = await make(raw.port).open(
        "/chat/completions", BODY, {}, AttemptTimeouts(2.0, 5.0, 0.3, 10.0)
    )
    inner = resp._received  # type: ignore[attr-defined]
    for _ in range(200):
        if inner._paused:
            break
        await asyncio.sleep(0.01)
    assert inner._paused
    await asyncio.sleep(0.6)  # twice the idle timeout, while reading is paused on our side
    n = 0
    async for block in resp.events():
        assert block == event[:-2]
        n += 1
    assert n == count


@pytest.mark.parametrize("extra", [1, 1000, 100_000])
async def test_a_connection_paused_at_its_last_byte_is_reused_reading(
    raw_server, make, extra: int
) -> None:
    size = 1024 * 1024 + extra  # crosses the high-water mark near the end of the body

    async def script(reader, writer, raw: Raw) -> None:
        while await read_request(reader, raw) is not None:
            await send(writer, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size, b"a" * size)

    raw = await raw_server(script)
    b = make(raw.port)
    for _ in range(3):
        resp = await b.open("/chat/completions", BODY, {}, AttemptTimeouts(2.0, 1.0, 1.0, 5.0))
        inner = resp._received  # type: ignore[attr-defined]
        for _ in range(200):  # let the body arrive before anything is consumed
            if inner.complete or inner._paused:
                break
            await asyncio.sleep(0.01)
        assert sum([len(block) async for block in resp.events()]) == size
    assert raw.connections == 1


async def test_a_large_whole_body_is_read_without_pausing(site, make) -> None:
    big = b"{" + b" " * (5 * 1024 * 1024) + b"}"

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=big)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    b = make(await site(app))
    resp = await b.open("/chat/completions", BODY, {}, T)
    assert await resp.read() == big
    assert pool_of(b).idle == 1


# -- the pool ----------------------------------------------------------------------------


async def test_concurrency_beyond_the_pool_waits_for_a_connection(raw_server, make) -> None:
    go = asyncio.Event()
    inflight = 0
    peak = 0

    async def script(reader, writer, raw: Raw) -> None:
        nonlocal inflight, peak
        while await read_request(reader, raw) is not None:
            inflight += 1
            peak = max(peak, inflight)
            await go.wait()
            inflight -= 1
            await send(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    raw = await raw_server(script)
    b = make(raw.port, max_connections=2)

    async def one() -> bytes:
        resp = await b.open("/chat/completions", BODY, {}, T)
        return await resp.read()

    tasks = [asyncio.create_task(one()) for _ in range(6)]
    while raw.requests < 2:
        await asyncio.sleep(0.01)
    assert pool_of(b).size == 2
    go.set()
    assert await asyncio.gather(*tasks) == [b"ok"] * 6
    assert peak == 2 and raw.connections == 2 and raw.requests == 6


async def test_waiting_for_a_full_pool_is_bounded_by_the_first_byte_timeout(
    raw_server, make
) -> None:
    async def script(reader, writer, raw: Raw) -> None:
        await read_request(reader, raw)
        await until_eof(reader, raw)

    raw = await raw_server(script)
    b = make(raw.port, max_connections=1)
    held = asyncio.create_task(b.open("/chat/completions", BODY, {}, T))
    while raw.requests < 1:
        await asyncio.sleep(0.01)
    with pytest.raises(UpstreamTimeout):
        await b.open("/chat/completions", BODY, {}, AttemptTimeouts(2.0, 0.2, 5.0, 10.0))
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    await asyncio.wait_for(raw.gone.wait(), GONE_S)
    assert pool_of(b).size == 0


async def test_close_mid_stream_closes_the_socket(raw_server, make) -> None:
    async def script(reader, writer, raw: Raw) -> None:
        await read_request(reader, raw)
        await send(
            writer,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b'f\r\ndata: {"a":1}\n\n\r\n',
        )
        await until_eof(reader, raw)

    raw = await raw_server(script)
    b = make(raw.port)
    resp = await b.open("/chat/completions", BODY, {}, T)
    events = resp.events()
    assert await anext(events) == b'data: {"a":1}'
    resp.close()
    await asyncio.wait_for(raw.gone.wait(), GONE_S)
    assert pool_of(b).size == 0
    await events.aclose()


async def test_cancelling_before_the_head_closes_the_socket(raw_server, make) -> None:
    async def script(reader, writer, raw: Raw) -> None:
        await read_request(reader, raw)
        await until_eof(reader, raw)

    raw = await raw_server(script)
    b = make(raw.port)
    task = asyncio.create_task(b.open("/chat/completions", BODY, {}, T))
    while raw.requests < 1:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(raw.gone.wait(), GONE_S)
    assert pool_of(b).size == 0


async def test_keepalive_race_is_retried_once_on_a_fresh_connection(raw_server, make) -> None:
    async def script(reader, writer, raw: Raw) -> None:
        await read_request(reader, raw)
        await send(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await read_request(reader, raw)  # a second request on this connection: drop it unanswered

    raw = await raw_server(script)
    b = make(raw.port)
    for _ in range(2):
        resp = await b.open("/chat/completions", BODY, {}, T)
        assert await resp.read() == b"ok"
    assert raw.connections == 2 and raw.requests == 3


async def test_fresh_connection_closed_before_answering_is_not_retried(raw_server, make) -> None:
    async def script(reader, writer, raw: Raw) -> None:
        await read_request(reader, raw)  # then close without a word

    raw = await raw_server(script)
    with pytest.raises(UpstreamUnavailable):
        await make(raw.port).open("/chat/completions", BODY, {}, T)
    assert raw.connections == 1 and raw.requests == 1


async def test_idle_connections_expire_and_close_releases_them(raw_server, make) -> None:
    async def script(reader, writer, raw: Raw) -> None:
        await read_request(reader, raw)
        await send(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await until_eof(reader, raw)

    raw = await raw_server(script)
    b = make(raw.port, keepalive_s=0.2)
    resp = await b.open("/chat/completions", BODY, {}, T)
    await resp.read()
    assert pool_of(b).idle == 1
    await asyncio.wait_for(raw.gone.wait(), GONE_S)
    assert pool_of(b).size == 0

    raw2 = await raw_server(script)
    b2 = make(raw2.port)
    resp = await b2.open("/chat/completions", BODY, {}, T)
    await resp.read()
    b2.close()
    await asyncio.wait_for(raw2.gone.wait(), GONE_S)
    with pytest.raises(GatewayError):
        await b2.open("/chat/completions", BODY, {}, T)


# -- the same on uvloop, the gateway's loop ----------------------------------------------


def test_on_uvloop() -> None:
    async def scenario() -> None:
        served = 0

        async def chat(request: web.Request) -> web.StreamResponse:
            nonlocal served
            served += 1
            await request.read()
            if request.headers.get("X-Kind") == "sse":
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                await resp.write(b'data: {"i":0}\r\n\r\ndata: [DONE]\r\n\r\n')
                await resp.write_eof()
                return resp
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner, port = await start_site(app)
        try:
            async with aiohttp.ClientSession() as session:
                b = OpenAICompatBackend(
                    name="u",
                    base_url=f"http://127.0.0.1:{port}/v1",
                    api_key=KEY,
                    session=session,
                    is_local=True,
                )
                resp = await b.open("/chat/completions", BODY, {}, T)
                assert await resp.read() == b'{"ok": true}'
                resp = await b.open("/chat/completions", BODY, {"X-Kind": "sse"}, T)
                assert [e async for e in resp.events()] == [b'data: {"i":0}', b"data: [DONE]"]
                assert pool_of(b).size == 1
                b.close()
                closed = OpenAICompatBackend(
                    name="u",
                    base_url="http://127.0.0.1:9/v1",
                    api_key=KEY,
                    session=session,
                    is_local=True,
                )
                with pytest.raises(UpstreamUnavailable):
                    await closed.open("/chat/completions", BODY, {}, T)
        finally:
            await runner.cleanup()
        assert served == 2

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


# -- compression: asked for identity; an upstream that compresses anyway ------------------


def compressing_app(seen: list[str], *, always: bool) -> web.Application:
    """Compresses with gzip when asked, or (`always`) whatever was asked; echoes the key in a 400."""

    async def chat(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Accept-Encoding", ""))
        await request.read()
        kind = request.headers.get("X-Kind", "json")
        resp: web.StreamResponse
        if kind == "sse":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        elif kind == "400":
            resp = web.Response(
                status=400, body=b'{"error":{"message":"bad key %s"}}' % KEY.encode()
            )
        else:
            resp = web.Response(body=b'{"ok":true}', content_type="application/json")
        if always:
            resp.enable_compression(force=web.ContentCoding.gzip)
        else:
            resp.enable_compression()
        if kind != "sse":
            return resp
        await resp.prepare(request)
        for i in range(3):
            await resp.write(b'data: {"i":%d}\n\n' % i)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def test_an_upstream_that_compresses_anyway_is_refused_on_the_fast_path(site, make) -> None:
    seen: list[str] = []
    port = await site(compressing_app(seen, always=True))
    with pytest.raises(UpstreamProtocolError, match="content-encoding"):
        await make(port).open("/chat/completions", BODY, {}, T)
    assert seen == ["identity"]


@pytest.mark.parametrize("always", [False, True])
async def test_the_app_session_reads_plain_bytes_from_https_style_upstreams(
    site, always: bool
) -> None:
    seen: list[str] = []
    port = await site(compressing_app(seen, always=always))
    session = upstream_session(16)
    try:
        b = OpenAICompatBackend(
            name="up",
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key=KEY,
            session=session,
            is_local=False,
            road="aiohttp",  # the https road, over http
        )
        assert isinstance(b.transport, AiohttpTransport)
        resp = await b.open("/chat/completions", BODY, {}, T)
        assert await resp.read() == b'{"ok":true}'
        resp = await b.open("/chat/completions", BODY, {"X-Kind": "sse"}, T)
        events = [e async for e in resp.events()]
        assert events == [b'data: {"i":0}', b'data: {"i":1}', b'data: {"i":2}', b"data: [DONE]"]
        with pytest.raises(UpstreamStatus) as err:
            await b.open("/chat/completions", BODY, {"X-Kind": "400"}, T)
        assert err.value.upstream_body == b'{"error":{"message":"bad key ***"}}'
    finally:
        await session.close()
    assert seen == ["identity"] * 3
