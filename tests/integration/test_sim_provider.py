"""The simulated provider (and the static upstream) on a real socket: wire format, budgets, faults, control."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from adapters.dialects.ratelimits import groq_headroom
from loadtest.sim.cli import add_sim_parser, build_app
from loadtest.sim.common import start_site
from loadtest.sim.provider import ProviderOptions, create_provider_app
from loadtest.sim.ratelimit import format_duration
from loadtest.sim.static import create_static_app
from policies.headroom import Headroom, parse_reset

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wire"

MODEL = "llama-3.1-8b-instant"


def quick(**kw: Any) -> ProviderOptions:
    """A provider fast enough for tests: ~2 ms to the first token, 5000 tokens/s."""
    return ProviderOptions(ttft_s_mean=0.002, ttft_s_jitter=0.001, tokens_per_s=5000.0, **kw)


Serve = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def _serve(app: web.Application) -> str:
        runner, port = await start_site(app)
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield _serve
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def provider(serve: Serve) -> str:
    return await serve(create_provider_app(quick()))


def client(base: str, **kw: Any) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=base + "/v1", api_key=kw.pop("api_key", "x"), max_retries=0, **kw)


def chat_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 6,
        **extra,
    }


def sse_events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") for e in events)
    return [e[len(b"data: ") :] for e in events]


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, **kw: Any
) -> tuple[int, Any, bytes]:
    async with http.post(url, json=body, **kw) as resp:
        return resp.status, resp.headers, await resp.read()


async def stats(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.get(base + "/sim/stats") as resp:
        data: dict[str, Any] = await resp.json()
        return data


async def control(http: aiohttp.ClientSession, base: str, **body: Any) -> dict[str, Any]:
    async with http.post(base + "/sim/control", json=body) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


async def test_groq_non_stream_usage_timings(provider: str) -> None:
    async with client(provider) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=6
        )
        assert raw.headers["x-request-id"]
        r = raw.parse()
        assert r.object == "chat.completion" and r.choices[0].finish_reason == "length"
        usage = r.usage
        assert usage and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
            10,
            6,
            16,
        )
        timings = usage.model_extra or {}
        assert set(timings) >= {"queue_time", "prompt_time", "completion_time", "total_time"}
        assert timings["total_time"] == pytest.approx(
            timings["prompt_time"] + timings["completion_time"], rel=1e-4
        )
        assert timings["completion_time"] == pytest.approx(6 / 5000, rel=1e-4)
        extra = r.model_extra or {}
        assert extra["x_groq"]["id"].startswith("req_") and extra["x_sim"] == {
            "backend": "provider"
        }


async def test_groq_stream_puts_usage_in_final_chunk(
    provider: str, http: aiohttp.ClientSession
) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    status, headers, raw = await post(http, provider + "/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and "x_groq" in chunks[0]
    finish = chunks[-2]
    assert finish["choices"][0]["finish_reason"] == "length"
    assert finish["x_groq"]["usage"]["completion_tokens"] == 6
    assert set(finish["x_groq"]["usage"]) >= {
        "queue_time",
        "prompt_time",
        "completion_time",
        "total_time",
    }
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 16
    assert all(ch["usage"] is None for ch in chunks[:-1])


async def test_plain_openai_flavour_without_groq_fields(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    base = await serve(create_provider_app(quick(groq_timings=False)))
    _, _, raw = await post(http, base + "/v1/chat/completions", chat_body())
    body = orjson.loads(raw)
    assert "x_groq" not in body and "queue_time" not in body["usage"]
    _, _, raw = await post(http, base + "/v1/chat/completions", chat_body(stream=True))
    assert b"x_groq" not in raw and b'"usage"' not in raw


async def test_latency_follows_options(serve: Serve, http: aiohttp.ClientSession) -> None:
    opts = ProviderOptions(ttft_s_mean=0.3, ttft_s_jitter=0.0, tokens_per_s=200.0, time_scale=0.5)
    base = await serve(create_provider_app(opts))
    started = time.monotonic()
    arrivals = []
    async with http.post(
        base + "/v1/chat/completions", json=chat_body(max_tokens=10, stream=True)
    ) as resp:
        headers_at = time.monotonic() - started
        async for line in resp.content:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic() - started)
    assert headers_at < 0.1  # headers at once, the first token 0.15 s later
    assert 0.15 <= arrivals[0] < 0.15 + 0.1  # 0.3 s x 0.5
    gap = (arrivals[10] - arrivals[1]) / 9
    assert 0.0025 * 0.7 < gap < 0.0025 * 1.8  # 1 / 200 tokens/s x 0.5


async def test_n_tools_completions_embeddings_models(provider: str) -> None:
    async with client(provider) as c:
        r = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], n=2, max_tokens=4
        )
        assert len(r.choices) == 2 and r.usage and r.usage.completion_tokens == 8
        tool: Any = {
            "type": "function",
            "function": {"name": "lookup", "parameters": {"type": "object"}},
        }
        t = await c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            tools=[tool],
            tool_choice="required",
        )
        assert t.choices[0].finish_reason == "tool_calls"
        calls: Any = t.choices[0].message.tool_calls
        assert calls[0].function.name == "lookup"
        comp = await c.completions.create(model=MODEL, prompt=[1, 2, 3, 4, 5], max_tokens=3)
        assert (
            comp.usage
            and comp.usage.prompt_tokens == 5
            and comp.choices[0].finish_reason == "length"
        )
        emb = await c.embeddings.create(model=MODEL, input="hello", encoding_format="float")
        assert len(emb.data[0].embedding) == 768 and emb.usage.prompt_tokens == 2
        models = await c.models.list()
        assert [m.id for m in models.data] == list(ProviderOptions().model_ids)
        assert (models.data[0].model_extra or {})["context_window"] == 131072


async def test_api_key_required_when_configured(serve: Serve) -> None:
    base = await serve(create_provider_app(quick(api_key="sekret")))
    async with client(base, api_key="wrong") as c:
        with pytest.raises(openai.AuthenticationError) as err:
            await c.models.list()
        assert err.value.code == "invalid_api_key"
    async with client(base, api_key="sekret") as c:
        assert (await c.models.list()).data


async def test_rpm_budget_gives_429_with_headers(serve: Serve, http: aiohttp.ClientSession) -> None:
    # OpenAI-style headers (not Groq): x-ratelimit-*-requests is the per-minute budget.
    base = await serve(
        create_provider_app(quick(rpm_limit=3, tpm_limit=100_000, groq_timings=False))
    )
    remaining = []
    for _ in range(3):
        status, headers, _ = await post(http, base + "/v1/chat/completions", chat_body())
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-limit-tokens"] == "100000"
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        remaining.append(int(headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]
    status, headers, raw = await post(http, base + "/v1/chat/completions", chat_body())
    assert status == 429
    assert (
        1 <= int(headers["retry-after"]) <= 20
        and 15_000 <= int(headers["retry-after-ms"]) <= 20_000
    )
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert 100_000 - 3 * 16 <= int(headers["x-ratelimit-remaining-tokens"]) < 100_000  # refills
    error = orjson.loads(raw)["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    async with client(base) as c:
        with pytest.raises(openai.RateLimitError):
            await c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}]
            )
    assert (await stats(http, base))["by_status"] == {"200": 3, "429": 2}


async def test_tpm_budget_and_control_of_remaining(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    base = await serve(create_provider_app(quick(tpm_limit=1000)))
    status, headers, _ = await post(http, base + "/v1/chat/completions", chat_body())
    assert status == 200 and "x-ratelimit-limit-requests" not in headers
    state = await control(http, base, remaining_tokens=10)
    assert state["x-ratelimit-remaining-tokens"] == "10"
    status, headers, raw = await post(http, base + "/v1/chat/completions", chat_body())
    assert status == 429 and orjson.loads(raw)["error"]["type"] == "tokens"
    assert headers["x-ratelimit-reset-tokens"].endswith("s")
    status, _, _ = await post(
        http, base + "/v1/chat/completions", chat_body(max_tokens=2000, ignore_eos=True)
    )
    assert status == 413  # larger than the whole budget
    await control(http, base, tpm_limit=None, rpm_limit=1)
    status, headers, _ = await post(http, base + "/v1/chat/completions", chat_body())
    assert status == 200 and "x-ratelimit-limit-tokens" not in headers
    # Groq-like: a per-minute request budget is enforced but never reported in headers.
    assert "x-ratelimit-remaining-requests" not in headers
    status, headers, _ = await post(http, base + "/v1/chat/completions", chat_body())
    assert status == 429 and int(headers["retry-after"]) >= 1


async def test_groq_headers_are_what_groq_sends_and_the_groq_dialect_reads_them(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    """Groq reports requests per DAY and tokens per minute under x-ratelimit-*
    (tests/fixtures/wire/headers_groq.txt); its per-minute request limit shows only as a 429.
    The simulated Groq sends the same, and the `groq` dialect reads it as the real thing."""
    fixture = (FIXTURES / "headers_groq.txt").read_text().splitlines()
    wanted = {line.split(":")[0] for line in fixture if line.startswith("x-ratelimit-")}
    base = await serve(create_provider_app(quick(rpm_limit=2, rpd_limit=14_400, tpm_limit=18_000)))
    status, headers, _ = await post(http, base + "/v1/chat/completions", chat_body())
    assert status == 200
    assert {k.lower() for k in headers if k.lower().startswith("x-ratelimit-")} == wanted
    assert headers["x-ratelimit-limit-requests"] == "14400"
    assert headers["x-ratelimit-remaining-requests"] == "14399"
    # A day's bucket refills in about 6 s per request: the reset reads like Groq's 2m59.56s.
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert 5.0 < parse_reset(headers["x-ratelimit-reset-requests"]) < 7.0
    h = groq_headroom(headers, 100.0, Headroom())
    assert (h.daily_limit_requests, h.daily_remaining_requests) == (14_400, 14_399)
    assert (h.limit_requests, h.remaining_requests) == (None, None)
    assert h.limit_tokens == 18_000 and h.remaining_tokens is not None
    assert 18_000 - 16 <= h.remaining_tokens < 18_000  # 16 taken, refilling at 300/s
    await post(http, base + "/v1/chat/completions", chat_body())
    status, headers, raw = await post(http, base + "/v1/chat/completions", chat_body())
    assert status == 429 and headers["x-ratelimit-remaining-requests"] == "14398"
    error = orjson.loads(raw)["error"]
    assert error["type"] == "requests" and "requests per minute (RPM)" in error["message"]


def test_reset_durations_format() -> None:
    assert format_duration(0.012) == "12ms"
    assert format_duration(7.66) == "7.66s"
    assert format_duration(1.0) == "1s"
    assert format_duration(60.0) == "1m0s"
    assert format_duration(179.56) == "2m59.56s"
    assert format_duration(3600.0) == "1h0m0s"


async def test_error_faults(provider: str, http: aiohttp.ClientSession) -> None:
    url = provider + "/v1/chat/completions"
    for fault, status, type_ in [
        ("error400", 400, "invalid_request_error"),
        ("error429", 429, "requests"),
        ("error500", 500, "server_error"),
        ("error503", 503, "server_error"),
    ]:
        code, headers, raw = await post(http, url, chat_body(), headers={"x-sim-fault": fault})
        error = orjson.loads(raw)["error"]
        assert (code, error["type"]) == (status, type_)
        assert set(error) == {"message", "type", "param", "code"}
        if status == 429:
            assert headers["retry-after"] == "1" and headers["retry-after-ms"] == "1000"
    code, headers, _ = await post(
        http, url, chat_body(), headers={"x-sim-fault": "error429", "x-sim-delay": "2.5"}
    )
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("3", "2500")
    code, _, raw = await post(http, url, chat_body(model=MODEL + "@error503"))
    assert code == 503
    code, _, raw = await post(http, url, chat_body(), headers={"x-sim-fault": "explode"})
    assert code == 400 and b"unknown fault" in raw
    assert (await stats(http, provider))["by_fault"]["error503"] == 2


async def test_cut_stream_and_body(provider: str, http: aiohttp.ClientSession) -> None:
    url = provider + "/v1/chat/completions"
    async with http.post(
        url, json=chat_body(stream=True, max_tokens=20), headers={"x-sim-fault": "cut"}
    ) as resp:
        assert resp.status == 200
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for data in resp.content.iter_any():
                received += data
    events = sse_events(received)
    assert len(events) == 4 and b"[DONE]" not in received  # role + 3 tokens
    async with http.post(url, json=chat_body(model=MODEL + "@cut")) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    async with client(provider) as c:
        with pytest.raises(openai.APIConnectionError):
            await c.chat.completions.create(
                model=MODEL + "@cut", messages=[{"role": "user", "content": "x"}]
            )


async def test_error_midstream_and_malformed(provider: str, http: aiohttp.ClientSession) -> None:
    url = provider + "/v1/chat/completions"
    _, _, raw = await post(
        http, url, chat_body(stream=True), headers={"x-sim-fault": "error_midstream"}
    )
    events = sse_events(raw)
    assert b"[DONE]" not in events and orjson.loads(events[-1])["error"]["type"] == "server_error"
    async with client(provider) as c:
        stream = await c.chat.completions.create(
            model=MODEL + "@error_midstream",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
        )
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    _, _, raw = await post(http, url, chat_body(stream=True), headers={"x-sim-fault": "malformed"})
    events = sse_events(raw)
    bad = []
    for e in events[:-1]:
        try:
            orjson.loads(e)
        except orjson.JSONDecodeError:
            bad.append(e)
    assert len(bad) == 1 and events[-1] == b"[DONE]"
    status, _, raw = await post(http, url, chat_body(), headers={"x-sim-fault": "malformed"})
    assert status == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)


async def test_hang_and_stall(provider: str, http: aiohttp.ClientSession) -> None:
    url = provider + "/v1/chat/completions"
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.3):
            await post(http, url, chat_body(), headers={"x-sim-fault": "hang"})
    async with http.post(
        url, json=chat_body(stream=True), headers={"x-sim-fault": "stall"}
    ) as resp:
        assert resp.status == 200
        got = b""
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                async for data in resp.content.iter_any():
                    got += data
        assert len(sse_events(got)) == 4
    s = await stats(http, provider)
    assert s["by_fault"] == {"hang": 1, "stall": 1}
    # The hung handler was cancelled when its client went away.
    for _ in range(100):
        if (await stats(http, provider))["in_flight"] == 0:
            break
        await asyncio.sleep(0.01)
    assert (await stats(http, provider))["in_flight"] == 0


async def test_slow_first_byte_and_slow(provider: str, http: aiohttp.ClientSession) -> None:
    url = provider + "/v1/chat/completions"
    started = time.monotonic()
    async with http.post(
        url,
        json=chat_body(stream=True),
        headers={"x-sim-fault": "slow_first_byte", "x-sim-delay": "0.2"},
    ) as resp:
        assert time.monotonic() - started >= 0.2
        assert sse_events(await resp.read())[-1] == b"[DONE]"
    started = time.monotonic()
    async with http.post(
        url, json=chat_body(stream=True), headers={"x-sim-fault": "slow", "x-sim-delay": "0.2"}
    ) as resp:
        assert time.monotonic() - started < 0.15  # headers at once
        await resp.content.readline()
        assert time.monotonic() - started >= 0.2  # first token late
        await resp.read()


async def test_control_flips_faults_and_rates(provider: str, http: aiohttp.ClientSession) -> None:
    url = provider + "/v1/chat/completions"
    state = await control(http, provider, fault="error503", reset_stats=True)
    assert state["fault"] == "error503" and state["fault_rate"] == 1.0
    assert (await post(http, url, chat_body()))[0] == 503
    await control(http, provider, fault_rate=0.0)
    assert (await post(http, url, chat_body()))[0] == 200
    await control(http, provider, fault_rate=0.5)
    outcomes = [(await post(http, url, chat_body(max_tokens=1)))[0] for _ in range(40)]
    assert 5 < outcomes.count(503) < 35
    await control(http, provider, fault="slow_first_byte", fault_rate=1.0, delay_s=0.1)
    started = time.monotonic()
    assert (await post(http, url, chat_body()))[0] == 200
    assert time.monotonic() - started >= 0.1
    await control(http, provider, reset=True)
    assert (await post(http, url, chat_body()))[0] == 200
    for bad in ({"fault": "nope"}, {"fault_rate": 2}, {"frobnicate": 1}, {"remaining_tokens": 5}):
        async with http.post(provider + "/sim/control", json=bad) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["message"]
    s = await stats(http, provider)
    assert s["total"] == 44 and s["by_model"] == {MODEL: 44} and s["by_endpoint"] == {"chat": 44}


async def test_default_fault_option(serve: Serve, http: aiohttp.ClientSession) -> None:
    base = await serve(create_provider_app(quick(fault="error500")))
    assert (await post(http, base + "/v1/chat/completions", chat_body()))[0] == 500
    assert (await post(http, base + "/v1/embeddings", {"model": MODEL, "input": "x"}))[0] == 500
    # a header wins over the default
    headers = {"x-sim-fault": "none"}
    assert (await post(http, base + "/v1/chat/completions", chat_body(), headers=headers))[0] == 200


async def test_prompt_cache_option(serve: Serve) -> None:
    base = await serve(create_provider_app(quick(prompt_cache=True)))
    messages: Any = [{"role": "user", "content": "z" * 2000}]
    async with client(base) as c:
        first = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
        second = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert first.usage and first.usage.prompt_tokens_details
    assert second.usage and second.usage.prompt_tokens_details
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < (second.usage.prompt_tokens_details.cached_tokens or 0) < second.usage.prompt_tokens


async def check_static_answers(base: str) -> None:
    """A static upstream (model "m", 7 prompt and 5 completion tokens) through the SDK:
    the same text whole, streamed with its usage chunk, and as a text completion."""
    async with client(base) as c:
        r = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert r.usage and (r.usage.prompt_tokens, r.usage.completion_tokens) == (7, 5)
        text = ""
        usage = None
        stream = await c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        async for chunk in stream:
            text += "".join(ch.delta.content or "" for ch in chunk.choices)
            usage = chunk.usage or usage
        assert text == r.choices[0].message.content and usage and usage.total_tokens == 12
        comp = await c.completions.create(model="m", prompt="x")
        assert comp.choices[0].text == text


async def test_static_upstream(serve: Serve, http: aiohttp.ClientSession) -> None:
    base = await serve(create_static_app(model="m", completion_tokens=5, prompt_tokens=7))
    await check_static_answers(base)
    _, headers, raw = await post(
        http, base + "/v1/chat/completions", {"stream": True, "model": "m"}
    )
    assert headers["Content-Type"] == "text/event-stream"
    events = sse_events(raw)
    assert events[-1] == b"[DONE]" and b'"usage"' not in raw and len(events) == 1 + 5 + 1 + 1


async def test_cli_builds_each_backend(serve: Serve, http: aiohttp.ClientSession) -> None:
    parser = argparse.ArgumentParser(prog="neogate")
    add_sim_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["sim", "worker", "--model", "a", "--model", "b", "--time-scale", "0.01", "--flavor", "sglang",
         "--decode-profile", "1:100,10:500"]
    )  # fmt: skip
    base = await serve(build_app(args))
    async with http.get(base + "/v1/models") as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == ["a", "b"]
    async with http.get(base + "/metrics") as resp:
        assert "sglang:num_running_reqs" in await resp.text()
    args = parser.parse_args(["sim", "provider", "--rpd-limit", "5", "--fault", "error503"])
    base = await serve(build_app(args))
    status, headers, _ = await post(http, base + "/v1/chat/completions", chat_body())
    assert status == 503 and headers["x-ratelimit-limit-requests"] == "5"
    args = parser.parse_args(["sim", "static", "--completion-tokens", "3"])
    base = await serve(build_app(args))
    status, _, raw = await post(http, base + "/v1/chat/completions", chat_body())
    assert status == 200 and orjson.loads(raw)["usage"]["completion_tokens"] == 3
    assert args.func.__name__ == "run_sim"
    with pytest.raises(SystemExit):
        parser.parse_args(["sim", "worker", "--decode-profile", "fast"])


async def test_cleanup_releases_hanging_requests(http: aiohttp.ClientSession) -> None:
    runner, port = await start_site(create_provider_app(quick()))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    hanging = asyncio.create_task(post(http, url, chat_body(), headers={"x-sim-fault": "hang"}))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await runner.cleanup()
    assert time.monotonic() - started < 1.0
    status, _, raw = await hanging
    assert status == 503 and orjson.loads(raw)["error"]["code"] == "shutdown"


async def test_bare_static_upstream_answers_like_the_aiohttp_one(
    http: aiohttp.ClientSession,
) -> None:
    from loadtest.sim.static_raw import StaticAnswers, start_static_raw

    server, port = await start_static_raw(
        "127.0.0.1", 0, StaticAnswers(model="m", completion_tokens=5, prompt_tokens=7)
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await check_static_answers(base)
        async with client(base) as c:
            assert [m.id async for m in c.models.list()] == ["m"]
        async with http.get(base + "/nope") as resp:
            assert resp.status == 404
        # Two requests in one write (pipelined) get two answers, in order.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"model": "m", "stream": true}'
        req = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        writer.write(req + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = b""
        while raw.count(b"HTTP/1.1 200 OK") < 2:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk, raw
            raw += chunk
        assert raw.index(b"text/event-stream") < raw.rindex(b"HTTP/1.1 200 OK")
        # A request it cannot frame: 400, and the connection closes.
        writer.write(b"NONSENSE\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(), 5)
        assert rest.startswith(b"HTTP/1.1 400")
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
