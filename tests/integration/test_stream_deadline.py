"""The Backend contract on timeouts, on real sockets, on both transports: the attempt's total
limit bounds a stream that keeps sending and a whole answer that comes too slowly, so the
forwarder needs no timer of its own around reads."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import orjson
import pytest

from adapters.backend import OpenAICompatBackend
from adapters.base import AttemptTimeouts, Backend
from gateway.errors import UpstreamTimeout
from tests.integration.faultkit import MESSAGES, PROVIDER_MODEL, SimFactory

SHORT_TOTAL = AttemptTimeouts(connect_s=5.0, first_byte_s=5.0, idle_s=5.0, total_s=0.6)
ROADS = ["pooled", "aiohttp"]


def _body(stream: bool) -> bytes:
    return orjson.dumps(
        {"model": PROVIDER_MODEL, "messages": MESSAGES, "max_tokens": 200, "stream": stream}
    )


@asynccontextmanager
async def slow_backend(sims: SimFactory, road: str) -> AsyncIterator[Backend]:
    """An adapter to a provider at 20 tokens/s: 200 tokens take ten seconds, each gap short."""
    slow = await sims(time_scale=1.0, tokens_per_s=20.0, ttft_s_mean=0.01, ttft_s_jitter=0.0)
    async with aiohttp.ClientSession() as session:
        backend: Backend = OpenAICompatBackend(
            name="slow",
            base_url=slow.v1,
            api_key=None,
            session=session,
            is_local=False,
            road=road,  # type: ignore[arg-type]
        )
        try:
            yield backend
        finally:
            backend.close()


@pytest.mark.parametrize("road", ROADS)
async def test_total_limit_cuts_a_stream_that_keeps_sending(sims: SimFactory, road: str) -> None:
    async with slow_backend(sims, road) as backend:
        assert type(backend.transport).__name__.lower().startswith(road)  # type: ignore[attr-defined]
        t0 = time.monotonic()
        response = await backend.open("/chat/completions", _body(True), {}, SHORT_TOTAL)
        got = 0
        with pytest.raises(UpstreamTimeout):
            async for _ in response.events():
                got += 1
        elapsed = time.monotonic() - t0
        assert 0.5 <= elapsed < 1.5, elapsed
        assert 3 <= got < 40, "events until the deadline came through, then it stopped"


@pytest.mark.parametrize("road", ROADS)
async def test_total_limit_bounds_a_slow_whole_answer(sims: SimFactory, road: str) -> None:
    # The simulated provider sends its head at once and the body when it is done (~10 s);
    # whichever the adapter waits on, the total limit ends it.
    async with slow_backend(sims, road) as backend:
        assert type(backend.transport).__name__.lower().startswith(road)  # type: ignore[attr-defined]
        t0 = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            response = await backend.open("/chat/completions", _body(False), {}, SHORT_TOTAL)
            await response.read()
        assert 0.5 <= time.monotonic() - t0 < 1.5
