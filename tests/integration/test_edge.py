"""neogate's HTTP/1.1 edge on the wire: what it serves itself, what it hands to aiohttp, and how it ends.

Raw sockets, because the subject is the bytes: keep-alive, pipelining, bodies in
pieces, framing of streams, and requests outside the edge's strict subset.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import yaml
from aiohttp import web

from gateway.config import parse_config
from gateway.http.app import AppOptions, create_app
from gateway.http.conn_deadlines import ConnectionLimits
from gateway.http.edge_site import open_site
from loadtest.sim.common import start_site
from tests.conftest import Gateway, GatewayFactory, Upstreams, base_policy
from tests.integration.faultkit import Upstream, policy, sim_factory

BODY = json.dumps(
    {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
).encode()


class Conn:
    """One client connection speaking raw HTTP/1.1."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, url: str) -> Conn:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        """One response: status, headers (lower-case names), body (chunked framing removed)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if status == 100:
            return await self.response()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await self.reader.read()
        return status, headers, body

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 10) == b""

    def close(self) -> None:
        self.writer.close()


def post(
    path: str = "/v1/chat/completions",
    body: bytes = BODY,
    extra: str = "",
    version: str = "HTTP/1.1",
) -> bytes:
    return (
        f"POST {path} {version}\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


@pytest.fixture
async def conn(gateway: Gateway) -> AsyncIterator[Conn]:
    c = await Conn.open(gateway.url)
    yield c
    c.close()


def is_edge(headers: dict[str, str]) -> bool:
    return headers.get("server") == "neogate"


async def test_a_keep_alive_connection_moves_to_aiohttp_for_other_paths(conn: Conn) -> None:
    await conn.send(post())
    status, headers, body = await conn.response()
    assert status == 200 and is_edge(headers), (status, headers, body)
    assert json.loads(body)["choices"][0]["message"]["content"]
    assert headers["x-request-id"].startswith("req_")
    await conn.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await conn.response()
    assert status == 200 and not is_edge(headers), headers
    assert "llama-3.1-8b" in [m["id"] for m in json.loads(body)["data"]]
    assert headers["x-request-id"].startswith("req_")
    # From here on aiohttp holds the connection; the inference path is the same code.
    await conn.send(post())
    status, headers, body = await conn.response()
    assert status == 200 and not is_edge(headers)
    assert json.loads(body)["usage"]["completion_tokens"] > 0


async def test_pipelined_requests_are_answered_in_order(conn: Conn) -> None:
    await conn.send(b"".join(post(extra=f"x-client-request-id: c{i}\r\n") for i in range(3)))
    for i in range(3):
        status, headers, _ = await conn.response()
        assert status == 200 and is_edge(headers)
        assert headers["x-client-request-id"] == f"c{i}"


async def test_a_body_arriving_in_pieces_is_read_whole(conn: Conn) -> None:
    raw = post()
    head_end = raw.index(b"\r\n\r\n") + 4
    await conn.send(raw[: head_end - 2])  # even the head in two pieces
    await asyncio.sleep(0.02)
    await conn.send(raw[head_end - 2 : head_end + 5])
    for i in range(head_end + 5, len(raw), 7):
        await asyncio.sleep(0.005)
        await conn.send(raw[i : i + 7])
    status, headers, body = await conn.response()
    assert status == 200 and is_edge(headers), body


async def test_a_head_arriving_a_byte_at_a_time_is_parsed_whole_by_the_edge(conn: Conn) -> None:
    """llhttp is fed each piece as it comes; the head's end is found across pieces."""
    raw = post(extra="X-Odd:   spaced value  \r\n")
    head_end = raw.index(b"\r\n\r\n") + 4
    for i in range(head_end):
        await conn.send(raw[i : i + 1])
        await asyncio.sleep(0.001)
    await conn.send(raw[head_end:])
    status, headers, body = await conn.response()
    assert status == 200 and is_edge(headers), body


async def test_a_body_over_the_cap_is_refused_before_it_is_read(conn: Conn) -> None:
    length = 64 * 1024 * 1024
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    await conn.send(head + b"{" * 1024)
    status, headers, body = await conn.response()
    assert status == 413 and is_edge(headers)
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert headers["connection"] == "close"  # the rest of the body is never read
    assert await conn.closed_by_server()


async def test_bad_json_gets_an_openai_error_and_the_connection_stays(conn: Conn) -> None:
    await conn.send(post(body=b'{"model": '))
    status, headers, body = await conn.response()
    assert status == 400 and is_edge(headers)
    assert json.loads(body)["error"]["message"]
    await conn.send(post())
    status, _, _ = await conn.response()
    assert status == 200


async def test_connection_close_is_honoured(conn: Conn) -> None:
    await conn.send(post(extra="Connection: close\r\n"))
    status, headers, _ = await conn.response()
    assert status == 200 and headers["connection"] == "close"
    assert await conn.closed_by_server()


async def test_connection_close_is_honoured_without_a_body(conn: Conn) -> None:
    """llhttp ends a body-less message at its head and forgets the head's flags then."""
    await conn.send(post(body=b"", extra="Connection: close\r\n"))
    status, headers, _ = await conn.response()
    assert status == 400 and is_edge(headers) and headers["connection"] == "close"
    assert await conn.closed_by_server()


async def test_a_stream_is_chunked_ends_with_done_and_keeps_the_connection(conn: Conn) -> None:
    body = json.dumps({**json.loads(BODY), "stream": True}).encode()
    for _ in range(2):
        await conn.send(post(body=body))
        status, headers, text = await conn.response()
        assert status == 200 and is_edge(headers)
        assert headers["transfer-encoding"] == "chunked"
        assert headers["content-type"] == "text/event-stream"
        events = [e for e in text.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        assert all(e.startswith(b"data: ") for e in events)
        assert not any(b'"usage"' in e for e in events)  # not asked for: stripped


@pytest.mark.parametrize(
    ("raw", "status", "edge"),
    [
        (post(extra="X-Odd:   spaced value  \r\nX-Empty:\r\n"), 200, True),
        # outside the edge's subset, served by aiohttp
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(BODY):x}\r\n".encode()
            + BODY
            + b"\r\n0\r\n\r\n",
            200,
            False,
        ),
        (post(extra="Expect: 100-continue\r\n"), 200, False),
        (post(path="/v1/chat/completions?trace=1"), 200, False),
        (post(version="HTTP/1.0"), 200, False),
    ],
)
async def test_requests_outside_the_subset_go_to_aiohttp(
    conn: Conn, raw: bytes, status: int, edge: bool
) -> None:
    await conn.send(raw)
    got, headers, body = await conn.response()
    assert got == status, body
    assert is_edge(headers) == edge, headers


