"""The gateway keeps the population SLO budget routing reads (`policies.budget`): each
request of a class is counted, and a streamed request that misses its class's SLO (times
from arrival) is counted as a miss; a whole (non-streamed) answer's first token is unknown,
so only a total bound can count it. Real app, real sockets, simulated worker and provider."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from openai import AsyncOpenAI

from gateway.runtime import RUNTIME
from loadtest.sim.provider import ProviderOptions, create_provider_app
from loadtest.sim.worker import WorkerOptions, create_worker_app
from tests.conftest import ADMIN_KEY, Gateway, GatewayFactory
from tests.integration.faultkit import MESSAGES, MODEL, SimFactory, Upstream
from tests.integration.faultkit import policy as fk_policy
from tests.integration.test_routing_e2e import PUBLIC, local, policy, provider, wait_until
from tests.integration.test_routing_e2e import sims as sim_apps


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
    async with sim_apps(
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


# --- the budgets live as long as the process: a reload keeps a class it does not change ----


def _write(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)


async def _reload(gw: Gateway) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r,
    ):
        body = await r.json()
        assert r.status == 200 and body["reloaded"] is True, body


async def test_a_reload_keeps_the_budget_of_a_class_it_does_not_change(
    gateway_factory: GatewayFactory, sims: SimFactory, tmp_path: Path
) -> None:
    # ~40 tokens/s: a 40-token stream stays open for about a second (across the reload).
    a = await sims(time_scale=1.0, tokens_per_s=40.0, ttft_s_mean=0.01, ttft_s_jitter=0.0)
    doc = fk_policy(tmp_path, [Upstream("a", a.v1)])
    doc["slo_classes"] = {
        "interactive": {"max_ttft_s": 1.0},
        "strict": {"max_ttft_s": 1e-6, "max_total_s": 1e-6},  # every answer misses it
        "tight": {"max_ttft_s": 2.0},
        "gone": {"max_total_s": 60.0},
    }
    path = tmp_path / "policy.yaml"
    _write(path, doc)
    gw = await gateway_factory(doc, config_path=str(path))
    ref = gw.app[RUNTIME]
    before = ref.current.router

    async with AsyncOpenAI(base_url=gw.v1, api_key="anonymous", max_retries=0) as oai:

        async def one(slo: str) -> None:
            await oai.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,  # type: ignore[arg-type]
                max_tokens=1,
                extra_headers={"x-neogate-slo-class": slo},
            )

        # 250 interactive requests: 0.5% of them is more than one whole miss, so the
        # class has a budget to spend (and to lose in a reload); a few of each other class.
        for _ in range(25):
            await asyncio.gather(*(one("interactive") for _ in range(10)))
        for slo in ("strict", "tight", "gone"):
            await one(slo)
        # A strict stream open across the reload: it settles after it.
        stream = await oai.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=40,
            stream=True,
            extra_headers={"x-neogate-slo-class": "strict"},
        )
        async for _ in stream:
            break

        inter = before.miss_budget(MODEL, "interactive")
        strict = before.miss_budget(MODEL, "strict")
        now = time.time()
        assert inter.routed == pytest.approx(250.0, rel=1e-2) and inter.missed == 0.0
        assert inter.left(now) > 0.2
        assert strict.routed == pytest.approx(2.0, rel=1e-2)
        assert strict.missed == pytest.approx(1.0, rel=1e-2)

        # Reload: a's price changes, "tight" gets other bounds, "gone" is removed, "bulk"
        # is new; "interactive" and "strict" are as they were.
        doc["backends"][0]["price"] = {"input_per_million": 0.3, "output_per_million": 0.6}
        doc["slo_classes"]["tight"] = {"max_ttft_s": 0.5}
        del doc["slo_classes"]["gone"]
        doc["slo_classes"]["bulk"] = {"max_total_s": 600.0}
        _write(path, doc)
        await _reload(gw)
        after = ref.current.router
        assert after is not before

        # The unchanged class's budget is the same just after the reload as just before.
        assert after.miss_budget(MODEL, "interactive") == inter
        assert after.miss_budget(MODEL, "interactive").left(now) == inter.left(now)
        assert after.miss_budgets(MODEL)["interactive"] > 0.2
        # A class whose bounds changed starts over; a new one starts empty; a removed one
        # is gone.
        assert after.miss_budget(MODEL, "tight").routed == 0.0
        assert after.miss_budget(MODEL, "bulk").routed == 0.0
        assert set(after.miss_budgets(MODEL)) == {"interactive", "strict", "tight", "bulk"}

        # The stream routed before the reload settles into the same window: one more miss.
        async for _ in stream:
            pass
    strict_after = after.miss_budget(MODEL, "strict")
    assert strict_after.routed == pytest.approx(2.0, rel=1e-2)
    assert strict_after.missed == pytest.approx(2.0, rel=1e-2)
    assert strict_after.in_flight == 0.0


# --- a routed request that got no answer is a miss of its class -------------------------


async def test_requests_that_got_no_answer_are_misses_of_their_class(
    gateway_factory: GatewayFactory, sims: SimFactory, tmp_path: Path
) -> None:
    p = await sims()
    doc = fk_policy(tmp_path, [Upstream("p", p.v1)])
    doc["slo_classes"] = {"interactive": {"max_ttft_s": 1.0}}
    gw = await gateway_factory(doc)
    router = gw.app[RUNTIME].current.router

    def counts() -> tuple[float, float]:
        b = router.miss_budget(MODEL, "interactive")
        return b.routed, b.missed

    async with AsyncOpenAI(base_url=gw.v1, api_key="anonymous", max_retries=0) as oai:

        async def chat(stream: bool = False, **kw: Any) -> Any:
            return await oai.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,  # type: ignore[arg-type]
                max_tokens=20,
                stream=stream,  # type: ignore[arg-type]
                **kw,
            )

        await chat()  # answered in time: met
        assert counts() == (pytest.approx(1.0, abs=0.02), 0.0)
        # The upstream fails (500, then the one retry): the client gets a 502.
        await p.control(fault="error500")
        with pytest.raises(openai.APIStatusError) as err:
            await chat()
        assert err.value.status_code == 502
        assert counts() == (pytest.approx(2.0, abs=0.02), pytest.approx(1.0, abs=0.02))
        # A stream that is cut after its first tokens: no whole answer, a miss.
        await p.control(fault="cut")
        with pytest.raises(openai.APIError):
            async for _ in await chat(stream=True):
                pass
        assert counts() == (pytest.approx(3.0, abs=0.02), pytest.approx(2.0, abs=0.02))
        # The upstream refuses what the client asked (a 400 passed through): the client's
        # mistake, taken back out of the window; neither met nor missed.
        await p.control(fault="error400")
        with pytest.raises(openai.BadRequestError):
            await chat()
        assert counts() == (pytest.approx(3.0, abs=0.02), pytest.approx(2.0, abs=0.02))

        # The client leaves before an answer that never comes: before the TTFT bound
        # (1 s) it is withdrawn; after it, the bound was already missed.
        await p.control(fault="hang")
        for timeout in (0.2, 1.3):
            with pytest.raises(openai.APITimeoutError):
                await chat(stream=True, timeout=timeout)

        async def settled() -> bool:
            return counts() == (pytest.approx(4.0, abs=0.02), pytest.approx(3.0, abs=0.02))

        await wait_until(settled)

        # The provider's 429 (retry after 1 s), passed on: a miss. The next request finds
        # the only backend cooling down: no backend (503), a miss too.
        await p.control(fault="error429", delay_s=1.0)
        with pytest.raises(openai.RateLimitError):
            await chat()
        with pytest.raises(openai.InternalServerError) as down:
            await chat()
        assert down.value.status_code == 503
    assert counts() == (pytest.approx(6.0, abs=0.02), pytest.approx(5.0, abs=0.02))
