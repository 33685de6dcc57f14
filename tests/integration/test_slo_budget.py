"""The gateway keeps the population SLO budget routing reads (`policies.budget`): each
request of a class is counted, and a streamed request that misses its class's SLO (times
from arrival) is counted as a miss; a whole (non-streamed) answer's first token is unknown,
so only a total bound can count it. Real app, real sockets, simulated worker and provider."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from gateway.runtime import RUNTIME
from loadtest.sim.provider import ProviderOptions, create_provider_app
from loadtest.sim.worker import WorkerOptions, create_worker_app
from tests.conftest import GatewayFactory
from tests.integration.test_routing_e2e import PUBLIC, local, policy, provider, sims


async def ask(http: aiohttp.ClientSession, gw: str, slo: str, *, stream: bool = True) -> str:
    body = {
        "model": PUBLIC,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 8,
        "stream": stream,
    }
    headers = {"x-neogate-slo-class": slo}
    async with http.post(gw + "/v1/chat/completions", json=body, headers=headers) as r:
        raw = await r.read()
        assert r.status == 200, raw[:300]
        return r.headers["x-neogate-backend"]


async def test_requests_and_measured_misses_feed_the_class_budget(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    async with sims(
        a=create_worker_app(WorkerOptions(time_scale=0.01, default_max_tokens=8)),
        p=create_provider_app(ProviderOptions(time_scale=0.01, ttft_s_mean=0.2)),
    ) as s:
        data = policy(
            [local("gpu-a", s.urls["a"]), provider("sim-groq", s.urls["p"])],
            ["gpu-a", "sim-groq"],
            tmp_path,
        )
        # "strict" promises a first token within a microsecond: every answer misses it.
        data["slo_classes"]["strict"] = {"max_ttft_s": 1e-6}
        gw = await gateway_factory(data)
        router = gw.app[RUNTIME].current.router
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                await ask(http, gw.url, "interactive")
            for _ in range(2):
                await ask(http, gw.url, "strict")
            await ask(http, gw.url, "strict", stream=False)
        inter = router.miss_budget(PUBLIC, "interactive")
        strict = router.miss_budget(PUBLIC, "strict")
        # Counted when routed; the counts fade over 10 minutes (the test takes seconds).
        assert inter.routed == pytest.approx(3.0, rel=1e-3) and inter.missed == 0.0
        assert inter.in_flight == 0.0
        assert strict.routed == pytest.approx(3.0, rel=1e-3)
        # Two streamed misses; the whole answer's first token is unknown: not judged.
        assert strict.missed == pytest.approx(2.0, rel=1e-3)
        # 0.5% of 3 requests is not one whole miss: nothing to spend yet.
        assert router.miss_budgets(PUBLIC) == {"interactive": 0.0, "batch": 0.0, "strict": 0.0}
        # Kept per model: another model's classes start empty.
        assert router.miss_budget("other-model", "strict").routed == 0.0
