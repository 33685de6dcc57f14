"""The attempt's total deadline over a stream that keeps sending: one timer for the whole
stream cuts it with an UpstreamTimeout, through either adapter, on real sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from adapters.base import AttemptTimeouts, Backend
from adapters.fast_backend import FastBackend
from adapters.openai_compat import OpenAICompatBackend
from gateway.errors import UpstreamTimeout
from gateway.forward import _until
from tests.integration.faultkit import MESSAGES, PROVIDER_MODEL, SimFactory, sim_factory

LONG = AttemptTimeouts(connect_s=5.0, first_byte_s=5.0, idle_s=5.0, total_s=60.0)


@pytest.fixture
async def sims() -> AsyncIterator[SimFactory]:
    async with sim_factory() as start:
        yield start


@pytest.mark.parametrize("adapter", [FastBackend, OpenAICompatBackend])
async def test_total_deadline_cuts_a_stream_that_keeps_sending(
    sims: SimFactory, adapter: type[FastBackend] | type[OpenAICompatBackend]
) -> None:
    # 20 tokens/s for 200 tokens: ten seconds of stream, each gap far below the idle limit.
    slow = await sims(time_scale=1.0, tokens_per_s=20.0, ttft_s_mean=0.01, ttft_s_jitter=0.0)
    body = orjson.dumps(
        {"model": PROVIDER_MODEL, "messages": MESSAGES, "max_tokens": 200, "stream": True}
    )
    async with aiohttp.ClientSession() as session:
        backend: Backend = adapter(
            name="slow", base_url=slow.v1, api_key=None, session=session, is_local=False
        )
        try:
            response = await backend.open("/chat/completions", body, {}, LONG)
            loop = asyncio.get_running_loop()
            t0 = time.monotonic()
            got = 0
            with pytest.raises(UpstreamTimeout, match="time limit"):
                async for _ in _until(response, response.events(), "slow", loop.time() + 0.5):
                    got += 1
            elapsed = time.monotonic() - t0
            assert 0.4 <= elapsed < 1.5, elapsed
            assert 3 <= got < 40, "events until the deadline came through, then it stopped"
        finally:
            backend.close()
