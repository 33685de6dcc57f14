"""The hot-path HTTP/1.1 client's wire handling: heads, chunked bodies, SSE splitting, framing, errors."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.aiohttp_transport import AiohttpTransport
from adapters.backend import BackendResponse, OpenAICompatBackend, caller_headers
from adapters.base import AttemptTimeouts
from adapters.errors import map_http_error
from adapters.fasthttp import (
    BadRequestHeader,
    BadResponse,
    ChunkedDecoder,
    ConnectError,
    Connection,
    ConnectionClosed,
    ConnectionPool,
    IncompleteBody,
    Response,
    ResponseTimeout,
    parse_head,
)
from adapters.http_transport import PooledTransport
from adapters.keymask import KeyMask
from gateway.errors import (
    InvalidRequest,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

KEY = "sk-unit-canary-3f9a"
UPSTREAM = PooledTransport("b", "http://upstream.test/v1")  # maps errors; never connects

# -- response heads ---------------------------------------------------------------------


def test_head_with_content_length() -> None:
    head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12")
    assert head.status == 200
    assert head.length == 12 and not head.chunked and head.keep_alive
    assert head.headers["content-type"] == "application/json"
    assert head.headers["CONTENT-LENGTH"] == "12"


def test_head_chunked_and_connection_close() -> None:
    head = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close")
    assert head.chunked and head.length is None and not head.keep_alive


def test_head_both_framings_uses_chunked_and_never_reuses() -> None:
    head = parse_head(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked",
    )
    assert head.chunked and not head.keep_alive


def test_head_http10_keeps_alive_only_when_asked() -> None:
    assert not parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 1").keep_alive
    assert parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1").keep_alive


def test_head_without_framing_reads_until_close() -> None:
    head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain")
    assert head.length is None and not head.chunked and not head.keep_alive


def test_head_no_body_statuses() -> None:
    assert parse_head(b"HTTP/1.1 204 No Content").length == 0
    assert parse_head(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50").length == 0


def test_head_without_reason_phrase_and_repeated_headers() -> None:
    head = parse_head(b"HTTP/1.1 429\r\nX-A: 1\r\nx-a: 2\r\nContent-Length:0")
    assert head.status == 429
    assert head.headers.getall("x-a") == ["1", "2"]
    assert head.length == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK",
        b"ICY 200 OK",
        b"HTTP/1.1 2x0 OK",
        b"HTTP/1.1 200OK",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket",
        b"HTTP/1.1 200 OK\r\nno colon here",
        b"HTTP/1.1 200 OK\r\n folded: value",
        b"HTTP/1.1 200 OK\r\nName : value",
        b"HTTP/1.1 200 OK\r\nA: b\nInjected: yes",
        b"HTTP/1.1 200 OK\r\nA: b\rc",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1e3",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip",
    ],
)
def test_bad_heads_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_head(raw)


def test_identical_repeated_content_length_is_fine() -> None:
    assert parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3").length == 3


# -- chunked bodies ---------------------------------------------------------------------


def chunked(pieces: list[bytes], trailer: bytes = b"") -> bytes:
    out = b"".join(f"{len(p):x};ext=1\r\n".encode() + p + b"\r\n" for p in pieces if p)
    return out + b"0\r\n" + trailer + b"\r\n"


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=40), max_size=6),
    trailer=st.sampled_from([b"", b"X-Trailer: 1\r\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_chunked_decoder_any_split(pieces: list[bytes], trailer: bytes, cuts: list[int]) -> None:
    wire = chunked(pieces, trailer)
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    dec = ChunkedDecoder()
    got: list[bytes] = []
    ended = False
    for a, b in itertools.pairwise(points):
        assert not ended
        out, ended = dec.feed(wire[a:b])
        got.extend(out)
    assert ended and not dec.extra
    assert b"".join(got) == b"".join(pieces)


def test_chunked_decoder_flags_bytes_after_the_end() -> None:
    dec = ChunkedDecoder()
    out, ended = dec.feed(b"3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK")
    assert out == [b"abc"] and ended and dec.extra


@pytest.mark.parametrize(
    "wire",
    [b"zz\r\n", b"3\r\nabcXY", b"-1\r\n", b"0x3\r\nabc\r\n", b"1" * 20 + b"\r\n"],
)
def test_chunked_decoder_refuses_broken_framing(wire: bytes) -> None:
    with pytest.raises(ValueError):
        ChunkedDecoder().feed(wire)


# -- one exchange, fed byte pieces directly (no socket) ---------------------------------


def fed(pieces: list[bytes]) -> tuple[ConnectionPool, Response]:
    """A response on a connection without a transport, fed `pieces` as separate reads."""
    loop = asyncio.get_running_loop()
    pool = ConnectionPool("upstream.test", 80)
    pool._count = 1  # the connection below holds the pool's one slot
    conn = Connection(pool)
    now = loop.time()
    resp = Response(pool, conn, loop, now + 30, 30, now + 60)
    conn.exchange = resp
    for piece in pieces:
        conn.data_received(piece)
    return pool, resp


def split_at(wire: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p for p in points if 0 < p < len(wire)})
    return [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=False)]


SSE = (
    b'data: {"a":1}\r\n\r\n'
    b": keep-alive comment\r\n\r\n"
    b'event: x\r\ndata: {"b":2}\r\n\r\n'
    b'data: {"c":3}\n\n'
    b"data: [DONE]\r\n\r\n"
)
SSE_EVENTS = [
    b'data: {"a":1}',
    b": keep-alive comment",
    b'event: x\ndata: {"b":2}',
    b'data: {"c":3}',
    b"data: [DONE]",
]


async def events_of(resp: Response) -> list[bytes]:
    return [e async for e in BackendResponse("b", UPSTREAM, resp, KeyMask(None)).events()]


@settings(max_examples=150, derandomize=True, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=12))
async def test_sse_over_chunked_in_any_split(cuts: list[int]) -> None:
    wire = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n" + chunked([SSE[i : i + 7] for i in range(0, len(SSE), 7)])
    )
    pool, resp = fed(split_at(wire, cuts))
    assert await events_of(resp) == SSE_EVENTS
    assert resp.complete and pool.idle == 1  # the connection went back whole


@pytest.mark.parametrize("cut", range(1, 80))
async def test_split_head_and_content_length_body(cut: int) -> None:
    body = b'{"ok":true}'
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Long-Header: " + b"v" * 30 + b"\r\n\r\n"
    pool, resp = fed(split_at(wire + body, [cut, cut + 9]))
    assert resp.status == 200 and resp.headers["x-long-header"] == "v" * 30
    assert await resp.read() == body
    assert pool.idle == 1


async def test_interim_100_continue_is_skipped() -> None:
    _, resp = fed(
        [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"]
    )
    assert resp.status == 201 and await resp.read() == b"ok"


async def test_bytes_past_the_body_end_forbid_reuse() -> None:
    pool, resp = fed([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"])
    assert await resp.read() == b"ok"
    assert pool.idle == 0 and pool.size == 0


async def test_connection_close_forbids_reuse() -> None:
    pool, resp = fed([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"])
    assert await resp.read() == b"ok"
    assert pool.idle == 0 and pool.size == 0


async def test_eof_ends_an_unframed_body_and_cuts_a_framed_one() -> None:
    _, resp = fed([b"HTTP/1.1 200 OK\r\n\r\npart one, ", b"part two"])
    assert isinstance(resp._conn, Connection)
    resp._conn.eof_received()
    assert await resp.read() == b"part one, part two"

    _, resp = fed([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"])
    assert isinstance(resp._conn, Connection)
    resp._conn.eof_received()
    with pytest.raises(IncompleteBody):
        await resp.read()


async def test_a_cut_stream_yields_whole_events_then_fails() -> None:
    _, resp = fed(
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            chunked([b"data: 1\n\ndata: 2"])[:-5],
        ]
    )
    assert isinstance(resp._conn, Connection)
    resp._conn.connection_lost(None)
    got = []
    with pytest.raises(UpstreamProtocolError):
        async for event in BackendResponse("b", UPSTREAM, resp, KeyMask(None)).events():
            got.append(event)
    assert got == [b"data: 1"]


async def test_oversized_head_is_refused() -> None:
    _, resp = fed([b"HTTP/1.1 200 OK\r\n", b"X-Big: " + b"a" * 70_000])
    with pytest.raises(BadResponse):
        await resp.wait_head()


async def test_early_close_releases_the_slot_and_is_idempotent() -> None:
    pool, resp = fed([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"])
    resp.close()
    resp.close()
    assert pool.size == 0 and pool.idle == 0
    with pytest.raises(IncompleteBody):
        await resp.read()


# -- request serialization and the error mapping -----------------------------------------


async def backend(base_url: str = "http://127.0.0.1:9/v1", **kw: object) -> OpenAICompatBackend:
    import aiohttp

    session = aiohttp.ClientSession()
    await session.close()  # never used: only https and metrics scrapes go through it
    return OpenAICompatBackend(
        name="b", base_url=base_url, api_key=KEY, session=session, is_local=False, **kw
    )


def pooled(b: OpenAICompatBackend) -> PooledTransport:
    assert isinstance(b.transport, PooledTransport)
    return b.transport


async def test_request_bytes() -> None:
    b = await backend("http://[::1]:8000/v1/")
    headers = {
        "X-Request-Id": "r1",
        "authorization": "Bearer client",
        "Content-Length": "999",
        "accept-encoding": "br",
    }
    data = pooled(b).serialize("/chat/completions", caller_headers(headers), b'{"x":1}')
    assert b"Bearer client" not in data
    head, _, body = data.partition(b"\r\n\r\n")
    assert body == b'{"x":1}'
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
    assert set(lines[1:]) == {
        "Host: [::1]:8000",
        "Content-Type: application/json",
        "Accept-Encoding: identity",
        f"Authorization: Bearer {KEY}",
        "Content-Length: 7",
        "X-Request-Id: r1",
    }


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/chat/completions", {"traceparent": "x\r\nInjected: 1"}),
        ("/chat/completions", {"traceparent": "x\nInjected: 1"}),
        ("/chat/completions", {"a\rb": "x"}),
        ("/chat/completions HTTP/1.1\r\nX: y", {}),
    ],
)
async def test_line_breaks_cannot_frame_a_request(path: str, headers: dict[str, str]) -> None:
    b = await backend()
    with pytest.raises(BadRequestHeader) as info:
        pooled(b).serialize(path, caller_headers(headers), b"{}")
    assert KEY not in str(info.value)
    assert isinstance(map_http_error(info.value, "b", "sending"), InvalidRequest)
    with pytest.raises(InvalidRequest):  # and through the backend, before any connect
        await b.open(path, b"{}", headers, AttemptTimeouts(1, 1, 1, 1))


@pytest.mark.parametrize(
    "url", ["https://api.example.com/v1", "http://user:pw@127.0.0.1:9/v1", "http://h:9/v1?x=1"]
)
async def test_non_plain_http_goes_through_aiohttp(url: str) -> None:
    assert isinstance((await backend(url)).transport, AiohttpTransport)


async def test_plain_http_gets_a_bounded_pool() -> None:
    pool = pooled(await backend("http://localhost/v1", max_connections=7)).pool
    assert pool.port == 80 and pool.limit == 7


@pytest.mark.parametrize(
    ("exc", "mapped"),
    [
        (ConnectError("x"), UpstreamUnavailable),
        (ConnectionClosed("x", got_bytes=False), UpstreamUnavailable),
        (ResponseTimeout("x"), UpstreamTimeout),
        (IncompleteBody("x"), UpstreamProtocolError),
        (BadResponse("x"), UpstreamProtocolError),
        (OSError("x"), UpstreamUnavailable),
    ],
)
def test_every_client_error_maps_into_the_tree(exc: Exception, mapped: type) -> None:
    out = map_http_error(exc, "b", "phase")
    assert type(out) is mapped
    assert "backend b" in out.message
