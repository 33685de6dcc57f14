"""Bugs that cost money or leak keys, each pinned by a test that fails when the bug is put back.

Every test runs the real app on a loopback socket in front of the simulated provider
(loadtest.sim), whose faults are chosen per request: a budget reservation that a failed request
never hands back, no failover on a revoked key (401/403) or on a 200 stream that ends before its
first event, and an upstream that echoes its API key into a stream (on the plain-http road and
on the https road, which goes through the shared aiohttp session).
"""

from __future__ import annotations

import secrets
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import aiohttp.connector
import openai
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from loadtest.sim.provider import ProviderOptions, create_provider_app
from tests.conftest import GatewayFactory
from tests.integration.faultkit import (
    MESSAGES,
    MODEL,
    PROVIDER_MODEL,
    SimFactory,
    Upstream,
    call,
    policy,
)

NO_EJECTION = {"breaker_consecutive_failures": 1000, "breaker_failure_rate": 1.0}
TENANT_KEY = "ng-tenant-key-money-paths-0001"


# --- a failed request gives its budget reservation back ------------------------------------


async def test_failed_requests_hand_their_budget_reservation_back(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reservation of ~prompt + max_tokens is held while a request runs; an upstream failure
    costs nothing, so it must be released. Budget: 2.5 reservations. Without the release the
    third failure would already be refused (429) and the tenant locked out for the day."""
    monkeypatch.setenv("NEOGATE_MONEY_TENANT_KEY", TENANT_KEY)
    sim = await sims()
    pol = policy(tmp_path, [Upstream("only", sim.v1)], reliability=NO_EJECTION)
    pol["tenants"] = [
        {
            "name": "t",
            "api_keys": ["env:NEOGATE_MONEY_TENANT_KEY"],
            "budgets": {"tokens_per_day": 250},
        }
    ]
    gw = await gateway_factory(pol, anonymous=False)
    async with AsyncOpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0) as oai:
        await sim.control(fault="error500")
        for _ in range(4):
            with pytest.raises(openai.APIStatusError) as err:
                await oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100)
            assert err.value.status_code >= 500, err.value  # the upstream's failure, never a 429
        await sim.control(fault=None)
        reply = await oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100)
        assert reply.choices[0].message.content
        # The boundary still holds: a request whose estimate alone is over the budget is refused.
        with pytest.raises(openai.RateLimitError) as refused:
            await oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=250)
        assert refused.value.code == "tokens_per_day"


# --- failover on a revoked key and on an empty 200 stream ----------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fault", ["error401", "error403"])
async def test_a_backend_refusing_our_key_fails_over(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    fault: str,
    stream: bool,
) -> None:
    """401/403 from an upstream is about the gateway's key there, not the client's request:
    the next backend serves it, and the client never sees the refusal."""
    bad, good = await sims(), await sims()
    await bad.control(fault=fault)
    gw = await gateway_factory(
        policy(
            tmp_path,
            [Upstream("bad", bad.v1), Upstream("good", good.v1)],
            reliability=NO_EJECTION,
        )
    )
    r = await call(session, gw.url, stream=stream)
    assert r.status == 200, r.body
    assert r.headers["x-neogate-backend"] == "good"
    assert r.headers["x-neogate-attempts"] == "2"
    assert await bad.total() == 1 and await good.total() == 1


async def test_a_200_stream_that_ends_before_any_event_fails_over(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    """Nothing reached the client yet, so an empty stream is a failed attempt, not an answer."""
    bad, good = await sims(), await sims()
    await bad.control(fault="empty_stream")
    gw = await gateway_factory(
        policy(
            tmp_path,
            [Upstream("bad", bad.v1), Upstream("good", good.v1)],
            reliability=NO_EJECTION,
        )
    )
    r = await call(session, gw.url, stream=True)
    assert r.status == 200, r.body
    assert r.headers["x-neogate-backend"] == "good"
    assert r.headers["x-neogate-attempts"] == "2"
    assert r.done and len(r.events) > 2
    assert await bad.total() == 1 and await good.total() == 1


# --- an upstream that echoes its key into a stream ------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (openssl), so a simulated provider can speak https."""
    cert, key = tmp / "sim.crt", tmp / "sim.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def https_provider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, str]]:
    """A simulated provider behind TLS on loopback, trusted by this process's aiohttp: (url, key).

    https upstreams take the gateway's aiohttp road (plain http ones its own client), so this
    is how a test reaches the adapter every real provider goes through.
    """
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    # aiohttp verifies against this module-level context; the test CA is trusted only here.
    monkeypatch.setattr(aiohttp.connector, "_SSL_CONTEXT_VERIFIED", client_ctx)
    api_key = "sk-canary-" + secrets.token_hex(16)
    runner = web.AppRunner(create_provider_app(ProviderOptions(time_scale=0.01, api_key=api_key)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}/v1", api_key
    finally:
        await runner.cleanup()


ECHO_MODEL = PROVIDER_MODEL + "@echo_key"  # the simulated provider's fault, by model name


async def _echoed_stream(gw_v1: str) -> bytes:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "stream": True}
    async with aiohttp.ClientSession() as s, s.post(gw_v1 + "/chat/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["x-neogate-backend"] == "echo"
        return await r.read()


def _assert_masked(raw: bytes, key: str) -> None:
    assert b"[auth: " in raw, "the upstream's chunk did not reach the client"
    assert b"was revoked" in raw, "the upstream's unterminated last event did not reach the client"
    assert key.encode() not in raw and key[-12:].encode() not in raw, raw
    # Both echoes arrive, masked: the terminated event and the unterminated tail.
    assert raw.count(b"Bearer ***") == 2, raw


async def test_a_key_echoed_into_a_stream_is_masked_on_the_plain_http_road(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api_key = "sk-canary-" + secrets.token_hex(16)
    sim = await sims(api_key=api_key)
    monkeypatch.setenv("NEOGATE_CANARY_KEY", api_key)
    gw = await gateway_factory(
        policy(tmp_path, [Upstream("echo", sim.v1, ECHO_MODEL, api_key="env:NEOGATE_CANARY_KEY")])
    )
    _assert_masked(await _echoed_stream(gw.v1), api_key)


async def test_a_key_echoed_into_a_stream_is_masked_on_the_https_road(
    https_provider: tuple[str, str],
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, api_key = https_provider
    monkeypatch.setenv("NEOGATE_CANARY_KEY", api_key)
    gw = await gateway_factory(
        policy(tmp_path, [Upstream("echo", url, ECHO_MODEL, api_key="env:NEOGATE_CANARY_KEY")])
    )
    _assert_masked(await _echoed_stream(gw.v1), api_key)
