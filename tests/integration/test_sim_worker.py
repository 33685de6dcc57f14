"""The simulated GPU worker on a real socket, driven by the openai SDK and raw aiohttp."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from openai import AsyncOpenAI, NotFoundError

from loadtest.sim.common import start_site
from loadtest.sim.scheduler import step_seconds
from loadtest.sim.worker import WorkerOptions, create_worker_app
from policies.profile import parse_profile

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
FAST = 0.01  # time_scale: 100x faster than a real H100

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
async def worker(serve: Serve) -> str:
    return await serve(create_worker_app(WorkerOptions(time_scale=FAST)))


def client(base: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], **extra}


def sse_events(raw: bytes) -> list[bytes]:
    """Split an event stream, checking every event is exactly `data: ...\\n\\n`."""
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events), raw[:300]
    return [e[len(b"data: ") :] for e in events]


async def metrics(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """Samples of /metrics as {"name{labels}": value}."""
    async with http.get(base + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def sample(samples: dict[str, float], name: str, **labels: str) -> float:
    labels = {"model_name": MODEL, **labels}
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            return value
    raise KeyError(name)


async def test_chat_non_stream_wire_format(worker: str) -> None:
    async with client(worker) as c:
        r = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=5
        )
        assert r.id.startswith("chatcmpl-")
        assert r.object == "chat.completion"
        assert r.model == MODEL
        assert r.system_fingerprint
        assert abs(r.created - time.time()) < 5
        (choice,) = r.choices
        assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
        assert choice.message.role == "assistant" and choice.message.content
        assert r.usage is not None
        # 3 (priming) + 4 (message) + ceil(11 / 4)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
            10,
            5,
            15,
        )
        assert r.usage.prompt_tokens_details and r.usage.prompt_tokens_details.cached_tokens == 0
        assert r.usage.completion_tokens_details
        assert r.usage.completion_tokens_details.reasoning_tokens == 0
        assert (r.model_extra or {})["x_sim"]["backend"] == "worker"

        r = await c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"unknown_field": 1},
        )
        assert r.choices[0].finish_reason == "stop"
        assert r.usage and r.usage.completion_tokens == WorkerOptions().default_max_tokens


async def test_max_completion_tokens_ignore_eos_and_n(worker: str) -> None:
    async with client(worker) as c:
        r = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_completion_tokens=100,
            extra_body={"ignore_eos": True}, n=3,
        )  # fmt: skip
        assert [ch.index for ch in r.choices] == [0, 1, 2]
        assert all(ch.finish_reason == "length" for ch in r.choices)
        assert r.usage and r.usage.completion_tokens == 300
        texts = {ch.message.content for ch in r.choices}
        assert len(texts) == 3  # n samples differ
        again = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_completion_tokens=100,
            extra_body={"ignore_eos": True}, n=3,
        )  # fmt: skip
        assert [ch.message.content for ch in again.choices] == [
            ch.message.content for ch in r.choices
        ]


async def test_stream_with_usage_exact_framing(worker: str, http: aiohttp.ClientSession) -> None:
    body = chat_body(max_tokens=4, stream=True, stream_options={"include_usage": True})
    async with http.post(worker + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["x-request-id"]
        events = sse_events(await resp.read())
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert len({ch["id"] for ch in chunks}) == 1
    *stream, last = chunks
    assert all("usage" in ch and ch["usage"] is None for ch in stream)
    assert stream[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "x_sim" in stream[0]
    contents = [ch["choices"][0]["delta"]["content"] for ch in stream[1:-1]]
    assert len(contents) == 4
    assert stream[-1]["choices"][0]["finish_reason"] == "length"
    assert stream[-1]["choices"][0]["delta"] == {}
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 4 and last["usage"]["prompt_tokens"] == 10


async def test_stream_without_usage_has_no_usage_anywhere(
    worker: str, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        worker + "/v1/chat/completions", json=chat_body(max_tokens=3, stream=True)
    ) as resp:
        events = sse_events(await resp.read())
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len(chunks) == 5  # role, 3 tokens, finish
    assert all("usage" not in ch and ch["choices"] for ch in chunks)


async def test_stream_n2_interleaves_choices_and_sdk_reassembles(
    worker: str, http: aiohttp.ClientSession
) -> None:
    body = chat_body(max_tokens=3, stream=True, n=2, stream_options={"include_usage": True})
    async with http.post(worker + "/v1/chat/completions", json=body) as resp:
        chunks = [orjson.loads(e) for e in sse_events(await resp.read())[:-1]]
    indices = [ch["choices"][0]["index"] for ch in chunks if ch["choices"]]
    assert indices == [0, 1] * 5  # role, 3 tokens, finish: each alternating
    assert chunks[-1]["usage"]["completion_tokens"] == 6

    async with client(worker) as c:
        stream = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=3, n=2,
            stream=True,
        )  # fmt: skip
        texts = ["", ""]
        async for chunk in stream:
            for ch in chunk.choices:
                texts[ch.index] += ch.delta.content or ""
        whole = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=3, n=2
        )
        assert texts == [ch.message.content for ch in whole.choices]


WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
        },
    },
}


async def test_tool_calls(worker: str) -> None:
    messages: Any = [{"role": "user", "content": "weather?"}]
    async with client(worker) as c:
        r = await c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name == "get_weather"
        args = orjson.loads(call.function.arguments)
        assert set(args) == {"city", "days", "unit"} and args["unit"] == "celsius"
        assert args["days"] == 42
        assert r.usage and r.usage.completion_tokens == math.ceil(len(call.function.arguments) / 4)

        stream = await c.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=[WEATHER_TOOL],
            stream=True,
        )
        name, streamed_args, finish = None, "", None
        async for chunk in stream:
            for ch in chunk.choices:
                for tc in ch.delta.tool_calls or []:
                    name = name or (tc.function.name if tc.function else None)
                    streamed_args += (tc.function.arguments or "") if tc.function else ""
                finish = ch.finish_reason or finish
        assert (name, finish) == ("get_weather", "tool_calls")
        assert orjson.loads(streamed_args) == args

        plain = await c.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=[WEATHER_TOOL],
            tool_choice="none",
        )
        assert (
            plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "stop"
        )


async def test_completions_whole_and_streamed(worker: str) -> None:
    async with client(worker) as c:
        r = await c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7)
        assert r.object == "text_completion" and r.id.startswith("cmpl-")
        assert r.choices[0].finish_reason == "length" and r.choices[0].text
        assert r.usage and (r.usage.prompt_tokens, r.usage.completion_tokens) == (4, 7)
        default = await c.completions.create(model=MODEL, prompt="Once upon a time")
        assert (
            default.usage and default.usage.completion_tokens == 16
        )  # OpenAI's default max_tokens

        stream = await c.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=7, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        text = ""
        usage: Any = None
        finish: Any = None
        async for chunk in stream:
            assert chunk.object == "text_completion"
            for ch in chunk.choices:
                text += ch.text
                finish = finish or ch.finish_reason
            usage = chunk.usage or usage
        assert text == r.choices[0].text and finish == "length"
        assert usage and usage.completion_tokens == 7


async def test_embeddings_float_and_base64(worker: str) -> None:
    async with client(worker) as c:
        r = await c.embeddings.create(
            model=MODEL, input=["alpha", "beta gamma"], encoding_format="float"
        )
        assert [d.index for d in r.data] == [0, 1]
        vec = r.data[0].embedding
        assert len(vec) == 384 and abs(sum(x * x for x in vec) - 1.0) < 1e-6
        assert r.usage.prompt_tokens == 2 + 3
        again = await c.embeddings.create(
            model=MODEL, input="alpha", dimensions=384, encoding_format="float"
        )
        assert again.data[0].embedding == vec
        small = await c.embeddings.create(
            model=MODEL, input="alpha", dimensions=8
        )  # SDK asks base64
        assert len(small.data[0].embedding) == 8


async def test_embeddings_base64_bytes(worker: str, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "input": "alpha", "encoding_format": "base64", "dimensions": 4}
    async with http.post(worker + "/v1/embeddings", json=body) as resp:
        data = await resp.json()
    raw = base64.b64decode(data["data"][0]["embedding"])
    assert len(struct.unpack("<4f", raw)) == 4


async def test_models_health_and_errors(worker: str, http: aiohttp.ClientSession) -> None:
    async with client(worker) as c:
        listed = await c.models.list()
        assert [m.id for m in listed.data] == [MODEL]
        with pytest.raises(NotFoundError) as err:
            await c.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "x"}]
            )
        assert err.value.code == "model_not_found"
    async with http.get(worker + "/health") as resp:
        assert resp.status == 200
    cases = [
        (b"{not json", 400, None),
        (orjson.dumps({"model": MODEL}), 400, "messages"),
        (orjson.dumps(chat_body(n=0)), 400, "n"),
        (orjson.dumps(chat_body(max_tokens=200_000)), 400, "messages"),
        (orjson.dumps(chat_body(stream_options={"include_usage": True})), 400, "stream_options"),
    ]
    for raw, status, param in cases:
        async with http.post(worker + "/v1/chat/completions", data=raw) as resp:
            assert resp.status == status
            error = (await resp.json())["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    async with http.get(worker + "/v1/nothing") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_prefix_cache_and_reasoning_tokens(serve: Serve) -> None:
    reasoning = "acme/reasoning-8b"
    base = await serve(
        create_worker_app(WorkerOptions(model_ids=(MODEL, reasoning), time_scale=FAST))
    )
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 40  # 1800 chars
    messages: Any = [
        {"role": "system", "content": long_prompt},
        {"role": "user", "content": "first"},
    ]
    async with client(base) as c:
        first = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert first.usage and first.usage.prompt_tokens_details
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        messages[1]["content"] = "second question"
        second = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert second.usage and second.usage.prompt_tokens_details
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached and cached % 16 == 0 and 400 <= cached < second.usage.prompt_tokens

        r = await c.chat.completions.create(
            model=reasoning, messages=[{"role": "user", "content": "why"}], max_tokens=10
        )
        assert r.usage and r.usage.completion_tokens_details
        assert (r.usage.completion_tokens, r.usage.completion_tokens_details.reasoning_tokens) == (
            10,
            5,
        )
        assert (r.choices[0].message.model_extra or {})["reasoning_content"]


async def test_metric_names_for_both_flavors(serve: Serve, http: aiohttp.ClientSession) -> None:
    vllm = await serve(create_worker_app(WorkerOptions(time_scale=FAST)))
    sglang = await serve(create_worker_app(WorkerOptions(time_scale=FAST, flavor="sglang")))
    for base, names in (
        (vllm, ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                "vllm:generation_tokens_total", "vllm:prompt_tokens_total",
                "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_sum"]),
        (sglang, ["sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
                  "sglang:generation_tokens_total", "sglang:time_to_first_token_seconds_bucket"]),
    ):  # fmt: skip
        async with client(base) as c:
            await c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
        samples = await metrics(http, base)
        for name in names:
            assert (
                sample(samples, name, **({"le": "+Inf"} if name.endswith("_bucket") else {})) >= 0
            )
        prefix = names[0].split(":")[0]
        assert sample(samples, f"{prefix}:generation_tokens_total") == 3


async def _stream_and_hold(http: aiohttp.ClientSession, base: str, max_tokens: int) -> int:
    body = chat_body(max_tokens=max_tokens, ignore_eos=True, stream=True)
    async with http.post(base + "/v1/chat/completions", json=body) as resp:
        return len(sse_events(await resp.read()))


async def _until(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_running_and_waiting_follow_max_batch(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    # 0.1: 200 tokens at batch 4 take ~0.2 s, long enough to observe.
    base = await serve(create_worker_app(WorkerOptions(time_scale=0.1, max_batch=4)))
    tasks = [asyncio.create_task(_stream_and_hold(http, base, 200)) for _ in range(7)]

    async def saturated() -> bool:
        s = await metrics(http, base)
        return (sample(s, "vllm:num_requests_running"), sample(s, "vllm:num_requests_waiting")) == (
            4,
            3,
        )

    await _until(saturated)
    s = await metrics(http, base)
    assert 0 < sample(s, "vllm:kv_cache_usage_perc") < 1
    assert all(n == 200 + 3 for n in await asyncio.gather(*tasks))  # role + 200 + finish + [DONE]
    s = await metrics(http, base)
    assert (
        sample(s, "vllm:num_requests_running") == 0 and sample(s, "vllm:num_requests_waiting") == 0
    )
    assert sample(s, "vllm:generation_tokens_total") == 7 * 200
    assert sample(s, "vllm:request_success_total", finished_reason="length") == 7


async def test_kv_capacity_queues_requests(serve: Serve, http: aiohttp.ClientSession) -> None:
    # each request reserves 10 prompt + 100 completion tokens: two fit in 250
    base = await serve(create_worker_app(WorkerOptions(time_scale=0.1, kv_capacity_tokens=250)))
    tasks = [asyncio.create_task(_stream_and_hold(http, base, 100)) for _ in range(3)]

    async def queued() -> bool:
        s = await metrics(http, base)
        return (sample(s, "vllm:num_requests_running"), sample(s, "vllm:num_requests_waiting")) == (
            2,
            1,
        )

    await _until(queued)
    assert sample(await metrics(http, base), "vllm:kv_cache_usage_perc") == pytest.approx(220 / 250)
    await asyncio.gather(*tasks)
    async with http.post(
        base + "/v1/chat/completions", json=chat_body(max_tokens=300, ignore_eos=True)
    ) as resp:
        assert resp.status == 400  # can never fit


async def test_itl_grows_with_batch(serve: Serve, http: aiohttp.ClientSession) -> None:
    scale = 0.1
    base = await serve(create_worker_app(WorkerOptions(time_scale=scale)))
    steps = step_seconds(WorkerOptions().decode_tokens_per_s, 64)
    assert steps[1] == pytest.approx(1 / 215) and steps[50] == pytest.approx(50 / 8018)

    async def itl_mean(concurrency: int) -> float:
        before = await metrics(http, base)
        await asyncio.gather(*[_stream_and_hold(http, base, 60) for _ in range(concurrency)])
        after = await metrics(http, base)
        total = sample(after, "vllm:inter_token_latency_seconds_sum") - sample(
            before, "vllm:inter_token_latency_seconds_sum"
        )
        count = sample(after, "vllm:inter_token_latency_seconds_count") - sample(
            before, "vllm:inter_token_latency_seconds_count"
        )
        assert count == concurrency * 59
        return total / count

    alone = await itl_mean(1)
    assert alone == pytest.approx(steps[1] * scale, rel=1e-6)  # exactly the profile's step
    crowded = await itl_mean(32)
    # Arrivals spread over a few ms join at different steps, so the batch ramps up to 32.
    assert steps[8] * scale < crowded <= steps[32] * scale * 1.5


async def test_measured_token_gaps_match_profile_at_real_speed(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    base = await serve(create_worker_app(WorkerOptions(time_scale=1.0)))
    body = chat_body(max_tokens=30, ignore_eos=True, stream=True)
    arrivals: list[float] = []
    async with http.post(base + "/v1/chat/completions", json=body) as resp:
        async for _line in resp.content:
            if _line.startswith(b"data: "):
                arrivals.append(time.monotonic())
    gaps = (arrivals[-3] - arrivals[1]) / (len(arrivals) - 4)  # between first and last token
    assert 1 / 215 * 0.7 < gaps < 1 / 215 * 1.6


async def test_prefill_makes_ttft_grow_with_prompt(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    base = await serve(create_worker_app(WorkerOptions(time_scale=0.1)))

    async def ttft_sum(prompt: str) -> float:
        before = sample(await metrics(http, base), "vllm:time_to_first_token_seconds_sum")
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
        async with http.post(base + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
        return sample(await metrics(http, base), "vllm:time_to_first_token_seconds_sum") - before

    short = await ttft_sum("hi")
    long = await ttft_sum("lorem ipsum " * 10_000)  # 30,000 tokens: 1.5 s of prefill at 20k/s
    assert long - short == pytest.approx(0.1 * 30_000 / 20_000, rel=0.05)


async def test_disconnect_leaves_the_batch(serve: Serve, http: aiohttp.ClientSession) -> None:
    base = await serve(create_worker_app(WorkerOptions(time_scale=1.0)))
    body = chat_body(max_tokens=5000, ignore_eos=True, stream=True)
    async with http.post(base + "/v1/chat/completions", json=body) as resp:
        await resp.content.readline()
        assert sample(await metrics(http, base), "vllm:num_requests_running") == 1
        resp.close()

    async def left() -> bool:
        s = await metrics(http, base)
        return sample(s, "vllm:num_requests_running") == 0

    await _until(left)
    s = await metrics(http, base)
    assert sample(s, "vllm:request_success_total", finished_reason="abort") == 1
    assert sample(s, "vllm:kv_cache_usage_perc") == 0


async def test_32_concurrent_streams_keep_up(serve: Serve, http: aiohttp.ClientSession) -> None:
    base = await serve(create_worker_app(WorkerOptions(time_scale=FAST)))
    started = time.monotonic()
    counts = await asyncio.gather(*[_stream_and_hold(http, base, 256) for _ in range(32)])
    elapsed = time.monotonic() - started
    assert counts == [256 + 3] * 32
    # Simulated: 256 steps at batch 32 (~5.7 ms) = ~1.5 s, i.e. ~15 ms at this scale; the rest is
    # serialisation and the client's parsing. Falling behind would stretch this by far.
    assert elapsed < 3.0
    assert sample(await metrics(http, base), "vllm:generation_tokens_total") == 32 * 256


async def test_worker_faults_and_control(worker: str, http: aiohttp.ClientSession) -> None:
    async with http.post(
        worker + "/v1/chat/completions", json=chat_body(), headers={"x-sim-fault": "error503"}
    ) as resp:
        assert resp.status == 503 and (await resp.json())["error"]["type"] == "server_error"
    body = chat_body(model=MODEL + "@cut", stream=True, max_tokens=20)
    async with http.post(worker + "/v1/chat/completions", json=body) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    async with http.post(worker + "/sim/control", json={"fault": "error500"}) as resp:
        assert (await resp.json())["fault"] == "error500"
    async with http.post(worker + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 500
    async with http.post(worker + "/sim/control", json={"reset": True}) as resp:
        assert (await resp.json())["fault"] is None
    async with http.post(worker + "/sim/control", json={"remaining_tokens": 5}) as resp:
        assert resp.status == 400  # a worker has no budgets
    async with http.get(worker + "/sim/stats") as resp:
        stats = await resp.json()
    assert stats["by_fault"] == {"error503": 1, "cut": 1, "error500": 1}
    assert stats["by_status"] == {"503": 1, "200": 1, "500": 1}
    async with http.get(worker + "/sim/control") as resp:
        assert (await resp.json())["running"] == 0


async def test_shutdown_ends_streams_in_flight(http: aiohttp.ClientSession) -> None:
    runner, port = await start_site(create_worker_app(WorkerOptions(time_scale=1.0)))
    base = f"http://127.0.0.1:{port}"
    body = chat_body(max_tokens=5000, ignore_eos=True, stream=True)
    async with http.post(base + "/v1/chat/completions", json=body) as resp:
        await resp.content.readline()
        started = time.monotonic()
        await runner.cleanup()  # would take 5000 x 4.65 ms if the stream had to finish
        assert time.monotonic() - started < 1.0
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_model_retrieve(worker: str, http: aiohttp.ClientSession) -> None:
    async with client(worker) as c:
        assert (await c.models.retrieve(MODEL)).id == MODEL
        with pytest.raises(NotFoundError):
            await c.models.retrieve("other")


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="time_scale"):
        WorkerOptions(time_scale=0)
    with pytest.raises(ValueError, match="decode_tokens_per_s"):
        WorkerOptions(decode_tokens_per_s={0: 100.0})
    with pytest.raises(ValueError, match="unknown fault"):
        WorkerOptions(fault="explode")


async def test_worker_follows_a_measured_profile_by_context_length(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    # One request at a time decodes at 200 tokens/s at context 100 and 50 tokens/s at 40,100:
    # a ~40,000-token prompt decodes about 4x slower than a short one.
    profile = parse_profile(
        "name: ctx-test\ndecode_tokens_per_s: {100: {1: 200}, 40100: {1: 50}}\n"
        "prefill_tokens_per_s: 1000000\nmax_batch: 4\n"
    )
    scale = 0.05
    base = await serve(create_worker_app(WorkerOptions(time_scale=scale, profile=profile)))

    async def itl(content: str) -> float:
        before = await metrics(http, base)
        body = chat_body(max_tokens=30, ignore_eos=True, stream=True)
        body["messages"] = [{"role": "user", "content": content}]
        async with http.post(base + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            await resp.read()
        after = await metrics(http, base)
        total = sample(after, "vllm:inter_token_latency_seconds_sum") - sample(
            before, "vllm:inter_token_latency_seconds_sum"
        )
        return total / 29

    short = await itl("x" * 40)  # ~10 prompt tokens: context 10..40, clamped to 100
    long = await itl("y " * 80_000)  # 40,000 prompt tokens: context ~40,000..40,030
    assert short == pytest.approx(1 / 200 * scale, rel=1e-6)
    # T at context c in [100, 40100]: 200 - 150 * (c - 100) / 40000; c ~ 40,000 + 15.
    assert long == pytest.approx(1 / (200 - 150 * (40_015 - 100) / 40_000) * scale, rel=0.01)