@pytest.mark.parametrize(
    "raw",
    [
        post(extra="X-Folded: a\r\n b\r\n"),
        post(extra="Transfer-Encoding: chunked\r\n"),  # both framings: smuggling
        post(extra="Content-Length: 3\r\n"),  # two lengths
        b"POST /v1/chat/completions HTTP/1.1\r\nBad Name: x\r\n\r\n",
        post(extra="X-Bare: a\nX-Other: b\r\n"),
    ],
)
async def test_malformed_heads_are_refused_with_an_openai_400(conn: Conn, raw: bytes) -> None:
    """llhttp refuses them; the guard in front of aiohttp answers (aiohttp's own answer is
    plain text quoting the head), and the connection closes."""
    await conn.send(raw)
    got, headers, body = await conn.response()
    assert got == 400, body
    assert headers.get("connection") == "close", headers
    assert json.loads(body)["error"]["code"] == "malformed_request"


async def test_the_sdk_is_served_with_the_edge_off(
    upstreams: Upstreams, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    data = base_policy(upstreams, tmp_path)
    data["listen"] = {**data.get("listen", {}), "fast_edge": False}
    gw = await gateway_factory(data)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key="anonymous", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="llama-3.1-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert raw.headers.get("server") != "neogate"
    assert raw.parse().choices[0].message.content
    stream = await client.chat.completions.create(
        model="llama-3.1-8b",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    await client.close()


async def test_shutdown_lets_a_request_in_flight_finish_and_meters_it(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    async with sim_factory() as sims:
        sim = await sims()
        await sim.control(fault="slow_first_byte", delay_s=0.5)
        gw = await gateway_factory(policy(tmp_path, [Upstream("slow", sim.v1)]))
        conn = await Conn.open(gw.url)
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]})
        await conn.send(post(body=body.encode()))
        await asyncio.sleep(0.2)  # the request is out, waiting for the slow upstream
        idle = await Conn.open(gw.url)
        stopping = asyncio.create_task(gw.runner.cleanup())
        status, headers, _ = await conn.response()
        assert status == 200 and headers["connection"] == "close"
        assert await idle.closed_by_server()
        await stopping
        conn.close()
        idle.close()
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        rows = db.execute("SELECT outcome FROM ledger").fetchall()
    assert rows == [("ok",)]


