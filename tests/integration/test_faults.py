"""Fault injection through the real gateway: failover, retry budget, breaker, timeouts, hedging, back-pressure.

Every test runs the real app on a loopback socket in front of simulated
providers whose faults are set through `POST /sim/control` (or a closed port,
or a raw socket server for connection resets). Breaker ejections use the
router's wall clock, which the app does not let a test inject, so those tests
wait out short ejection intervals (well under a second each).
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.runtime import RUNTIME
from loadtest.sim.common import start_site
from loadtest.sim.faults import TOKENS_BEFORE_MIDSTREAM_FAULT
from tests.conftest import ADMIN_KEY, Gateway, GatewayFactory
from tests.integration.faultkit import (
    MODEL,
    SimFactory,
    Upstream,
    call,
    is_openai_error,
    metric,
    metrics_text,
    policy,
)

SLOW_FIRST_BYTE = {"first_byte_s": 0.3}
NO_EJECTION = {"breaker_consecutive_failures": 1000, "breaker_failure_rate": 1.0}


def free_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def resetting_server() -> AsyncIterator[str]:
    """A TCP server that reads the request and resets the connection: base URL (/v1)."""

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.close()
        await server.wait_closed()


# --- failover before the first byte ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "stream"),
    [
        ("error500", False),
        ("error500", True),
        ("error503", False),
        ("error503", True),
        ("hang", False),
        ("hang", True),
        ("slow_first_byte", False),
        ("slow_first_byte", True),
        ("slow", True),  # headers at once, then silence before the first event
        ("cut", False),  # the body breaks halfway: nothing reached the client yet
        ("malformed", False),  # a 200 whose body is not JSON
    ],
)
async def test_failure_before_first_byte_fails_over(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    fault: str,
    stream: bool,
) -> None:
    bad, good = await sims(), await sims()
    await bad.control(fault=fault, delay_s=5.0)
    gw = await gateway_factory(
        policy(
            tmp_path,
            [Upstream("bad", bad.v1, timeouts=SLOW_FIRST_BYTE), Upstream("good", good.v1)],
            reliability=NO_EJECTION,
        )
    )
    r = await call(session, gw.url, stream=stream)
    assert r.status == 200, r.body
    assert r.headers["x-neogate-backend"] == "good"
    assert r.headers["x-neogate-attempts"] == "2"
    if stream:
        assert r.done
    else:
        assert r.json()["choices"][0]["message"]["content"]
    assert await bad.total() == 1 and await good.total() == 1
    text = await metrics_text(session, gw.url)
    assert metric(text, "neogate_retries_total", backend="good") == 1.0


@pytest.mark.parametrize("stream", [False, True])
async def test_connection_refused_fails_over(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    stream: bool,
) -> None:
    good = await sims()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    gw = await gateway_factory(
        policy(tmp_path, [Upstream("dead", dead), Upstream("good", good.v1)])
    )
    r = await call(session, gw.url, stream=stream)
    assert r.status == 200 and r.headers["x-neogate-backend"] == "good"
    assert r.headers["x-neogate-attempts"] == "2"
    text = await metrics_text(session, gw.url)
    assert metric(text, "neogate_upstream_errors_total", backend="dead") == 1.0


@pytest.mark.parametrize("stream", [False, True])
async def test_connection_reset_fails_over(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    resetting_server: str,
    stream: bool,
) -> None:
    good = await sims()
    gw = await gateway_factory(
        policy(tmp_path, [Upstream("reset", resetting_server), Upstream("good", good.v1)])
    )
    r = await call(session, gw.url, stream=stream)
    assert r.status == 200 and r.headers["x-neogate-backend"] == "good"
    assert r.headers["x-neogate-attempts"] == "2"


async def test_stream_whose_first_event_is_not_json_fails_over(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    """The client has seen nothing yet: a garbage first event is a failed attempt, not a relay."""

    async def garbage(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: {not json\n\ndata: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", garbage)
    runner, port = await start_site(app)
    try:
        good = await sims()
        gw = await gateway_factory(
            policy(
                tmp_path,
                [Upstream("bad", f"http://127.0.0.1:{port}/v1"), Upstream("good", good.v1)],
                reliability=NO_EJECTION,
            )
        )
        r = await call(session, gw.url, stream=True)
        assert r.status == 200 and r.done
        assert r.headers["x-neogate-backend"] == "good" and r.headers["x-neogate-attempts"] == "2"
        assert b"not json" not in r.body
    finally:
        await runner.cleanup()


# --- what is not retried, and what the client gets when retries are spent -----------------


async def _status_app(status: int, body: bytes) -> tuple[web.AppRunner, str]:
    """An upstream that answers every request with `status` and `body`."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner, port = await start_site(app)
    return runner, f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_client_errors_pass_through_unchanged_and_are_not_retried(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    status: int,
) -> None:
    body = (
        b'{"error": {"message": "upstream says no (%d)", "type": "invalid_request_error", '
        b'"param": "messages", "code": "custom_%d", "extra": 1}}' % (status, status)
    )
    runner, url = await _status_app(status, body)
    try:
        good = await sims()
        gw = await gateway_factory(
            policy(tmp_path, [Upstream("picky", url), Upstream("good", good.v1)])
        )
        for stream in (False, True):
            r = await call(session, gw.url, stream=stream)
            assert r.status == status
            assert r.body == body, "the upstream's own error body passes through byte for byte"
        assert await good.total() == 0, "a client error is never retried elsewhere"
        # The backend answered: the breaker does not count a client's mistake against it.
        rt = gw.app[RUNTIME].current
        assert rt.router.live.backends["picky"].breaker.snapshot(time.time()).state == "closed"
    finally:
        await runner.cleanup()


