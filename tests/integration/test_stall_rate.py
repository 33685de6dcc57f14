"""The arrivals a long prefill would hold up: the gateway counts the requests it sends each
local worker (`recent_requests_per_s`, a decaying rate like the prompt-token rate) and the
routing snapshot carries it to `policies.predict.stalled_arrivals`; and their squared prompt
sizes (`recent_prompt_sq_tokens_per_s`, for `policies.predict.prefill_burst_s`). Real app, real sockets,
simulated worker and provider; the official openai SDK as the client."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from gateway.runtime import RUNTIME
from loadtest.sim.provider import ProviderOptions, create_provider_app
from loadtest.sim.worker import WorkerOptions, create_worker_app
from tests.conftest import GatewayFactory
from tests.integration.test_routing_e2e import PUBLIC, local, policy, provider, sims


async def test_the_snapshot_counts_the_requests_sent_to_a_local_worker(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    async with sims(
        a=create_worker_app(WorkerOptions(time_scale=0.01, default_max_tokens=8)),
        p=create_provider_app(ProviderOptions(time_scale=0.01)),
    ) as s:
        data = policy(
            [local("gpu-a", s.urls["a"]), provider("sim-groq", s.urls["p"])],
            ["gpu-a", "sim-groq"],
            tmp_path,
        )
        gw = await gateway_factory(data)
        live = gw.app[RUNTIME].current.router.live
        before = live.snapshot("gpu-a", PUBLIC, time.time(), 10.0)
        assert before.recent_requests_per_s == 0.0
        client = openai.AsyncOpenAI(base_url=gw.v1, api_key="anonymous", max_retries=0)
        served = []
        for _ in range(4):
            r = await client.chat.completions.with_raw_response.create(
                model=PUBLIC,
                messages=[{"role": "user", "content": "Say hi."}],
                max_tokens=8,
                stream=False,
            )
            served.append(r.headers["x-neogate-backend"])
        await client.close()
        now = time.time()
        on_gpu = served.count("gpu-a")
        assert on_gpu >= 1, served
        # Each request sent there adds 1/tau (tau 10 s) and fades: within a few seconds of
        # the test, a little under on_gpu / 10 requests per second; none for the provider.
        snap = live.snapshot("gpu-a", PUBLIC, now, 10.0)
        assert snap.recent_requests_per_s == pytest.approx(on_gpu / 10.0, rel=0.3)
        assert live.snapshot("sim-groq", PUBLIC, now, 10.0).recent_requests_per_s == 0.0
        # The squared prompt sizes fade alike: every prompt here is the same size, so their
        # size-biased mean (squares over tokens, `policies.predict.prefill_burst_s`) is that
        # size, and the prompt rate over the request rate is it too.
        assert snap.recent_prompt_tokens_per_s > 0.0
        biased = snap.recent_prompt_sq_tokens_per_s / snap.recent_prompt_tokens_per_s
        mean = snap.recent_prompt_tokens_per_s / snap.recent_requests_per_s
        assert biased == pytest.approx(mean, rel=1e-6)
        assert live.snapshot("sim-groq", PUBLIC, now, 10.0).recent_prompt_sq_tokens_per_s == 0.0
