"""The OpenAI API through the real gateway on a real socket, with the official SDK as the client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.conftest import Gateway


@pytest.fixture
async def oai(gateway: Gateway) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=gateway.v1, api_key="anonymous", max_retries=0) as c:
        yield c


MESSAGES = [{"role": "user", "content": "Tell me about GPUs and batching."}]


async def test_chat_non_stream_async(gateway: Gateway, oai: AsyncOpenAI) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        model="llama-3.1-8b", messages=MESSAGES, max_tokens=12
    )
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 12
    assert raw.headers["x-request-id"]
    assert raw.headers["x-neogate-backend"] in {"gpu-a", "gpu-b", "sim-groq"}


async def test_chat_non_stream_sync_client(gateway: Gateway, oai: AsyncOpenAI) -> None:
    def call() -> str | None:
        with OpenAI(base_url=gateway.v1, api_key="anonymous", max_retries=0) as sync:
            reply = sync.chat.completions.create(
                model="llama-3.1-8b",
                messages=MESSAGES,  # type: ignore[arg-type]
                max_tokens=5,
            )
            return reply.choices[0].message.content

    assert await asyncio.to_thread(call)


async def test_stream_without_include_usage_has_no_usage(
    gateway: Gateway, oai: AsyncOpenAI
) -> None:
    stream = await oai.chat.completions.create(
        model="llama-3.1-8b", messages=MESSAGES, max_tokens=8, stream=True
    )
    chunks = [c async for c in stream]
    assert chunks
    assert all(c.choices for c in chunks), "the injected usage chunk must be stripped"
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text


async def test_stream_raw_framing_without_usage(gateway: Gateway, oai: AsyncOpenAI) -> None:
    body = {"model": "llama-3.1-8b", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gateway.v1 + "/chat/completions", json=body) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["x-request-id"]
        raw = await r.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    for event in events[:-2]:
        payload = json.loads(event.removeprefix(b"data: "))
        assert "usage" not in payload, "usage:null fields the client did not ask for are removed"


async def test_stream_with_include_usage(gateway: Gateway, oai: AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="llama-3.1-8b",
        messages=MESSAGES,
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert final.usage.completion_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])


async def test_completions_stream_and_not(gateway: Gateway, oai: AsyncOpenAI) -> None:
    c = oai
    reply = await c.completions.create(model="llama-3.1-8b", prompt="Once upon", max_tokens=6)
    assert reply.choices[0].text and reply.usage is not None
    stream = await c.completions.create(
        model="llama-3.1-8b", prompt="Once upon", max_tokens=6, stream=True
    )
    parts = [p async for p in stream]
    assert "".join(p.choices[0].text for p in parts if p.choices)


async def test_embeddings(gateway: Gateway, oai: AsyncOpenAI) -> None:
    reply = await oai.embeddings.create(model="llama-3.1-8b", input=["a", "b c"])
    assert len(reply.data) == 2 and len(reply.data[0].embedding) > 0
    assert reply.usage.prompt_tokens > 0


async def test_models_list_and_get(gateway: Gateway, oai: AsyncOpenAI) -> None:
    c = oai
    ids = [m.id async for m in c.models.list()]
    assert set(ids) == {"llama-3.1-8b", "llama-3.3-70b"}
    model = await c.models.retrieve("llama-3.1-8b")
    assert model.id == "llama-3.1-8b"
    with pytest.raises(openai.NotFoundError):
        await c.models.retrieve("no-such-model")


async def test_tool_call_fields_pass_through(gateway: Gateway, oai: AsyncOpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    reply = await oai.chat.completions.create(
        model="llama-3.1-8b",
        messages=MESSAGES,
        tools=tools,  # type: ignore[arg-type]
        tool_choice="auto",
        seed=7,
        user="u-1",
        max_tokens=30,
    )
    call = reply.choices[0].message.tool_calls
    assert call and call[0].function.name == "get_weather"
    json.loads(call[0].function.arguments)
    assert reply.choices[0].finish_reason == "tool_calls"


async def test_unknown_response_fields_pass_through(gateway: Gateway, oai: AsyncOpenAI) -> None:
    body = {"model": "llama-3.1-8b", "messages": MESSAGES, "max_tokens": 3, "logprobs": True}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gateway.v1 + "/chat/completions", json=body) as r,
    ):
        data = await r.json()
    assert "system_fingerprint" in data and "x_sim" in data


async def test_n_two(gateway: Gateway, oai: AsyncOpenAI) -> None:
    reply = await oai.chat.completions.create(
        model="llama-3.1-8b", messages=MESSAGES, max_tokens=4, n=2
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.usage is not None and reply.usage.completion_tokens == 8


async def test_stream_n_two(gateway: Gateway, oai: AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="llama-3.1-8b", messages=MESSAGES, max_tokens=4, n=2, stream=True
    )
    indices = {c.choices[0].index async for c in stream if c.choices}
    assert indices == {0, 1}