async def test_sim_400_and_unknown_model_404_pass_through(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    a, good = await sims(), await sims()
    await a.control(fault="error400")
    gw = await gateway_factory(policy(tmp_path, [Upstream("a", a.v1), Upstream("good", good.v1)]))
    r = await call(session, gw.url)
    assert r.status == 400 and r.json()["error"]["code"] == "sim_error400"
    await a.control(reset=True)
    gw404 = await gateway_factory(
        policy(
            tmp_path / "x",
            [Upstream("a", a.v1, model_id="no-such-model"), Upstream("good", good.v1)],
        )
    )
    r = await call(session, gw404.url)
    assert r.status == 404 and r.json()["error"]["code"] == "model_not_found"
    assert await good.total() == 0


@pytest.mark.parametrize(
    ("fault", "timeouts", "status", "code"),
    [
        ("error500", {}, 502, "upstream_500"),
        ("error503", {}, 502, "upstream_503"),
        ("hang", SLOW_FIRST_BYTE, 504, "upstream_timeout"),
    ],
)
async def test_spent_retries_answer_5xx_with_should_retry_true_and_retry_after(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    fault: str,
    timeouts: dict[str, float],
    status: int,
    code: str,
) -> None:
    a, b = await sims(), await sims()
    for sim in (a, b):
        await sim.control(fault=fault)
    gw = await gateway_factory(
        policy(
            tmp_path,
            [Upstream("a", a.v1, timeouts=timeouts), Upstream("b", b.v1, timeouts=timeouts)],
            reliability=NO_EJECTION,
        )
    )
    for stream in (False, True):
        r = await call(session, gw.url, stream=stream)
        assert r.status == status
        # Waiting can help a transient failure: the SDK may retry, after retry-after.
        assert r.headers["x-should-retry"] == "true" and int(r.headers["retry-after"]) >= 1
        assert is_openai_error(r.body) and r.json()["error"]["code"] == code
    assert await a.total() == 2 and await b.total() == 2


async def test_no_backend_in_service_answers_503(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    a = await sims()
    await a.control(fault="error500")
    gw = await gateway_factory(
        policy(
            tmp_path,
            [Upstream("a", a.v1)],
            reliability={"breaker_consecutive_failures": 1, "breaker_base_ejection_s": 30},
        )
    )
    first = await call(session, gw.url)
    assert first.status == 502
    r = await call(session, gw.url)
    assert r.status == 503 and r.json()["error"]["code"] == "no_backend_available"
    assert r.headers["x-should-retry"] == "true", "every candidate is cooling down: wait"
    assert 25 <= int(r.headers["retry-after"]) <= 30, "retry-after is the ejection's end"
    assert await a.total() == 1


async def test_deadline_bounds_failover(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    slow, good = await sims(), await sims()
    await slow.control(fault="hang")
    gw = await gateway_factory(
        policy(
            tmp_path,
            [Upstream("slow", slow.v1, timeouts={"first_byte_s": 30}), Upstream("good", good.v1)],
        )
    )
    t0 = time.monotonic()
    r = await call(session, gw.url, headers={"x-neogate-timeout": "0.5"})
    elapsed = time.monotonic() - t0
    assert r.status == 504 and r.headers["x-should-retry"] == "true"
    assert r.headers["retry-after"] == "1"
    assert 0.45 <= elapsed < 2.0
    assert await good.total() == 0, "no attempt starts once the request's deadline has passed"


# --- a single candidate: one more try on the same backend ---------------------------------


async def _flaky_app(fail_first: int, status: int) -> tuple[web.AppRunner, str, list[int]]:
    """An upstream whose first `fail_first` requests get `status`, then a valid answer."""
    seen: list[int] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(len(seen))
        if len(seen) <= fail_first:
            return web.json_response(
                {
                    "error": {
                        "message": "flaky",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=status,
            )
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            chunk = (
                b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"x",'
                b'"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":"stop"}]}'
            )
            await resp.write(b"data: " + chunk + b"\n\ndata: [DONE]\n\n")
            return resp
        return web.json_response(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 1,
                "model": "x",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner, port = await start_site(app)
    return runner, f"http://127.0.0.1:{port}/v1", seen


@pytest.mark.parametrize("status", [500, 502, 503, 504])
@pytest.mark.parametrize("stream", [False, True])
async def test_single_backend_transient_failure_is_retried_once_on_it(
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    status: int,
    stream: bool,
) -> None:
    runner, url, seen = await _flaky_app(1, status)
    try:
        gw = await gateway_factory(policy(tmp_path, [Upstream("only", url)]))
        r = await call(session, gw.url, stream=stream)
        assert r.status == 200, r.body
        assert r.headers["x-neogate-attempts"] == "2" and len(seen) == 2
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("status", [400, 429])
async def test_single_backend_is_not_retried_on_a_lasting_failure(
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    status: int,
) -> None:
    runner, url, seen = await _flaky_app(1, status)
    try:
        gw = await gateway_factory(policy(tmp_path, [Upstream("only", url)]))
        r = await call(session, gw.url)
        assert r.status == status and len(seen) == 1
        if status == 400:  # the client's mistake: retrying cannot help
            assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers
        else:
            assert r.headers["x-should-retry"] == "true" and r.headers["retry-after"] == "1"
    finally:
        await runner.cleanup()


async def test_single_backend_retried_once_then_the_client_may_retry(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    a = await sims()
    await a.control(fault="error503")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    gw = await gateway_factory(policy(tmp_path, [Upstream("a", a.v1)], reliability=NO_EJECTION))
    r = await call(session, gw.url)
    assert r.status == 502 and await a.total() == 2, "one more try on the only backend"
    assert r.headers["x-should-retry"] == "true" and r.headers["retry-after"] == "1"
    gw2 = await gateway_factory(
        policy(tmp_path / "refused", [Upstream("dead", dead)], reliability=NO_EJECTION)
    )
    r = await call(session, gw2.url, stream=True)
    assert r.status == 502 and r.headers["x-should-retry"] == "true"
    assert r.headers["retry-after"] == "1"
    text = await metrics_text(session, gw2.url)
    assert metric(text, "neogate_upstream_errors_total", backend="dead") == 2.0


async def test_upstream_rejecting_the_gateways_credentials_is_not_for_the_client_to_retry(
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    runner, url, seen = await _flaky_app(10, 401)
    try:
        gw = await gateway_factory(policy(tmp_path, [Upstream("only", url)]))
        r = await call(session, gw.url)
        assert r.status == 502 and len(seen) == 1
        assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers
    finally:
        await runner.cleanup()


# --- 429 and retry-after -------------------------------------------------------------------


async def test_429_fails_over_and_cools_the_backend_down(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    limited, good = await sims(), await sims()
    await limited.control(fault="error429", delay_s=3.0)  # retry-after: 3
    gw = await gateway_factory(
        policy(tmp_path, [Upstream("limited", limited.v1), Upstream("good", good.v1)])
    )
    first = await call(session, gw.url)
    assert first.status == 200 and first.headers["x-neogate-attempts"] == "2"
    for stream in (False, True, False, True):
        r = await call(session, gw.url, stream=stream)
        assert r.status == 200 and r.headers["x-neogate-backend"] == "good"
        assert "x-neogate-attempts" not in r.headers, "the cooling backend is not tried at all"
    assert await limited.total() == 1
    rt = gw.app[RUNTIME].current
    breaker = rt.router.live.backends["limited"].breaker.snapshot(time.time())
    assert breaker.state == "closed", "a 429 is a limit, not ill health"


async def test_429_on_the_only_backend_reaches_the_client_with_retry_after(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    limited = await sims()
    await limited.control(fault="error429", delay_s=4.0)
    gw = await gateway_factory(policy(tmp_path, [Upstream("limited", limited.v1)]))
    r = await call(session, gw.url)
    assert r.status == 429 and is_openai_error(r.body)
    assert r.headers["retry-after"] == "4" and r.headers["x-should-retry"] == "true"
    again = await call(session, gw.url)
    assert again.status == 503, "inside the cool-down the provider is not asked again"
    assert 3 <= int(again.headers["retry-after"]) <= 4
    assert await limited.total() == 1


# --- the retry budget and the outage goal --------------------------------------------------


async def test_retry_budget_caps_upstream_amplification(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    flaky, good = await sims(seed=3), await sims()
    await flaky.control(fault="error500", fault_rate=0.8)
    gw = await gateway_factory(
        policy(
            tmp_path,
            [Upstream("flaky", flaky.v1), Upstream("good", good.v1)],
            reliability={**NO_EJECTION, "retry_budget_ratio": 0.2, "retry_budget_min": 5},
        )
    )
    n = 100
    replies = [await call(session, gw.url, max_tokens=2) for _ in range(n)]
    upstream = await flaky.total() + await good.total()
    failed = [r for r in replies if r.status != 200]
    assert upstream <= 1.25 * n, f"{upstream} upstream requests for {n} client requests"
    assert await good.total() <= 0.2 * n + 1, "retries stay within ratio x traffic"
    assert failed, "with 80% failures and a 20% budget some requests must fail"
    # The budget refused the retry: the SDK must not multiply the outage either.
    assert all(r.status == 502 and r.headers["x-should-retry"] == "false" for r in failed)
    assert not any("retry-after" in r.headers for r in failed)


async def test_total_outage_of_one_backend_is_invisible_and_cheap(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    """The goals: no client-visible error, and upstream traffic < 1.25x client traffic."""
    down, good = await sims(), await sims()
    await down.control(fault="error503")
    gw = await gateway_factory(
        policy(tmp_path, [Upstream("down", down.v1), Upstream("good", good.v1)])
    )
    n, width = 200, 10
    sem = asyncio.Semaphore(width)

    async def one(i: int) -> int:
        async with sem:
            r = await call(session, gw.url, stream=i % 2 == 1, max_tokens=4)
            return r.status

    statuses = await asyncio.gather(*(one(i) for i in range(n)))
    upstream = await down.total() + await good.total()
    assert statuses == [200] * n
    assert upstream < 1.25 * n, f"{upstream} upstream requests for {n} client requests"
    text = await metrics_text(session, gw.url)
    assert metric(text, "neogate_backend_healthy", backend="down") == 0.0


# --- circuit breaking -----------------------------------------------------------------------


async def until_not_open(breaker: Any, timeout_s: float = 5.0) -> None:
    """Poll (bounded) until the breaker's ejection has ended; the app's clock is the wall clock."""
    deadline = time.monotonic() + timeout_s
    while breaker.snapshot(time.time()).state == "open":
        assert time.monotonic() < deadline, "the ejection never ended"
        await asyncio.sleep(0.01)


async def test_breaker_ejects_then_probes_back_in(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    bad, good = await sims(), await sims()
    await bad.control(fault="error500")
    gw = await gateway_factory(
        policy(
            tmp_path,
            [Upstream("bad", bad.v1), Upstream("good", good.v1)],
            reliability={"breaker_consecutive_failures": 3, "breaker_base_ejection_s": 0.4},
        )
    )
    breaker = gw.app[RUNTIME].current.router.live.backends["bad"].breaker
    for _ in range(3):
        assert (await call(session, gw.url)).status == 200
    assert breaker.snapshot(time.time()).state == "open"
    text = await metrics_text(session, gw.url)
    assert metric(text, "neogate_backend_healthy", backend="bad") == 0.0
    assert metric(text, "neogate_backend_healthy", backend="good") == 1.0
    admin = await _admin_health(session, gw)
    assert admin["bad"]["state"] == "open" and admin["bad"]["healthy"] is False
    assert admin["good"]["state"] == "closed" and admin["good"]["healthy"] is True
    for _ in range(5):
        r = await call(session, gw.url)
        assert r.headers["x-neogate-backend"] == "good" and "x-neogate-attempts" not in r.headers
    assert await bad.total() == 3, "an ejected backend gets no traffic"

    # The ejection ends; the half-open probe fails: ejected again, for twice as long.
    await until_not_open(breaker)
    sent = time.time()
    assert (await call(session, gw.url)).status == 200
    answered = time.time()
    assert await bad.total() == 4
    snap = breaker.snapshot(time.time())
    assert snap.state == "open" and snap.ejections == 2
    # The probe failed between `sent` and `answered`; the ejection is 2 x 0.4 s from then.
    assert snap.open_until is not None
    assert sent + 0.8 <= snap.open_until <= answered + 0.8

    # The backend recovers; the next probe succeeds and it is back in service.
    await bad.control(reset=True)
    await until_not_open(breaker)
    r = await call(session, gw.url)
    assert r.status == 200 and r.headers["x-neogate-backend"] == "bad"
    assert breaker.snapshot(time.time()).state == "closed"
    text = await metrics_text(session, gw.url)
    assert metric(text, "neogate_backend_healthy", backend="bad") == 1.0


async def _admin_health(session: aiohttp.ClientSession, gw: Gateway) -> dict[str, Any]:
    """Each backend's breaker view from /admin/backends."""
    async with session.get(
        gw.url + "/admin/backends", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as r:
        assert r.status == 200
        data = await r.json()
    return {row["name"]: row["health"] for row in data["backends"]}


# --- timeouts after the first byte, and mid-stream failures ---------------------------------


async def test_idle_gap_timeout_cuts_a_stalled_stream(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    stalled, good = await sims(), await sims()
    await stalled.control(fault="stall")
    gw = await gateway_factory(
        policy(
            tmp_path,
            [Upstream("stalled", stalled.v1, timeouts={"idle_s": 0.3}), Upstream("good", good.v1)],
        )
    )
    t0 = time.monotonic()
    r = await call(session, gw.url, stream=True, max_tokens=20)
    elapsed = time.monotonic() - t0
    assert r.status == 200 and r.headers["x-neogate-backend"] == "stalled"
    assert not r.done
    *tokens, last = r.events
    # The role chunk, then the tokens sent before the stall.
    assert len(tokens) == 1 + TOKENS_BEFORE_MIDSTREAM_FAULT
    assert last.startswith(b"data: ") and is_openai_error(last[6:])
    assert b"upstream_timeout" in last
    assert 0.3 <= elapsed < 2.0
    assert await good.total() == 0, "after the first byte there is no silent splice"
    await _until_idle(stalled)


async def _until_idle(sim: object, timeout_s: float = 3.0) -> None:
    """Wait until a sim has nothing in flight (the gateway closed its side)."""
    from tests.integration.faultkit import Sim

    assert isinstance(sim, Sim)
    deadline = time.monotonic() + timeout_s
    while (await sim.stats())["in_flight"] and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert (await sim.stats())["in_flight"] == 0


async def test_request_timeout_header_bounds_a_long_stream_and_a_whole_answer(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    slow = await sims(time_scale=1.0, tokens_per_s=10.0, ttft_s_mean=0.05, ttft_s_jitter=0.0)
    gw = await gateway_factory(policy(tmp_path, [Upstream("slow", slow.v1)]))
    t0 = time.monotonic()
    r = await call(
        session, gw.url, stream=True, max_tokens=50, headers={"x-neogate-timeout": "0.8"}
    )
    elapsed = time.monotonic() - t0
    assert r.status == 200 and not r.done
    assert b"upstream_timeout" in r.events[-1]
    assert len(r.events) > 3, "tokens until the deadline were relayed"
    assert 0.7 <= elapsed < 2.0
    t0 = time.monotonic()
    whole = await call(session, gw.url, max_tokens=50, headers={"x-neogate-timeout": "0.5"})
    assert whole.status == 504 and whole.headers["x-should-retry"] == "true"
    assert time.monotonic() - t0 < 1.5
    await _until_idle(slow)


@pytest.mark.parametrize(
    ("fault", "code"), [("cut", b"upstream_bad_response"), ("error_midstream", b"sim_midstream")]
)
async def test_midstream_failure_is_an_error_event_without_done(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    fault: str,
    code: bytes,
) -> None:
    broken, good = await sims(), await sims()
    await broken.control(fault=fault)
    gw = await gateway_factory(
        policy(tmp_path, [Upstream("broken", broken.v1), Upstream("good", good.v1)])
    )
    r = await call(session, gw.url, stream=True, max_tokens=20)
    assert r.status == 200 and r.headers["x-neogate-backend"] == "broken"
    assert not r.done
    assert sum(1 for e in r.events if b'"delta"' in e) == 1 + TOKENS_BEFORE_MIDSTREAM_FAULT
    assert r.events[-1].startswith(b'data: {"error"') and code in r.events[-1]
    assert await good.total() == 0
    text = await metrics_text(session, gw.url)
    completion = metric(
        text, "neogate_tokens_total", backend="broken", model=MODEL, kind="completion"
    )
    assert completion is not None and completion >= TOKENS_BEFORE_MIDSTREAM_FAULT, (
        "the partial tokens are metered"
    )


# --- hedging --------------------------------------------------------------------------------


@pytest.mark.parametrize("hedge", [False, True])
async def test_hedging_of_the_first_byte(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    hedge: bool,
) -> None:
    slow, fast = await sims(), await sims()
    await slow.control(fault="slow", delay_s=0.6)
    reliability: dict[str, object] = {"hedge": True, "hedge_delay_s": 0.1} if hedge else {}
    gw = await gateway_factory(
        policy(
            tmp_path,
            [Upstream("slow", slow.v1), Upstream("fast", fast.v1)],
            reliability=reliability,
        )
    )
    t0 = time.monotonic()
    r = await call(session, gw.url, stream=True)
    elapsed = time.monotonic() - t0
    assert r.status == 200 and r.done
    assert await slow.total() == 1
    if hedge:
        assert r.headers["x-neogate-backend"] == "fast" and elapsed < 0.5
        assert await fast.total() == 1
        await _until_idle(slow)  # the loser was cancelled, not left running
        # The winner is the tenant's row; the loser had the prompt and is the operator's.
        with sqlite3.connect(tmp_path / "ledger.db") as db:
            rows = db.execute(
                "SELECT tenant, backend, outcome, attempt, prompt_tokens, completion_tokens,"
                " cost_nusd FROM ledger WHERE request_id = ? ORDER BY attempt",
                [r.headers["x-request-id"]],
            ).fetchall()
        assert [row[:4] for row in rows] == [
            ("(operator)", "slow", "hedge_cancelled", 0),
            ("anonymous", "fast", "ok", 1),
        ]
        loser = rows[0]
        assert loser[4] > 0 and loser[5] == 0 and loser[6] > 0  # the prompt, at its price
    else:
        assert r.headers["x-neogate-backend"] == "slow" and elapsed >= 0.6
        assert await fast.total() == 0, "hedging is off by default"


# --- back-pressure --------------------------------------------------------------------------


async def _wait_inflight(sim: object, n: int) -> None:
    from tests.integration.faultkit import Sim

    assert isinstance(sim, Sim)
    deadline = time.monotonic() + 3.0
    while (await sim.stats())["in_flight"] < n:
        assert time.monotonic() < deadline, "the upstream never saw the request"
        await asyncio.sleep(0.01)


async def test_backend_at_capacity_spills_to_the_next(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    small, other = await sims(), await sims()
    await small.control(fault="slow_first_byte", delay_s=0.5)
    gw = await gateway_factory(
        policy(
            tmp_path,
            [Upstream("small", small.v1, max_concurrency=1), Upstream("other", other.v1)],
        )
    )
    held = asyncio.create_task(call(session, gw.url))
    await _wait_inflight(small, 1)
    r = await call(session, gw.url)
    assert r.status == 200 and r.headers["x-neogate-backend"] == "other"
    assert "x-neogate-attempts" not in r.headers, "a full backend is skipped, not failed"
    assert (await held).headers["x-neogate-backend"] == "small"


async def test_queue_wait_then_429_with_retry_after(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    one = await sims()
    await one.control(fault="slow_first_byte", delay_s=0.8)
    gw = await gateway_factory(
        policy(
            tmp_path,
            [Upstream("one", one.v1, max_concurrency=1)],
            reliability={"max_queue": 1, "queue_wait_s": 0.3},
        )
    )
    held = asyncio.create_task(call(session, gw.url))
    await _wait_inflight(one, 1)
    queued = asyncio.create_task(call(session, gw.url))
    await asyncio.sleep(0.05)
    full = await call(session, gw.url)  # the queue (1) is taken: refused at once
    assert full.status == 429 and full.json()["error"]["code"] == "gateway_queue_full"
    timed_out = await queued
    assert timed_out.status == 429 and timed_out.json()["error"]["code"] == "gateway_queue_timeout"
    for r in (full, timed_out):
        assert int(r.headers["retry-after"]) >= 1 and is_openai_error(r.body)
    assert (await held).status == 200
    assert await one.total() == 1, "rejected requests never reached the upstream"
    assert gw.app[RUNTIME].process.reliability.gate.snapshot().inflight_total == 0


async def test_queued_request_is_served_when_a_slot_frees(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    one = await sims()
    await one.control(fault="slow_first_byte", delay_s=0.3)
    gw = await gateway_factory(
        policy(
            tmp_path,
            [Upstream("one", one.v1)],
            reliability={"max_queue": 4, "queue_wait_s": 3.0},
            max_inflight=1,  # the total limit binds, not the backend's
        )
    )
    replies = await asyncio.gather(*(call(session, gw.url) for _ in range(3)))
    assert [r.status for r in replies] == [200, 200, 200]
    assert (await one.stats())["in_flight"] == 0


async def test_client_that_stops_reading_is_cut(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
) -> None:
    """A stream to a client that never reads is cut after the idle bound; nothing stays pinned."""
    # 30,000 tokens at 0.2 ms each: the upstream would stream for 6 s (about 7 MB).
    fast = await sims(tokens_per_s=50.0)
    gw = await gateway_factory(
        policy(tmp_path, [Upstream("fast", fast.v1, timeouts={"idle_s": 0.5})])
    )
    port = int(gw.url.rsplit(":", 1)[1])
    body = (
        b'{"model": "m", "stream": true, "max_tokens": 30000, "ignore_eos": true, '
        b'"messages": [{"role": "user", "content": "go"}]}'
    )
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        await _wait_inflight(fast, 1)
        gate = gw.app[RUNTIME].process.reliability.gate
        t0 = time.monotonic()
        while gate.snapshot().inflight_total and time.monotonic() - t0 < 5.0:
            await asyncio.sleep(0.05)
        assert gate.snapshot().inflight_total == 0, "the stalled client still holds its slot"
        await _until_idle(fast, timeout_s=1.0)
        assert time.monotonic() - t0 < 5.5, "the upstream was closed before it finished"
        received = b""
        while True:  # what was buffered, then the end: the gateway closed the connection
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 2.0)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        assert b"data: [DONE]" not in received, "the stream was cut, not finished"
    finally:
        sock.close()
    text = await metrics_text(session, gw.url)
    assert (
        metric(text, "neogate_requests_total", backend="fast", outcome="client_disconnect") == 1.0
    )
