"""The hardened edge through the real gateway: no SSRF, no forwarded client credentials, no key leaks, tenant limits, admin-only admin.

A capture upstream records exactly what reaches it; a canary upstream key
(resolved from an env: reference, like a real one) is run through every error
path with DEBUG logging on and must appear in no response, header, metric,
log line or ledger file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from loadtest.sim.common import start_site
from tests.conftest import ADMIN_KEY, GatewayFactory
from tests.integration.faultkit import (
    MESSAGES,
    PROVIDER_MODEL,
    SimFactory,
    Upstream,
    is_openai_error,
    policy,
)

PRICE = {"input_per_million": 0.1, "output_per_million": 0.2}
COMPLETION = {
    "id": "chatcmpl-capture",
    "object": "chat.completion",
    "created": 0,
    "model": "captured",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}


@dataclass
class Capture:
    """What one capture upstream received."""

    url: str = ""
    requests: list[tuple[str, list[tuple[str, str]], bytes]] = field(default_factory=list)

    def headers(self, i: int = -1) -> dict[str, str]:
        return {k.lower(): v for k, v in self.requests[i][1]}


@pytest.fixture
async def capture() -> AsyncIterator[Capture]:
    """An OpenAI-compatible upstream that records every request and answers a fixed reply."""
    cap = Capture()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        cap.requests.append((request.path_qs, list(request.headers.items()), body))
        if not json.loads(body).get("stream"):
            return web.json_response(COMPLETION)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk_event("captured", "ok"))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner, port = await start_site(app)
    cap.url = f"http://127.0.0.1:{port}/v1"
    try:
        yield cap
    finally:
        await runner.cleanup()


def _chunk_event(model: str, content: str) -> bytes:
    """One SSE chat chunk carrying `content`."""
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def _echo_upstream(status: int) -> tuple[web.AppRunner, str]:
    """A careless provider: its error message repeats the Authorization header it got."""

    async def echo(request: web.Request) -> web.Response:
        await request.read()
        auth = request.headers.get("Authorization", "")
        return web.json_response(
            {
                "error": {
                    "message": f"Incorrect API key provided: {auth}",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            },
            status=status,
            headers={"x-echo-auth": auth},
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", echo)
    runner, port = await start_site(app)
    return runner, f"http://127.0.0.1:{port}/v1"


# --- what reaches an upstream ---------------------------------------------------------------

CLIENT_SECRETS = {
    "Authorization": "Bearer client-secret-key-123",
    "Cookie": "session=client-cookie-456",
    "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
    "api-key": "client-api-key-789",
    "OpenAI-Organization": "org-client-000",
    "X-Forwarded-For": "10.9.8.7",
    "Forwarded": "for=10.9.8.7",
    "X-Real-IP": "10.9.8.7",
    "Keep-Alive": "timeout=5",
    "TE": "trailers",
    "Trailer": "X-Checksum",
    "x-sim-fault": "error500",
    "x-neogate-backend": "elsewhere",
}
NEVER_FORWARDED = {k.lower() for k in CLIENT_SECRETS} - {"authorization"}


@pytest.mark.parametrize("stream", [False, True])
async def test_client_credentials_and_hop_by_hop_headers_stay_at_the_gateway(
    capture: Capture,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stream: bool,
) -> None:
    monkeypatch.setenv("NEOGATE_TEST_UPSTREAM_KEY", "sk-upstream-configured")
    # The client's key is a real tenant key: a key the gateway does not know is a 401.
    monkeypatch.setenv("NEOGATE_TEST_CLIENT_KEY", "client-secret-key-123")
    gw = await gateway_factory(
        policy(
            tmp_path,
            [Upstream("cap", capture.url, api_key="env:NEOGATE_TEST_UPSTREAM_KEY")],
            tenants=[{"name": "sec", "api_keys": ["env:NEOGATE_TEST_CLIENT_KEY"]}],
        )
    )
    headers = {
        **CLIENT_SECRETS,
        "Host": "evil.example:666",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "User-Agent": "security-test/1.0",
    }
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 4, "stream": stream}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.v1 + "/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status == 200
        await r.read()
    got = capture.headers()
    assert got["authorization"] == "Bearer sk-upstream-configured"
    assert got["host"] == capture.url.removeprefix("http://").removesuffix("/v1")
    assert not NEVER_FORWARDED & set(got), NEVER_FORWARDED & set(got)
    received = json.dumps(capture.requests[-1][1])
    for secret in (
        "client-secret-key",
        "client-cookie",
        "cHJveHk6",
        "client-api-key",
        "org-client",
    ):
        assert secret not in received
    # The allow-list does pass what tracing and SDK diagnostics need.
    assert got["traceparent"] == headers["traceparent"]
    assert got["user-agent"] == "security-test/1.0"


async def test_no_client_input_chooses_the_upstream(
    capture: Capture, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """Body fields, the Host header and an absolute request target cannot redirect (no SSRF)."""
    trap = Capture()

    async def record(request: web.Request) -> web.Response:
        trap.requests.append((request.path_qs, list(request.headers.items()), await request.read()))
        return web.json_response(COMPLETION)

    trap_app = web.Application()
    trap_app.router.add_route("*", "/{tail:.*}", record)
    trap_runner, trap_port = await start_site(trap_app)
    trap_url = f"http://127.0.0.1:{trap_port}"
    try:
        gw = await gateway_factory(policy(tmp_path, [Upstream("cap", capture.url)]))
        body = {
            "model": "m",
            "messages": MESSAGES,
            "max_tokens": 4,
            "base_url": trap_url + "/v1",
            "api_base": trap_url + "/v1",
            "url": trap_url + "/v1/chat/completions",
            "extra_headers": {"Host": f"127.0.0.1:{trap_port}"},
        }
        async with aiohttp.ClientSession() as s:
            async with s.post(
                gw.v1 + "/chat/completions",
                json=body,
                headers={"Host": f"127.0.0.1:{trap_port}"},
            ) as r:
                assert r.status == 200
            # A model name that is a URL is just an unknown model.
            async with s.post(
                gw.v1 + "/chat/completions",
                json={"model": trap_url + "/v1", "messages": MESSAGES},
            ) as r:
                assert r.status == 404 and is_openai_error(await r.read())
        # Unknown fields pass through, but only ever to the configured upstream.
        sent = json.loads(capture.requests[0][2])
        assert sent["base_url"] == trap_url + "/v1" and sent["api_base"] == trap_url + "/v1"
        # An absolute-form request target naming the trap is served from the configured upstream.
        port = int(gw.url.rsplit(":", 1)[1])
        raw_body = json.dumps({"model": "m", "messages": MESSAGES, "max_tokens": 2}).encode()
        raw = (
            f"POST {trap_url}/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{trap_port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw_body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + raw_body
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200") and b"x-neogate-backend: cap" in answer
        assert len(capture.requests) == 2
        assert trap.requests == [], "nothing a client sent reached another host"
    finally:
        await trap_runner.cleanup()


# --- the canary key through every error path -----------------------------------------------

FAULTS = (  # error429 comes last, on its own: its cool-down would hide the others
    "error400",
    "error500",
    "error503",
    "hang",
    "slow_first_byte",
    "slow",
    "cut",
    "stall",
    "error_midstream",
    "malformed",
)


def _backend(name: str, url: str, model_id: str = PROVIDER_MODEL, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "openai_compatible",
        "base_url": url,
        "api_key": "env:NEOGATE_CANARY_KEY",
        "models": {name: model_id},
        "price": PRICE,
        **extra,
    }


async def test_canary_upstream_key_appears_nowhere(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    canary = "sk-canary-" + secrets.token_hex(16)
    monkeypatch.setenv("NEOGATE_CANARY_KEY", canary)
    monkeypatch.setenv("NEOGATE_TEST_TENANT_KEY", "ng-tenant-key-for-canary-test")
    caplog.set_level(logging.DEBUG)
    good = await sims(api_key=canary)
    faulty = await sims(api_key=canary)
    wrong = await sims(api_key="sk-not-the-canary")
    echo_runner, echo_url = await _echo_upstream(401)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}/v1"
    dead.close()
    quick = {"timeouts": {"first_byte_s": 0.3, "idle_s": 0.3}}
    pol = policy(tmp_path, [Upstream("unused", good.v1)])
    pol["backends"] = [
        _backend("good", good.v1),
        _backend("faulty", faulty.v1, **quick),
        _backend("wrong", wrong.v1),
        _backend("echo", echo_url),
        _backend("dead", dead_url),
        _backend("unknown", good.v1, model_id="no-such-model"),
    ]
    pol["models"] = [{"name": b["name"], "backends": [b["name"]]} for b in pol["backends"]]
    pol["auth"] = {"allow_anonymous_on_loopback": False}
    pol["reliability"] = {"breaker_consecutive_failures": 1000, "breaker_failure_rate": 1.0}
    pol["tenants"] = [
        {
            "name": "t",
            "api_keys": ["env:NEOGATE_TEST_TENANT_KEY"],
            "limits": {"max_body_bytes": 4096},
        }
    ]
    gw = await gateway_factory(pol, anonymous=False)
    tenant = {"Authorization": "Bearer ng-tenant-key-for-canary-test"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    seen: list[bytes] = []
    statuses: set[int] = set()

    async def hit(method: str, path: str, **kw: Any) -> None:
        async with s.request(method, gw.url + path, **kw) as r:
            body = await r.read()
            statuses.add(r.status)
            seen.append(f"{r.status} {r.reason}\n".encode())
            seen.extend(f"{k}: {v}\n".encode() for k, v in r.headers.items())
            seen.append(body)

    def chat(model: str, stream: bool, **extra: Any) -> dict[str, Any]:
        return {"model": model, "messages": MESSAGES, "max_tokens": 6, "stream": stream, **extra}

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            for stream in (False, True):
                for model in ("good", "wrong", "echo", "dead", "unknown", "nope"):
                    await hit(
                        "POST", "/v1/chat/completions", json=chat(model, stream), headers=tenant
                    )
                for fault in FAULTS:
                    await faulty.control(fault=fault, delay_s=2.0)
                    await hit(
                        "POST", "/v1/chat/completions", json=chat("faulty", stream), headers=tenant
                    )
                await faulty.control(reset=True)
            await faulty.control(fault="error429", delay_s=2.0)
            for _ in range(2):  # the 429 itself, then the cool-down's 503
                await hit(
                    "POST", "/v1/chat/completions", json=chat("faulty", False), headers=tenant
                )
            # Edge errors: no key, a wrong key, bad JSON, too large, wrong method, unknown path.
            await hit("POST", "/v1/chat/completions", json=chat("good", False))
            await hit(
                "POST",
                "/v1/chat/completions",
                json=chat("good", False),
                headers={"Authorization": "Bearer ng-wrong"},
            )
            await hit("POST", "/v1/chat/completions", data=b"{nope", headers=tenant)
            await hit("POST", "/v1/chat/completions", data=b"x" * 8192, headers=tenant)
            await hit("GET", "/v1/chat/completions", headers=tenant)
            await hit("POST", "/v1/nowhere", headers=tenant)
            await hit(
                "POST", "/v1/embeddings", json={"model": "good", "input": "a"}, headers=tenant
            )
            await hit(
                "POST", "/v1/completions", json={"model": "dead", "prompt": "a"}, headers=tenant
            )
            # Everything an operator or a tenant can read back.
            for path in ("/v1/models", "/v1/usage", "/healthz", "/readyz", "/metrics"):
                await hit("GET", path, headers=tenant)
            for path in (
                "/admin/backends",
                "/admin/prices",
                "/admin/route?model=good",
                "/admin/keys",
            ):
                await hit("GET", path, headers=admin)
                await hit("GET", path, headers=tenant)
            await hit("GET", "/v1/usage", headers=admin)
            await hit("GET", "/metrics")
        # The ledger has the rows of this test (so it was written), and nothing secret in them.
        ledger = Path(gw.config.ledger.path)
        deadline = time.monotonic() + 5
        while _ledger_rows(ledger) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert _ledger_rows(ledger) > 0
    finally:
        await echo_runner.cleanup()

    assert {200, 400, 401, 403, 404, 405, 413, 429, 502, 503, 504} <= statuses, statuses
    everything = b"".join(seen)
    logs = caplog.text + "".join(repr(r.args) for r in caplog.records)
    files = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    for needle in (canary, canary[-12:]):
        assert needle.encode() not in everything, "the upstream key leaked to a client"
        assert needle not in logs, "the upstream key reached the logs"
        assert needle.encode() not in files, "the upstream key was written to disk"
    # Prompts and answers are not stored by default.
    assert MESSAGES[0]["content"].encode() not in files


def _ledger_rows(path: Path) -> int:
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return sum(db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables)


async def test_passed_through_upstream_error_body_never_carries_the_key(
    gateway_factory: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = "sk-canary-" + secrets.token_hex(16)
    monkeypatch.setenv("NEOGATE_CANARY_KEY", canary)
    runner, url = await _echo_upstream(400)
    try:
        gw = await gateway_factory(
            policy(tmp_path, [Upstream("echo", url, api_key="env:NEOGATE_CANARY_KEY")])
        )
        async with (
            aiohttp.ClientSession() as s,
            s.post(gw.v1 + "/chat/completions", json={"model": "m", "messages": MESSAGES}) as r,
        ):
            body = await r.read()
            assert r.status == 400 and is_openai_error(body)
            assert canary.encode() not in body
            assert all(canary not in v for v in r.headers.values())
    finally:
        await runner.cleanup()


async def _echo_stream_upstream() -> tuple[web.AppRunner, str]:
    """A careless provider, streaming: one token, then an error event repeating the key."""

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        auth = request.headers.get("Authorization", "")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk_event("echo", "hi"))
        error = {"error": {"message": f"key {auth} was revoked", "type": "auth", "code": "k"}}
        await resp.write(b"data: " + json.dumps(error).encode() + b"\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    runner, port = await start_site(app)
    return runner, f"http://127.0.0.1:{port}/v1"


async def test_a_streamed_upstream_error_event_never_carries_the_key(
    gateway_factory: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = "sk-canary-" + secrets.token_hex(16)
    monkeypatch.setenv("NEOGATE_CANARY_KEY", canary)
    runner, url = await _echo_stream_upstream()
    try:
        gw = await gateway_factory(
            policy(tmp_path, [Upstream("echo", url, api_key="env:NEOGATE_CANARY_KEY")])
        )
        body = {"model": "m", "messages": MESSAGES, "stream": True}
        async with (
            aiohttp.ClientSession() as s,
            s.post(gw.v1 + "/chat/completions", json=body) as r,
        ):
            raw = await r.read()
        assert r.status == 200
        assert b"was revoked" in raw, "the upstream's error event reached the client"
        assert canary.encode() not in raw
        assert b"Bearer ***" in raw
    finally:
        await runner.cleanup()


# --- tenant limits and admin access ---------------------------------------------------------


async def test_per_tenant_request_limits(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NEOGATE_TEST_SMALL_KEY", "ng-small-tenant-key")
    monkeypatch.setenv("NEOGATE_TEST_BIG_KEY", "ng-big-tenant-key")
    sim = await sims()
    pol = policy(tmp_path, [Upstream("sim", sim.v1)])
    pol["auth"] = {"allow_anonymous_on_loopback": False}
    pol["tenants"] = [
        {
            "name": "small",
            "api_keys": ["env:NEOGATE_TEST_SMALL_KEY"],
            "limits": {"max_body_bytes": 2048, "max_tokens": 50, "max_n": 2, "max_messages": 3},
        },
        {"name": "big", "api_keys": ["env:NEOGATE_TEST_BIG_KEY"]},
    ]
    gw = await gateway_factory(pol, anonymous=False)
    small = {"Authorization": "Bearer ng-small-tenant-key"}
    big = {"Authorization": "Bearer ng-big-tenant-key"}
    msg = {"role": "user", "content": "hi"}
    cases: list[tuple[dict[str, Any], int, str | None]] = [
        ({"messages": [msg], "max_tokens": 50, "n": 2}, 200, None),
        ({"messages": [msg], "max_tokens": 51}, 400, "max_tokens"),
        ({"messages": [msg], "max_completion_tokens": 51}, 400, "max_tokens"),
        ({"messages": [msg], "n": 3, "max_tokens": 2}, 400, "n"),
        ({"messages": [msg] * 4, "max_tokens": 2}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 3000}], "max_tokens": 2}, 413, None),
    ]
    async with aiohttp.ClientSession() as s:
        for extra, status, param in cases:
            body = {"model": "m", **extra}
            async with s.post(gw.v1 + "/chat/completions", json=body, headers=small) as r:
                raw = await r.read()
                assert r.status == status, (extra, raw)
                if status != 200:
                    assert is_openai_error(raw)
                    assert json.loads(raw)["error"]["param"] == param
            # The same request is within the other tenant's (default) limits.
            async with s.post(gw.v1 + "/chat/completions", json=body, headers=big) as r:
                assert r.status == 200, await r.read()
    # Refused requests never reached the upstream: 1 from `small`, 6 from `big`.
    assert await sim.total() == 7


async def test_admin_endpoints_need_the_admin_key(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NEOGATE_TEST_TENANT_KEY", "ng-tenant-key-admin-test")
    sim = await sims()
    pol = policy(tmp_path, [Upstream("sim", sim.v1)])
    pol["tenants"] = [{"name": "t", "api_keys": ["env:NEOGATE_TEST_TENANT_KEY"]}]
    gw = await gateway_factory(pol, anonymous=True)
    tenant = {"Authorization": "Bearer ng-tenant-key-admin-test"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    calls = [
        ("GET", "/admin/backends", None),
        ("GET", "/admin/prices", None),
        ("GET", "/admin/keys", None),
        ("GET", "/admin/ledger", None),
        ("GET", "/admin/route?model=m", None),
        ("POST", "/admin/keys", {"tenant": "t"}),
        (
            "POST",
            "/admin/prices",
            {"backend": "sim", "input_per_million": 0, "output_per_million": 0},
        ),
        ("POST", "/admin/reload", {}),
    ]
    async with aiohttp.ClientSession() as s:
        for method, path, body in calls:
            for headers, want in (({}, 401), (tenant, 403), ({"Authorization": "Bearer x"}, 403)):
                # Keyless (anonymous) access on loopback does not extend to admin endpoints.
                async with s.request(method, gw.url + path, json=body, headers=headers) as r:
                    raw = await r.read()
                    assert r.status == want, (method, path, headers, raw)
                    assert is_openai_error(raw)
        async with s.get(gw.url + "/admin/backends", headers=admin) as r:
            assert r.status == 200
