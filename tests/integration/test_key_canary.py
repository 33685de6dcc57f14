"""A canary upstream key through every place a careless provider can echo it, on both transports.

The echo provider repeats the `Authorization` header it received in everything it
can: whole 200 bodies (chat, completions, embeddings), error bodies of every
status, stream events (whole, JSON `\\u`-escaped, split over two events, spread
token by token, split over two TCP writes), error events, and its response
headers. It runs twice, through the one `adapters.backend`: over plain http (the
hot-path pool, `adapters.http_transport`) and over TLS (`adapters.aiohttp_transport`).
The canary must reach no client answer, no log line (DEBUG on), no /metrics or admin
answer and no ledger file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.runtime import RUNTIME
from tests.conftest import ADMIN_KEY, GatewayFactory
from tests.integration.faultkit import MESSAGES, Upstream, policy

USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def _escaped(text: str) -> str:
    """`text` with every character a JSON \\u escape (valid inside a JSON string)."""
    return "".join(f"\\u{ord(c):04x}" for c in text)


def _chunk(endpoint: str, text: str, *, raw: bool = False) -> bytes:
    """One stream event carrying `text`; `raw`: `text` is already JSON-escaped."""
    if endpoint == "completions":
        choice: dict[str, Any] = {"index": 0, "text": "@@", "finish_reason": None}
        obj = "text_completion"
    else:
        choice = {"index": 0, "delta": {"content": "@@"}, "finish_reason": None}
        obj = "chat.completion.chunk"
    event = {"id": "x", "object": obj, "created": 0, "model": "echo", "choices": [choice]}
    body = json.dumps(event)
    inner = text if raw else json.dumps(text)[1:-1]
    return b"data: " + body.replace("@@", inner).encode() + b"\n\n"


def _whole(endpoint: str, auth: str) -> bytes:
    """A 200 body repeating `auth` plain and \\u-escaped."""
    text = f"auth={auth} escaped=@@"
    if endpoint == "embeddings":
        obj: dict[str, Any] = {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            "model": text,
            "usage": {"prompt_tokens": 2, "total_tokens": 2},
        }
    elif endpoint == "completions":
        obj = {
            "id": "x",
            "object": "text_completion",
            "created": 0,
            "model": "echo",
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            "usage": USAGE,
        }
    else:
        obj = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "echo",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        }
    return json.dumps(obj).replace("@@", _escaped(auth)).encode()


def echo_app() -> web.Application:
    """The careless provider; `echo_mode` in the (passed-through) body picks what it does."""

    async def handle(request: web.Request) -> web.StreamResponse:
        endpoint = request.path.removeprefix("/v1/")
        body = await request.json()
        auth = request.headers.get("Authorization", "")
        mode = body.get("echo_mode", "ok")
        hdrs = {"x-echo-auth": auth, "x-ratelimit-remaining-requests": auth}
        if mode.startswith("error"):
            status = int(mode[5:])
            msg = f"Incorrect API key provided: {auth} (@@)"
            err = {"error": {"message": msg, "type": "invalid_request_error", "code": "k"}}
            raw = json.dumps(err).replace("@@", _escaped(auth)).encode()
            return web.Response(
                body=raw, status=status, headers={**hdrs, "Content-Type": "application/json"}
            )
        if not body.get("stream"):
            raw = _whole(endpoint, auth)
            resp = web.StreamResponse(headers={**hdrs, "Content-Type": "application/json"})
            resp.content_length = len(raw)
            await resp.prepare(request)
            at = raw.find(auth.encode()) + 12  # the key split over two TCP writes
            await resp.write(raw[:at])
            await asyncio.sleep(0.02)
            await resp.write(raw[at:])
            await resp.write_eof()
            return resp
        resp = web.StreamResponse(headers={**hdrs, "Content-Type": "text/event-stream"})
        await resp.prepare(request)
        key = auth.removeprefix("Bearer ")
        await resp.write(_chunk(endpoint, f"whole: {auth}. "))
        await resp.write(_chunk(endpoint, f"escaped: {_escaped(auth)}. ", raw=True))
        await resp.write(_chunk(endpoint, "split: Bearer " + key[:7]))
        await resp.write(_chunk(endpoint, key[7:] + ". "))
        for i in range(0, len(key), 3):  # token by token
            await resp.write(_chunk(endpoint, key[i : i + 3]))
        event = _chunk(endpoint, f" tcp: {auth}. ")
        at = event.find(key.encode()) + 10
        await resp.write(event[:at])
        await asyncio.sleep(0.02)
        await resp.write(event[at:])
        if mode == "stream_cut":  # the key's start, then the connection drops
            await resp.write(_chunk(endpoint, "cut: Bearer " + key[:9]))
            assert request.transport is not None
            request.transport.abort()
            return resp
        if mode == "stream_error":
            err = {"error": {"message": f"key {auth} was revoked", "type": "auth", "code": "k"}}
            await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
        else:
            final = {"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}
            await resp.write(b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    for path in ("chat/completions", "completions", "embeddings"):
        app.router.add_post("/v1/" + path, handle)
    return app


def _tls_context(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1: the server's context and a client trusting it."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


@pytest.fixture
async def echo(tmp_path: Path) -> AsyncIterator[tuple[str, str, ssl.SSLContext]]:
    """The echo provider on http and on https: (http base URL, https base URL, client TLS)."""
    server_tls, client_tls = _tls_context(tmp_path)
    runner = web.AppRunner(echo_app(), access_log=None)
    await runner.setup()
    plain = web.TCPSite(runner, "127.0.0.1", 0)
    await plain.start()
    tls = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
    await tls.start()
    ports = [a[1] for a in runner.addresses]
    try:
        yield (
            f"http://127.0.0.1:{ports[0]}/v1",
            f"https://127.0.0.1:{ports[1]}/v1",
            client_tls,
        )
    finally:
        await runner.cleanup()


_ESCAPE = re.compile(rb"\\u([0-9a-fA-F]{4})")


def _leaks(raw: bytes, canary: str) -> list[str]:
    """Every way `raw` shows the canary: plain, a long piece, \\u-escaped, or spread over events."""
    found = []
    unescaped = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)).encode(), raw)
    for needle in (canary, canary[-12:], canary[4:16]):
        if needle.encode() in raw or needle.encode() in unescaped:
            found.append(needle)
    text = "".join(re.findall(r'"(?:content|text)": ?"((?:[^"\\]|\\.)*)"', raw.decode()))
    if canary[3:] in json.loads(f'"{text}"'):
        found.append("spread over events")
    return found


def _request(endpoint: str, mode: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "echo_mode": mode}
    if endpoint == "embeddings":
        body["input"] = "hello"
    elif endpoint == "completions":
        body.update(prompt="hello", max_tokens=8, stream=stream)
    else:
        body.update(messages=MESSAGES, max_tokens=8, stream=stream)
    return body


@pytest.mark.parametrize("road", ["http", "https"])
async def test_the_canary_key_reaches_no_client_log_metric_admin_answer_or_ledger(
    echo: tuple[str, str, ssl.SSLContext],
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    road: str,
) -> None:
    http_url, https_url, client_tls = echo
    canary = "sk-canary-" + secrets.token_hex(16)
    monkeypatch.setenv("NEOGATE_CANARY_KEY", canary)
    caplog.set_level(logging.DEBUG)
    url = http_url if road == "http" else https_url
    pol = policy(tmp_path, [Upstream("echo", url, api_key="env:NEOGATE_CANARY_KEY")])
    pol["reliability"] = {"breaker_consecutive_failures": 1000, "breaker_failure_rate": 1.0}
    gw = await gateway_factory(pol)
    backend = gw.app[RUNTIME].current.backends["echo"]
    assert type(backend).__name__ == "OpenAICompatBackend"
    transport = type(backend.transport).__name__
    assert transport == ("PooledTransport" if road == "http" else "AiohttpTransport"), transport
    # The app's one client session, told to trust the test CA (a real provider's is public).
    gw.app[RUNTIME].process.session.connector._ssl = client_tls  # type: ignore[union-attr]
    answers: list[tuple[str, bytes]] = []
    statuses: list[int] = []
    async with aiohttp.ClientSession() as s:

        async def hit(method: str, path: str, **kw: Any) -> bytes:
            async with s.request(method, gw.url + path, **kw) as r:
                raw = await r.read()
                statuses.append(r.status)
                head = "".join(f"{k}: {v}\n" for k, v in r.headers.items()).encode()
                answers.append((f"{method} {path} {kw.get('json')}", head + raw))
                return raw

        for endpoint in ("chat/completions", "completions", "embeddings"):
            modes = ["ok", "error400", "error401", "error404", "error500"]
            for mode in modes:
                for stream in (False, True) if endpoint != "embeddings" else (False,):
                    raw = await hit(
                        "POST", "/v1/" + endpoint, json=_request(endpoint, mode, stream)
                    )
                    if mode == "ok":
                        assert b"***" in raw, (endpoint, stream, raw)
            if endpoint != "embeddings":
                raw = await hit(
                    "POST", "/v1/" + endpoint, json=_request(endpoint, "stream_error", True)
                )
                assert b"was revoked" in raw and b"***" in raw
                raw = await hit(
                    "POST", "/v1/" + endpoint, json=_request(endpoint, "stream_cut", True)
                )
                assert b"***" in raw and b"cut: Bearer" not in raw, raw
        # Last: a 429 cools the backend down.
        await hit("POST", "/v1/chat/completions", json=_request("chat", "error429", False))
        for path in ("/metrics", "/v1/usage", "/v1/models", "/healthz"):
            await hit("GET", path)
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        for path in ("/admin/backends", "/admin/prices", "/admin/route?model=m", "/admin/ledger"):
            await hit("GET", path, headers=admin)
    assert 200 in statuses and {400, 401, 404, 429} & set(statuses)
    for what, raw in answers:
        assert not _leaks(raw, canary), (what, _leaks(raw, canary), raw[:2000])
    logs = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert canary not in logs and canary[-12:] not in logs
    await asyncio.sleep(0.2)  # the ledger writer commits in the background
    files = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert canary[-12:].encode() not in files and canary.encode() not in files