def flooding_upstream(events: int, size: int) -> web.Application:
    """An upstream that streams `events` large SSE events as fast as the socket takes them."""

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        text = "x" * size
        chunk = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
        try:
            for _ in range(events):
                event = {**chunk, "choices": [{"index": 0, "delta": {"content": text}}]}
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            usage = {"prompt_tokens": 5, "completion_tokens": events, "total_tokens": events + 5}
            await resp.write(
                b"data: " + json.dumps({**chunk, "choices": [], "usage": usage}).encode()
            )
            await resp.write(b"\n\ndata: [DONE]\n\n")
        except ConnectionResetError:
            pass  # the gateway dropped the upstream when it cut its client
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.mark.parametrize("fast_edge", [True, False])
async def test_a_client_that_stops_reading_a_stream_is_cut_and_metered(
    gateway_factory: GatewayFactory, tmp_path: Path, fast_edge: bool
) -> None:
    runner, port = await start_site(flooding_upstream(events=400, size=64 * 1024))
    try:
        data = policy(
            tmp_path,
            [Upstream("flood", f"http://127.0.0.1:{port}/v1", timeouts={"idle_s": 0.5})],
            reliability={"write_buffer_bytes": 4096},
        )
        data["listen"] = {**data["listen"], "fast_edge": fast_edge}
        gw = await gateway_factory(data)
        loop = asyncio.get_running_loop()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
            body = json.dumps(
                {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
            )
            await loop.sock_sendall(sock, post(body=body.encode()))
            # Read nothing: 400 x 64 KiB is far more than the socket buffers hold.
            rows: list[tuple[str, int]] = []
            deadline = time.monotonic() + 15
            while not rows:
                assert time.monotonic() < deadline, "the stalled client was never cut"
                await asyncio.sleep(0.2)
                with sqlite3.connect(tmp_path / "ledger.db") as db:
                    rows = db.execute("SELECT outcome, completion_tokens FROM ledger").fetchall()
        outcome, tokens = rows[0]
        assert outcome == "client_disconnect"
        assert tokens > 0  # metered from what was relayed before the cut
        conn = await Conn.open(gw.url)  # the gateway is unharmed
        await conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = await conn.response()
        conn.close()
        assert status == 200
    finally:
        await runner.cleanup()


async def test_idle_connections_are_closed_after_the_keep_alive_time(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    config = parse_config(yaml.safe_dump(base_policy(upstreams, tmp_path)), source="<test>")
    app = create_app(config, AppOptions(anonymous_allowed=True, server_secret="s"))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        limits = ConnectionLimits(head_timeout_s=0.3, body_timeout_s=0.3, keepalive_s=0.3)
        url = (await open_site(runner, "127.0.0.1", 0, limits=limits)).name
        idle, used = await Conn.open(url), await Conn.open(url)
        await used.send(post())
        assert (await used.response())[0] == 200
        await used.send(post()[:20])  # a request begun and never finished is idle too
        assert await idle.closed_by_server()
        assert await used.closed_by_server()
        idle.close()
        used.close()
    finally:
        await runner.cleanup()
