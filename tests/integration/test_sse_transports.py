"""One SSE splitter on both transports, end to end: an upstream whose CRLF event ends are cut by TCP.

The simulated provider frames its stream with CRLF and writes it so that event
boundaries fall as `...\\r\\n\\r` | `\\n...` across two TCP writes (two TLS records over
https), the split that merged two events into one on the old https road. Served over
plain http (the pooled transport) and over TLS (the aiohttp transport), through the
real gateway to the official openai SDK: every token arrives as its own chunk, the
upstream's usage is the one metered, and it is stripped when the client did not ask.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from openai import AsyncOpenAI

from gateway.runtime import RUNTIME
from tests.conftest import GatewayFactory
from tests.integration.faultkit import MESSAGES, MODEL, Upstream, policy

USAGE = {"prompt_tokens": 1234, "completion_tokens": 2, "total_tokens": 1236}
TOKENS = ["Hel", "lo"]


def _event(obj: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\r\n\r\n"


def _chunk(text: str | None, usage: dict[str, int] | None = None) -> bytes:
    choices = [] if text is None else [{"index": 0, "delta": {"content": text}}]
    obj: dict[str, object] = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "crlf",
        "choices": choices,
    }
    if usage is not None:
        obj["usage"] = usage
    return _event(obj)


# Each TCP write but the first starts with the LF that completes the previous one's last CRLF.
STREAM = b"".join([*(_chunk(t) for t in TOKENS), _chunk(None, USAGE), b"data: [DONE]\r\n\r\n"])
WRITES = [piece + b"\r\n\r" for piece in STREAM.split(b"\r\n\r\n")[:-1]]
WRITES = [WRITES[0]] + [b"\n" + w for w in WRITES[1:]] + [b"\n"]


def _tls(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1: (server context, client context trusting it)."""
    cert, key = tmp / "crlf.crt", tmp / "crlf.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


Serve = Callable[[ssl.SSLContext | None], Awaitable[str]]


@pytest.fixture
async def crlf_provider() -> AsyncIterator[tuple[Serve, list[dict[str, object]]]]:
    """Starts the provider (plain or TLS) and returns its base URL; records request bodies."""
    bodies: list[dict[str, object]] = []
    servers: list[asyncio.Server] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            bodies.append(json.loads(await reader.readexactly(length)))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            )
            for piece in WRITES:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.02)  # apart: one TCP segment (one TLS record) each
        finally:
            writer.close()

    async def serve(tls: ssl.SSLContext | None) -> str:
        server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=tls)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1"

    yield serve, bodies
    for server in servers:
        server.close()
        await server.wait_closed()


def test_the_stream_is_written_with_crlf_ends_split_after_their_second_cr() -> None:
    assert b"".join(WRITES) == STREAM
    assert all(w.endswith(b"\r\n\r") for w in WRITES[:-1])
    assert all(w.startswith(b"\n") for w in WRITES[1:])


@pytest.mark.parametrize("road", ["http", "https"])
@pytest.mark.parametrize("include_usage", [True, False])
async def test_crlf_split_across_tcp_writes_on_both_transports(
    crlf_provider: tuple[Serve, list[dict[str, object]]],
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    road: str,
    include_usage: bool,
) -> None:
    serve, bodies = crlf_provider
    tls = None
    if road == "https":
        tls, client_tls = _tls(tmp_path)
        # aiohttp verifies against this module-level context; the test CA is trusted only here.
        monkeypatch.setattr(aiohttp.connector, "_SSL_CONTEXT_VERIFIED", client_tls)
    url = await serve(tls)
    gw = await gateway_factory(policy(tmp_path, [Upstream("crlf", url)]))
    transport = gw.app[RUNTIME].current.backends["crlf"].transport  # type: ignore[attr-defined]
    assert type(transport).__name__ == ("PooledTransport" if road == "http" else "AiohttpTransport")

    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with AsyncOpenAI(base_url=gw.v1, api_key="anonymous", max_retries=0) as oai:
        stream = await oai.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=8,
            stream=True,
            **extra,  # type: ignore[arg-type]
        )
        chunks = [c async for c in stream]

    assert bodies and bodies[-1]["stream_options"] == {"include_usage": True}  # asked upstream
    texts = [c.choices[0].delta.content for c in chunks if c.choices]
    assert texts == TOKENS, "each token event arrived as its own chunk"
    usages = [c.usage.model_dump(exclude_none=True) for c in chunks if c.usage is not None]
    if include_usage:
        # The upstream's own count (no gateway count comes out at 1234): its event was found.
        assert [{k: u[k] for k in USAGE} for u in usages] == [USAGE]
    else:
        assert usages == [], "the usage event was recognised, and stripped"
