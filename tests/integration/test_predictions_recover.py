"""A local GPU passed over after long prompts is trusted again within seconds (issue 13, item 2).

The reproduction: a few short requests on two idle local workers, then two 60k-token
requests (a class that allows a long first token), then short interactive requests
again. A margin built from the spread of raw TTFT samples mixes the 3-second prefills
into every later prediction and never recovers while the workers sit idle: every
request went to the paid provider for minutes. The cost model's own relative error
does not carry a 60k-token prompt's latency over to a 10-token one, and fades.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.sim.provider import ProviderOptions, create_provider_app
from loadtest.sim.worker import WorkerOptions, create_worker_app
from tests.conftest import GatewayFactory
from tests.integration.test_routing_e2e import PUBLIC, policy, provider, sims

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
# The shipped H100 profile (prefill 20k tokens/s): 60k tokens take 3 s to prefill.
GPU = {"price_per_hour": 2.95, "mode": "reserved", "profile": "llama-3.1-8b-h100"}
BIG = "word " * 48_000  # 240k characters: ~60k tokens for the estimate tokenizer and the sim


def local(name: str, url: str) -> dict[str, Any]:
    # One request at a time per worker: the two long prompts land on both workers.
    return {"name": name, "kind": "vllm", "base_url": url, "models": {PUBLIC: LLAMA}, "gpu": GPU,
            "max_concurrency": 1}  # fmt: skip


async def ask(
    http: aiohttp.ClientSession, gw: str, content: str, slo: str, max_tokens: int = 8
) -> tuple[str, str]:
    body = {
        "model": PUBLIC,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    headers = {"x-neogate-slo-class": slo}
    async with http.post(gw + "/v1/chat/completions", json=body, headers=headers) as r:
        raw = await r.read()
        assert r.status == 200, raw[:300]
        return r.headers["x-neogate-backend"], r.headers.get("x-neogate-route-reason", "")


async def test_idle_local_gpus_are_trusted_again_after_60k_token_requests(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    worker = WorkerOptions(time_scale=1.0, default_max_tokens=8)
    async with sims(
        a=create_worker_app(worker),
        b=create_worker_app(worker),
        p=create_provider_app(ProviderOptions(time_scale=1.0, ttft_s_mean=0.2)),
    ) as s:
        data = policy(
            [local("gpu-a", s.urls["a"]), local("gpu-b", s.urls["b"]),
             provider("sim-groq", s.urls["p"])],
            ["gpu-a", "gpu-b", "sim-groq"],
            tmp_path,
        )  # fmt: skip
        data["slo_classes"] = {
            "interactive": {"max_ttft_s": 1.0, "max_itl_s": 0.05},
            "batch": {"max_total_s": 600.0, "max_queue_wait_s": 30.0},
            "bulk": {"max_ttft_s": 60.0, "max_itl_s": 0.05},
        }
        gw = await gateway_factory(data)
        async with aiohttp.ClientSession() as http:
            warm = [await ask(http, gw.url, "Say hi.", "interactive") for _ in range(6)]
            assert all(b.startswith("gpu-") for b, _ in warm), warm
            await asyncio.sleep(0.2)  # the last answer's bookkeeping ends after its last byte
            big = await asyncio.gather(*(ask(http, gw.url, BIG, "bulk") for _ in range(2)))
            assert {b for b, _ in big} == {"gpu-a", "gpu-b"}, big
            done = time.monotonic()
            seen: list[tuple[str, str]] = []
            while time.monotonic() - done < 30.0:
                seen.append(await ask(http, gw.url, "Say hi.", "interactive"))
                if seen[-1][0].startswith("gpu-"):
                    break
                await asyncio.sleep(0.5)
            back_after = time.monotonic() - done
    assert seen[-1][0].startswith("gpu-"), seen[-3:]
    assert back_after < 30.0
