"""An upstream that spreads its own API key over a stream, through the real gateway, on both
transports: the key reaches the client in no view of the stream (raw bytes, decoded JSON
strings, each choice's and tool call's text, `choices[0]` of every chunk, every choice in
order), the events arrive one for one with their framing, and the usage is the upstream's."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from openai import AsyncOpenAI

from gateway.runtime import RUNTIME
from tests.conftest import GatewayFactory
from tests.integration.faultkit import MESSAGES, MODEL, Upstream, policy
from tests.integration.test_masking_roads import read_request
from tests.integration.test_sse_transports import _tls
from tests.unit.test_keymask_views import CASES, KEY, assert_no_key, views

USAGE = {"prompt_tokens": 1234, "completion_tokens": 7, "total_tokens": 1241}
STREAMS = {
    name: CASES[name]
    for name in (
        "halves in two choices, a chunk each",
        "halves in two choices of one chunk",
        "a role-only chunk of the other choice between",
        "a tool call's halves with another call between",
        "escaped halves in two choices",
    )
}


def _frame(event: bytes) -> bytes:
    obj = json.loads(event[5:])
    obj.update({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "echo"})
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _stream(events: list[bytes]) -> bytes:
    usage = b'data: {"id": "c1", "object": "chat.completion.chunk", "created": 0, '
    usage += b'"model": "echo", "choices": [], "usage": ' + json.dumps(USAGE).encode() + b"}\n\n"
    # Unescaped text goes as it was written (the case's own bytes keep its escapes).
    return b"".join(_frame(e) if b"\\u" not in e else e + b"\n\n" for e in events) + (
        usage + b"data: [DONE]\n\n"
    )


Serve = Callable[[bytes, ssl.SSLContext | None], Awaitable[str]]


@pytest.fixture
async def echo_upstream() -> AsyncIterator[Serve]:
    """Serves one SSE body (one event per TCP write), over http or https."""
    servers: list[asyncio.Server] = []

    async def serve(body: bytes, tls: ssl.SSLContext | None) -> str:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await read_request(reader)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Connection: close\r\n\r\n"
                )
                for event in body.split(b"\n\n")[:-1]:
                    writer.write(event + b"\n\n")
                    await writer.drain()
                    await asyncio.sleep(0.01)
            finally:
                writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=tls)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1"

    yield serve
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("road", ["http", "https"])
@pytest.mark.parametrize("case", list(STREAMS))
async def test_a_key_spread_over_a_stream_reaches_no_client_view_on_both_transports(
    echo_upstream: Serve,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    road: str,
    case: str,
) -> None:
    body = _stream(STREAMS[case])
    assert any(KEY in text for text in views(body.split(b"\n\n")[:-1]).values())
    tls = None
    if road == "https":
        tls, client_tls = _tls(tmp_path)
        # aiohttp verifies against this module-level context; the test CA is trusted only here.
        monkeypatch.setattr(aiohttp.connector, "_SSL_CONTEXT_VERIFIED", client_tls)
    monkeypatch.setenv("NEOGATE_TEST_UPSTREAM_KEY", KEY)
    url = await echo_upstream(body, tls)
    up = Upstream("echo", url, api_key="env:NEOGATE_TEST_UPSTREAM_KEY")
    gw = await gateway_factory(policy(tmp_path, [up]))
    transport = gw.app[RUNTIME].current.backends["echo"].transport  # type: ignore[attr-defined]
    assert type(transport).__name__ == ("PooledTransport" if road == "http" else "AiohttpTransport")
    request = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "n": 2, "stream": True}

    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.v1 + "/chat/completions", json=request) as resp,
    ):
        assert resp.status == 200
        raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    events = raw.split(b"\n\n")[:-1]
    assert len(events) == len(STREAMS[case]) + 1, "one for one, and [DONE]; usage stripped"
    assert_no_key(events[:-1])
    assert KEY.encode() not in raw

    async with AsyncOpenAI(base_url=gw.v1, api_key="anonymous", max_retries=0) as oai:
        stream = await oai.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=8,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert len(chunks) == len(STREAMS[case]) + 1
    usages = [c.usage.model_dump(exclude_none=True) for c in chunks if c.usage is not None]
    assert [{k: u[k] for k in USAGE} for u in usages] == [USAGE]  # the upstream's own count
