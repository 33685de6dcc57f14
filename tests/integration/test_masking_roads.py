"""`adapters.backend` on both roads (own pool for http://, aiohttp for the rest) against a raw
loopback server whose bytes are exact: the key masked in a whole body, in stream events and
in the last event that had no blank line; an error status from 400 on, its body read within
the idle timeout; each failure named by its phase (issue 17's mutation survivors).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from adapters.backend import OpenAICompatBackend
from adapters.base import AttemptTimeouts
from adapters.dialects import dialect_for
from gateway.errors import (
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)

KEY = "sk-roads-canary-5f2a91"
T = AttemptTimeouts(connect_s=2.0, first_byte_s=5.0, idle_s=5.0, total_s=10.0)
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def head(status: int, *fields: str) -> bytes:
    lines = [f"HTTP/1.1 {status} X", *fields, "", ""]
    return "\r\n".join(lines).encode()


def whole(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    return head(status, f"Content-Type: {content_type}", f"Content-Length: {len(body)}") + body


def sse_head() -> bytes:
    return head(200, "Content-Type: text/event-stream", "Connection: close")


async def read_request(reader: asyncio.StreamReader) -> None:
    raw = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in raw.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    await reader.readexactly(length)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Reply], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(reply: Reply) -> int:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await read_request(reader)
                await reply(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


ROADS = ("pooled", "aiohttp")


@pytest.fixture
async def backend() -> AsyncIterator[Callable[..., OpenAICompatBackend]]:
    made: list[OpenAICompatBackend] = []
    async with aiohttp.ClientSession(auto_decompress=False) as session:

        def build(port: int, road: str, key: str | None = KEY, **kw: object) -> OpenAICompatBackend:
            b = OpenAICompatBackend(
                name="up",
                base_url=f"http://127.0.0.1:{port}/v1",
                api_key=key,
                session=session,
                is_local=False,
                road=road,  # type: ignore[arg-type]
                **kw,  # type: ignore[arg-type]
            )
            made.append(b)
            return b

        yield build
        for b in made:
            b.close()


def send(*pieces: bytes) -> Reply:
    async def reply(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for piece in pieces:
            w.write(piece)
            await w.drain()
            await asyncio.sleep(0.01)  # each piece its own segment

    return reply


async def all_events(b: OpenAICompatBackend) -> list[bytes]:
    resp = await b.open("/chat/completions", BODY, {}, T)
    return [e async for e in resp.events()]


@pytest.mark.parametrize("road", ROADS)
async def test_a_whole_answer_that_echoes_the_key_is_masked(serve, backend, road: str) -> None:
    body = b'{"echo":"Bearer ' + KEY.encode() + b'"}'
    b = backend(await serve(send(whole(200, body))), road)
    resp = await b.open("/chat/completions", BODY, {}, T)
    assert resp.status == 200 and resp.headers["Content-Type"] == "application/json"
    assert await resp.read() == b'{"echo":"Bearer ***"}'
    resp.close()


@pytest.mark.parametrize("road", ROADS)
async def test_400_is_an_error_status_with_the_key_masked(serve, backend, road: str) -> None:
    body = b'{"error":{"message":"bad key ' + KEY.encode() + b'"}}'
    b = backend(await serve(send(whole(400, body))), road)
    with pytest.raises(UpstreamStatus) as info:
        await b.open("/chat/completions", BODY, {}, T)
    assert info.value.upstream_status == 400
    assert info.value.message == "backend up answered 400"
    assert KEY.encode() not in info.value.upstream_body
    assert b"bad key ***" in info.value.upstream_body


@pytest.mark.parametrize("road", ROADS)
async def test_an_error_body_that_stalls_is_given_up_after_the_idle_timeout(
    serve, backend, road: str
) -> None:
    stall = asyncio.Event()

    async def reply(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(head(503, "Content-Length: 100", "Retry-After: 4") + b'{"err')
        await w.drain()
        await stall.wait()

    b = backend(await serve(reply), road)
    quick = AttemptTimeouts(connect_s=2.0, first_byte_s=5.0, idle_s=0.2, total_s=10.0)
    try:
        async with asyncio.timeout(3):
            with pytest.raises(UpstreamStatus) as info:
                await b.open("/chat/completions", BODY, {}, quick)
    finally:
        stall.set()
    # The status and its wait still say what happened; the body never came whole.
    assert info.value.upstream_status == 503 and info.value.retry_after_s == 4.0
    assert info.value.upstream_body == b""


@pytest.mark.parametrize("road", ROADS)
async def test_an_error_body_that_trickles_is_given_up_after_the_idle_timeout(
    serve, backend, road: str
) -> None:
    # A byte every 0.1 s never trips the idle limit (0.3 s) between bytes; the whole
    # error body still gets no more than that.
    done = asyncio.Event()

    async def reply(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(head(500, "Content-Length: 100"))
        await w.drain()
        for _ in range(100):
            if done.is_set():
                return
            w.write(b"x")
            await w.drain()
            await asyncio.sleep(0.1)

    b = backend(await serve(reply), road)
    quick = AttemptTimeouts(connect_s=2.0, first_byte_s=5.0, idle_s=0.3, total_s=30.0)
    try:
        async with asyncio.timeout(3):
            with pytest.raises(UpstreamStatus) as info:
                await b.open("/chat/completions", BODY, {}, quick)
    finally:
        done.set()
    assert info.value.upstream_status == 500 and info.value.upstream_body == b""


@pytest.mark.parametrize("road", ROADS)
async def test_stream_events_and_the_unterminated_last_one_are_masked(
    serve, backend, road: str
) -> None:
    key = KEY.encode()
    b = backend(
        await serve(
            send(
                sse_head(),
                b'data: {"choices":[{"index":0,"delta":{"content":"a ' + key + b'"}}]}\n\n',
                b'data: {"choices":[{"index":0,"delta":{"content":"b"}}]}\n\n',
                b'data: {"choices":[{"index":0,"delta":{"content":"' + key + b'"}}]}',
            )
        ),
        road,
    )
    assert await all_events(b) == [
        b'data: {"choices":[{"index":0,"delta":{"content":"a ***"}}]}',
        b'data: {"choices":[{"index":0,"delta":{"content":"b"}}]}',
        b'data: {"choices":[{"index":0,"delta":{"content":"***"}}]}',
    ]


@pytest.mark.parametrize("road", ROADS)
async def test_a_key_split_over_the_last_two_events_is_masked(serve, backend, road: str) -> None:
    # The last event ends the key begun by the one before; it has no blank line, so only the
    # stream's end (finish, then the masker's flush) hands the two on.
    key = KEY.encode()
    b = backend(
        await serve(
            send(
                sse_head(),
                b'data: {"choices":[{"index":0,"delta":{"content":"' + key[:8] + b'"}}]}\n\n',
                b'data: {"choices":[{"index":0,"delta":{"content":"' + key[8:] + b'!"}}]}',
            )
        ),
        road,
    )
    events = await all_events(b)
    assert len(events) == 2
    assert all(key[:8] not in e and key[8:] not in e for e in events)
    assert events[1].endswith(b'!"}}]}')


@pytest.mark.parametrize("road", ROADS)
async def test_without_a_key_events_pass_as_they_are(serve, backend, road: str) -> None:
    b = backend(
        await serve(send(sse_head(), b"data: 1\r\n\r\ndata: 2\n\n", b"data: 3\n")), road, key=None
    )
    assert await all_events(b) == [b"data: 1", b"data: 2", b"data: 3\n"]


@pytest.mark.parametrize("road", ROADS)
async def test_an_oversized_stream_event_is_a_protocol_error(serve, backend, road: str) -> None:
    big = b"data: " + b"x" * (8 << 20)
    b = backend(await serve(send(sse_head(), big[: 1 << 22], big[1 << 22 :], b"x")), road)
    with pytest.raises(UpstreamProtocolError, match="backend up sent an oversized stream event"):
        await all_events(b)


@pytest.mark.parametrize("road", ROADS)
async def test_a_stream_cut_mid_event_fails_while_streaming(serve, backend, road: str) -> None:
    chunked = head(200, "Content-Type: text/event-stream", "Transfer-Encoding: chunked")
    b = backend(await serve(send(chunked, b"9\r\ndata: 1\n\n\r\n", b"20\r\ndata: 2")), road)
    resp = await b.open("/chat/completions", BODY, {}, T)
    got: list[bytes] = []
    with pytest.raises(UpstreamProtocolError) as info:
        async for e in resp.events():
            got.append(e)
    assert got == [b"data: 1"]
    assert "(streaming)" in info.value.message


@pytest.mark.parametrize("road", ROADS)
async def test_a_whole_body_cut_short_fails_while_reading_it(serve, backend, road: str) -> None:
    b = backend(await serve(send(head(200, "Content-Length: 50") + b'{"a":')), road)
    resp = await b.open("/chat/completions", BODY, {}, T)
    with pytest.raises(UpstreamProtocolError) as info:
        await resp.read()
    assert info.value.message == "backend up sent a broken response (reading body)"


@pytest.mark.parametrize("road", ROADS)
async def test_an_idle_stream_times_out_while_streaming(serve, backend, road: str) -> None:
    stall = asyncio.Event()

    async def reply(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(sse_head() + b"data: 1\n\n")
        await w.drain()
        await stall.wait()

    b = backend(await serve(reply), road)
    quick = AttemptTimeouts(connect_s=2.0, first_byte_s=5.0, idle_s=0.2, total_s=10.0)
    resp = await b.open("/chat/completions", BODY, {}, quick)
    try:
        with pytest.raises(UpstreamTimeout, match=r"backend up timed out \(streaming\)"):
            async with asyncio.timeout(3):
                async for _ in resp.events():
                    pass
    finally:
        stall.set()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()  # nothing listens there now
    return port


@pytest.mark.parametrize("road", ROADS)
async def test_a_refused_connection_is_named_by_its_phase(backend, road: str) -> None:
    b = backend(free_port(), road)
    with pytest.raises(UpstreamUnavailable) as info:
        await b.open("/chat/completions", BODY, {}, T)
    assert info.value.message == "backend up is unreachable (waiting for first byte)"


@pytest.mark.parametrize("road", ROADS)
async def test_an_error_status_is_read_in_the_backends_dialect(serve, backend, road: str) -> None:
    # Together says when to come back in x-ratelimit-reset (1m30s = 90 s), not retry-after.
    answer = whole(429, b'{"error":{"message":"slow"}}')
    answer = answer.replace(b"\r\n\r\n", b"\r\nx-ratelimit-reset: 1m30s\r\n\r\n", 1)
    b = backend(await serve(send(answer)), road, dialect=dialect_for("together"))
    with pytest.raises(UpstreamStatus) as info:
        await b.open("/chat/completions", BODY, {}, T)
    assert info.value.retry_after_s == 90.0


async def test_a_scrape_of_metrics_names_the_backend(serve, backend) -> None:
    up = await serve(send(whole(200, b"vllm:num_requests_running 3\n", "text/plain")))
    b = backend(up, "pooled", metrics_url=f"http://127.0.0.1:{up}/metrics")
    assert await b.fetch_metrics() == "vllm:num_requests_running 3\n"
    gone = backend(up, "pooled", metrics_url=f"http://127.0.0.1:{free_port()}/metrics")
    with pytest.raises(UpstreamUnavailable) as info:
        await gone.fetch_metrics()
    assert info.value.message == "backend up is unreachable (scraping metrics)"
