"""Routing end to end (issue 3): the real gateway on real sockets over simulated workers and providers.

The local workers run a deliberately small throughput profile, the same one in the
gateway's `gpu.profile` and in the simulated worker's options, so the cost model's
predicted inter-token latency crosses the interactive SLO at a known batch:

    decode tokens/s {1: 40, 3: 115, 6: 120}, max_batch 6
    predicted ITL: batch 3 -> 26.1 ms, batch 4 -> 34.3 ms; the SLO here is 32 ms -> b* = 3

so each worker takes three interactive streams, and a GPU is free ($0 marginal) while
it has headroom under b* (docs/economics.md). The simulated worker runs that profile `time_scale` times faster than
the model says (the gateway predicts in profile seconds; the tests only need the order).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from openai import AsyncOpenAI

from loadtest.sim.common import start_site
from loadtest.sim.provider import ProviderOptions, create_provider_app
from loadtest.sim.worker import WorkerOptions, create_worker_app
from tests.conftest import ADMIN_KEY, GatewayFactory
from tests.integration.test_metering_e2e import metric, new_rid, rows_for, scrape

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
PUBLIC = "llama-3.1-8b"
SLOW_CURVE = {1: 40.0, 3: 115.0, 6: 120.0}
MAX_BATCH = 6
PREFILL = 100_000.0
SLO_ITL_S = 0.032
SLO_CAPACITY = 3  # the largest batch whose predicted ITL (26.1 ms) is within 32 ms
GPU = {
    "price_per_hour": 2.95,
    "mode": "reserved",
    "profile": {
        "decode_tokens_per_s": SLOW_CURVE,
        "prefill_tokens_per_s": PREFILL,
        "max_batch": MAX_BATCH,
    },
}
GROQ_PRICE = {"input_per_million": 0.05, "output_per_million": 0.08}
MSG = [{"role": "user", "content": "Say something short about batching."}]
ROOT = Path(__file__).resolve().parents[2]

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def worker_options(seed: int, time_scale: float) -> WorkerOptions:
    """The simulated worker running the same profile the gateway's cost model is given."""
    return WorkerOptions(
        decode_tokens_per_s=dict(SLOW_CURVE),
        prefill_tokens_per_s=PREFILL,
        max_batch=MAX_BATCH,
        time_scale=time_scale,
        seed=seed,
        default_max_tokens=32,
    )


@dataclass
class Sims:
    """Running simulated backends: name -> base URL (with /v1)."""

    urls: dict[str, str]
    runners: dict[str, web.AppRunner] = field(default_factory=dict)

    def root(self, name: str) -> str:
        return self.urls[name].removesuffix("/v1")


@contextlib.asynccontextmanager
async def sims(**apps: web.Application) -> AsyncIterator[Sims]:
    out = Sims({})
    try:
        for name, app in apps.items():
            runner, port = await start_site(app)
            out.runners[name] = runner
            out.urls[name] = f"http://127.0.0.1:{port}/v1"
        yield out
    finally:
        for runner in out.runners.values():
            await runner.cleanup()


def policy(
    backends: list[dict[str, Any]], model_backends: list[str], tmp_path: Path, **extra: Any
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "backends": backends,
        "models": [
            {
                "name": PUBLIC,
                "backends": model_backends,
                "policy": {"kind": "cost"},
                "expected_output_tokens": 32,
            }
        ],
        "slo_classes": {
            "interactive": {"max_ttft_s": 1.0, "max_itl_s": SLO_ITL_S},
            "batch": {"max_total_s": 600.0, "max_queue_wait_s": 30.0},
        },
        "routing": {"scrape_interval_s": 0.05, "metrics_stale_after_s": 1.0},
        "ledger": {
            "kind": "sqlite",
            "path": str(tmp_path / "ledger.db"),
            "spool_path": str(tmp_path / "ledger.spool"),
        },
        "tokenizer": {"source": "estimate"},
    }
    data.update(extra)
    return data


def local(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "vllm", "base_url": url, "models": {PUBLIC: LLAMA}, "gpu": GPU,
            **extra}  # fmt: skip


def provider(name: str, url: str, price: Mapping[str, float] = GROQ_PRICE) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "groq",
        "base_url": url,
        "models": {PUBLIC: "llama-3.1-8b-instant"},
        "price": dict(price),
    }


@dataclass(frozen=True)
class Answer:
    """What one request's answer said about its routing."""

    backend: str
    reason: str
    version: str
    started: float
    ended: float
    attempts: int


async def chat(
    http: aiohttp.ClientSession,
    gw: str,
    *,
    max_tokens: int = 16,
    stream: bool = True,
    headers: Mapping[str, str] | None = None,
    messages: list[dict[str, str]] | None = None,
) -> Answer:
    """One chat request (`MSG` unless `messages`), read to the end; the routing headers of
    its answer."""
    started = time.monotonic()
    body = {"model": PUBLIC, "messages": messages or MSG, "max_tokens": max_tokens,
            "stream": stream}  # fmt: skip
    async with http.post(gw + "/v1/chat/completions", json=body, headers=headers) as r:
        raw = await r.read()
        assert r.status == 200, raw[:300]
        if stream:
            assert raw.rstrip().endswith(b"data: [DONE]"), raw[-200:]
        h = r.headers
        return Answer(
            h["x-neogate-backend"],
            h.get("x-neogate-route-reason", ""),
            h.get("x-neogate-price-version", ""),
            started,
            time.monotonic(),
            int(h.get("x-neogate-attempts", "1")),
        )


class Held:
    """A streamed request kept open (its events drained in the background) until closed."""

    def __init__(self, response: aiohttp.ClientResponse, backend: str | None = None) -> None:
        self.response = response
        self.backend = backend or response.headers["x-neogate-backend"]
        self._drain = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        # A stream cut under it (the test failed and is tearing down) just ends the drain.
        with contextlib.suppress(aiohttp.ClientError, RuntimeError):
            async for _ in self.response.content.iter_any():
                pass

    @property
    def open(self) -> bool:
        return not self._drain.done()

    async def close(self) -> None:
        """The client leaves: the gateway cancels the upstream and frees the slot."""
        self._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain
        self.response.close()


async def hold(http: aiohttp.ClientSession, gw: str, max_tokens: int = 4000) -> Held:
    # ignore_eos (a vLLM extension the gateway passes through): all max_tokens are generated.
    body = {"model": PUBLIC, "messages": MSG, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True}  # fmt: skip
    r = await http.post(gw + "/v1/chat/completions", json=body)
    assert r.status == 200, await r.text()
    return Held(r)


async def get_json(http: aiohttp.ClientSession, url: str, **kw: Any) -> Any:
    async with http.get(url, **kw) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def post_json(http: aiohttp.ClientSession, url: str, body: Any, **kw: Any) -> Any:
    async with http.post(url, json=body, **kw) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def wait_until(check: Any, timeout: float = 5.0, step: float = 0.02) -> None:
    """Poll an async predicate (a real condition on real servers) until it holds."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(step)


async def scraped_running(http: aiohttp.ClientSession, gw: str, backend: str, n: int) -> bool:
    """True once the gateway's fresh scrape of `backend` shows `n` requests running."""
    view = await get_json(http, gw + "/admin/backends", headers=ADMIN)
    worker = next(b for b in view["backends"] if b["name"] == backend)["worker"]
    return worker is not None and worker["fresh"] and worker["running"] == n


def share(answers: list[Answer], prefix: str) -> float:
    return sum(a.backend.startswith(prefix) for a in answers) / len(answers)


# --- 1. fill the local workers, spill past the SLO, come back ------------------------------


async def test_fills_local_spills_past_itl_slo_and_returns(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    # The workers run their profile in real time: the ITL the gateway measures is the one the
    # cost model predicts, so its spread is the real one (12 tokens at batch 3: ~0.3 s; the
    # provider answers in ~0.22 s, so request counts compare like for like).
    async with sims(
        a=create_worker_app(worker_options(1, 1.0)),
        b=create_worker_app(worker_options(2, 1.0)),
        p=create_provider_app(ProviderOptions(time_scale=1.0, ttft_s_mean=0.2)),
    ) as s:
        gw = await gateway_factory(
            policy(
                [local("gpu-a", s.urls["a"]), local("gpu-b", s.urls["b"]),
                 provider("sim-groq", s.urls["p"])],
                ["gpu-a", "gpu-b", "sim-groq"],
                tmp_path,
            )
        )  # fmt: skip
        peak = {"a": 0, "b": 0}
        stop = asyncio.Event()

        async def watch(http: aiohttp.ClientSession) -> None:
            # The workers' own view of their batch, independent of the gateway's books.
            while not stop.is_set():
                for name, seen in list(peak.items()):
                    state = await get_json(http, s.root(name) + "/sim/control")
                    peak[name] = max(seen, state["running"] + state["waiting"])
                await asyncio.sleep(0.005)

        async def phase(http: aiohttp.ClientSession, clients: int, seconds: float) -> list[Answer]:
            """`clients` closed-loop clients, all starting at once, for `seconds`."""
            out: list[Answer] = []
            until = time.monotonic() + seconds

            async def client() -> None:
                while time.monotonic() < until:
                    out.append(await chat(http, gw.url, max_tokens=12))

            await asyncio.gather(*(client() for _ in range(clients)))
            return out

        async with aiohttp.ClientSession() as http:
            watcher = asyncio.create_task(watch(http))
            low = await phase(http, 2, 1.2)
            high = await phase(http, 10, 2.5)
            stop.set()
            await watcher
            after = await phase(http, 2, 1.2)

    assert share(low, "gpu-") == 1.0, [(a.backend, a.reason) for a in low][:6]
    # Under load the local workers are used up to their SLO capacity, the rest spills.
    assert 0.25 <= share(high, "gpu-") <= 0.7, share(high, "gpu-")
    assert share(high, "sim-groq") >= 0.3
    assert peak["a"] <= SLO_CAPACITY and peak["b"] <= SLO_CAPACITY, peak
    assert max(peak.values()) == SLO_CAPACITY, peak  # filled, not merely sprinkled
    spilled = [a for a in high if a.backend == "sim-groq"]
    # The header says why the local workers were passed over: their predicted ITL.
    assert all("itl" in a.reason and "gpu-" in a.reason for a in spilled), spilled[0].reason
    assert share(after, "gpu-") == 1.0, [(a.backend, a.reason) for a in after][:6]
    assert {a.backend for a in after} == {"gpu-a", "gpu-b"}


# --- 2. a price change at runtime moves traffic ---------------------------------------------


async def test_price_change_at_runtime_moves_traffic(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    fast = {"time_scale": 0.05, "ttft_s_mean": 0.2}
    async with sims(
        cheap=create_provider_app(ProviderOptions(seed=1, **fast)),
        dear=create_provider_app(ProviderOptions(seed=2, **fast)),
    ) as s:
        gw = await gateway_factory(
            policy(
                [
                    provider("cheap", s.urls["cheap"], {"input_per_million": 0.1, "output_per_million": 0.1}),
                    provider("dear", s.urls["dear"], {"input_per_million": 0.2, "output_per_million": 0.2}),
                ],
                ["cheap", "dear"],
                tmp_path,
            )
        )  # fmt: skip
        async with (
            AsyncOpenAI(base_url=gw.v1, api_key="anonymous", max_retries=0) as oai,
            aiohttp.ClientSession() as http,
        ):

            async def ask(tag: str) -> tuple[str, str, str, float]:
                rid = new_rid(tag)
                raw = await oai.chat.completions.with_raw_response.create(
                    model=PUBLIC, messages=MSG, max_tokens=8, extra_headers={"x-request-id": rid}
                )
                raw.parse()
                h = raw.headers
                # Served by the cheapest external: it is also the alternative.
                assert h["x-neogate-alternative-cost-usd"] == h["x-neogate-marginal-cost-usd"]
                return (
                    h["x-neogate-backend"],
                    h["x-neogate-price-version"],
                    rid,
                    float(h["x-neogate-marginal-cost-usd"]),
                )

            before = [await ask("before") for _ in range(4)]
            v0 = (await get_json(http, gw.url + "/admin/prices", headers=ADMIN))["version"]
            changed = await post_json(
                http,
                gw.url + "/admin/prices",
                {"backend": "cheap", "input_per_million": 1.0, "output_per_million": 1.0},
                headers=ADMIN,
            )
            after = [await ask("after") for _ in range(4)]
            stats = {n: await get_json(http, s.root(n) + "/sim/stats") for n in ("cheap", "dear")}

    assert {b for b, *_ in before} == {"cheap"}
    assert {v for _, v, *_ in before} == {str(v0)}
    assert changed["version"] == v0 + 1
    assert {b for b, *_ in after} == {"dear"}
    assert {v for _, v, *_ in after} == {str(v0 + 1)}
    # The predicted cost in the header is at the price in force (dear: 0.2 $/M, > cheap's 0.1).
    assert min(c for *_, c in after) > max(c for *_, c in before) > 0
    assert (stats["cheap"]["total"], stats["dear"]["total"]) == (4, 4)
    # Each ledger row records the price version its decision used, and that version's price.
    for (backend, version, rid, _), price in [(a, 0.1) for a in before] + [(a, 0.2) for a in after]:
        rows = await rows_for(gw.config.ledger.path, rid, wait_s=5.0)
        assert len(rows) == 1, rows
        row = rows[0]
        assert (row["backend"], row["price_version"]) == (backend, version)
        assert row["price_out_nusd_per_m"] == round(price * 1e9)
        # The counterfactual is the backend that served: nothing saved, nothing lost.
        assert row["counterfactual_backend"] == backend
        assert row["counterfactual_cost_nusd"] == row["cost_nusd"] > 0


# --- 3. rate-limit headroom and 429 cool-down -------------------------------------------------


def limited(**extra: Any) -> ProviderOptions:
    # Real seconds (time_scale 1): the budget window is a real minute, so a forced level holds.
    return ProviderOptions(time_scale=1.0, ttft_s_mean=0.01, ttft_s_jitter=0.0,
                           tokens_per_s=5000.0, **extra)  # fmt: skip


async def sim_stats(http: aiohttp.ClientSession, s: Sims, name: str) -> dict[str, Any]:
    stats: dict[str, Any] = await get_json(http, s.root(name) + "/sim/stats")
    return stats


async def test_provider_near_its_token_limit_is_avoided_before_a_429(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    async with sims(
        cheap=create_provider_app(limited(tpm_limit=10_000)), dear=create_provider_app(limited())
    ) as s:
        gw = await gateway_factory(
            policy(
                [provider("cheap", s.urls["cheap"]),
                 provider("dear", s.urls["dear"], {"input_per_million": 0.5, "output_per_million": 0.8})],
                ["cheap", "dear"],
                tmp_path,
            )
        )  # fmt: skip
        async with aiohttp.ClientSession() as http:
            first = await chat(http, gw.url, stream=False)
            # The provider's budget drops behind the gateway's back; its next answer says so.
            await post_json(http, s.root("cheap") + "/sim/control", {"remaining_tokens": 450})
            second = await chat(http, gw.url, stream=False)
            view = await get_json(http, gw.url + "/admin/backends", headers=ADMIN)
            room = next(b for b in view["backends"] if b["name"] == "cheap")["headroom"]
            # 600 tokens do not fit in what is left: sending it to `cheap` would be a 429.
            big = await chat(http, gw.url, max_tokens=600, stream=False)
            small = await chat(http, gw.url, max_tokens=8)
            explain = await get_json(
                http,
                gw.url + "/admin/route",
                params={"model": PUBLIC, "prompt_tokens": "10", "max_tokens": "600"},
                headers=ADMIN,
            )
            stats = await sim_stats(http, s, "cheap")

    assert (first.backend, second.backend) == ("cheap", "cheap")
    assert room["limit_tokens"] == 10_000 and room["remaining_tokens"] < 450
    assert (big.backend, big.attempts) == ("dear", 1)
    assert small.backend == "dear"  # within the reserve kept below the limit
    assert stats["total"] == 2 and stats["by_status"] == {"200": 2}, stats
    last = explain["candidates"][-1]
    assert last["backend"] == "cheap" and "near rate limit" in last["reason"], explain


async def test_provider_that_answered_429_rests_until_retry_after(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    async with sims(
        cheap=create_provider_app(limited(tpm_limit=10_000)), dear=create_provider_app(limited())
    ) as s:
        gw = await gateway_factory(
            policy(
                [provider("cheap", s.urls["cheap"]),
                 provider("dear", s.urls["dear"], {"input_per_million": 0.5, "output_per_million": 0.8})],
                ["cheap", "dear"],
                tmp_path,
            )
        )  # fmt: skip
        async with aiohttp.ClientSession() as http:

            async def cheap_room() -> dict[str, Any]:
                view = await get_json(http, gw.url + "/admin/backends", headers=ADMIN)
                room: dict[str, Any] = next(b for b in view["backends"] if b["name"] == "cheap")[
                    "headroom"
                ]
                return room

            assert (await chat(http, gw.url, stream=False)).backend == "cheap"
            # The budget is spent elsewhere; the gateway still believes there is plenty.
            await post_json(http, s.root("cheap") + "/sim/control", {"remaining_tokens": 0})
            # Its 429 says when the tokens are back (10,000 per minute: ~0.5 s for this one).
            failed_over = await chat(http, gw.url, max_tokens=150)
            after_429 = await sim_stats(http, s, "cheap")
            room = await cheap_room()
            resting = [await chat(http, gw.url) for _ in range(3)]
            during = await sim_stats(http, s, "cheap")
            still_cooling = time.time() < room["cooldown_until"]

            async def rested() -> bool:
                return not (await cheap_room())["cooling_down"]

            await wait_until(rested, timeout=5.0)
            back = await chat(http, gw.url)
            final = await sim_stats(http, s, "cheap")

    assert (failed_over.backend, failed_over.attempts) == ("dear", 2)
    assert after_429["by_status"] == {"200": 1, "429": 1}, after_429
    assert room["cooling_down"] and 0.2 < room["cooldown_until"] - room["observed_at"] < 2.0
    assert still_cooling, "the cool-down ran out before the resting requests were sent"
    assert {a.backend for a in resting} == {"dear"}
    assert during["total"] == after_429["total"] == 2  # not used before its retry-after
    assert back.backend == "cheap"
    assert final["total"] == 3 and final["by_status"] == {"200": 2, "429": 1}, final


# --- 5. stale worker metrics ------------------------------------------------------------------


class MetricsRelay:
    """A /metrics endpoint in front of a worker's that can be told to fail (503)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.failing = False
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._metrics)

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.failing:
            return web.Response(status=503, text="metrics unavailable")
        async with aiohttp.ClientSession() as http, http.get(self.upstream) as r:
            return web.Response(body=await r.read(), content_type="text/plain")


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def direct_hold(http: aiohttp.ClientSession, worker_v1: str) -> Held:
    """A stream straight to the worker, past the gateway: load the gateway cannot count."""
    body = {"model": LLAMA, "messages": MSG, "max_tokens": 4000, "stream": True, "ignore_eos": True}
    r = await http.post(worker_v1 + "/chat/completions", json=body)
    assert r.status == 200
    return Held(r, backend="direct")


async def routed_batch(http: aiohttp.ClientSession, gw: str, model: str = PUBLIC) -> dict[str, int]:
    """Backend -> predicted batch, from GET /admin/route."""
    out = await get_json(
        http,
        gw + "/admin/route",
        params={"model": model, "prompt_tokens": "10", "max_tokens": "16"},
        headers=ADMIN,
    )
    return {c["backend"]: c["predicted_batch"] for c in out["candidates"]}


async def test_stale_metrics_judge_worker_on_gateway_inflight(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    async with sims(w=create_worker_app(worker_options(1, 0.5))) as s:
        relay = MetricsRelay(s.root("w") + "/metrics")
        relay_runner, relay_port = await start_site(relay.app)
        try:
            data = policy(
                [
                    local("gpu-a", s.urls["w"], metrics_url=f"http://127.0.0.1:{relay_port}/metrics"),
                    {**local("gpu-dead", s.urls["w"], metrics_url=f"http://127.0.0.1:{dead_port()}/metrics"),
                     "models": {"dead-8b": LLAMA}},
                ],
                ["gpu-a"],
                tmp_path,
                routing={"scrape_interval_s": 0.05, "metrics_stale_after_s": 0.3},
            )  # fmt: skip
            data["models"].append({"name": "dead-8b", "backends": ["gpu-dead"]})
            gw = await gateway_factory(data)
            async with aiohttp.ClientSession() as http:

                async def backend(name: str) -> dict[str, Any]:
                    view = await get_json(http, gw.url + "/admin/backends", headers=ADMIN)
                    found: dict[str, Any] = next(b for b in view["backends"] if b["name"] == name)
                    return found

                # Metrics never answered: judged on the gateway's own count, still routed.
                dead = await backend("gpu-dead")
                body = {"model": "dead-8b", "messages": MSG, "max_tokens": 8}
                async with http.post(gw.v1 + "/chat/completions", json=body) as r:
                    assert r.status == 200 and r.headers["x-neogate-backend"] == "gpu-dead"

                # Other clients load the worker directly; fresh metrics show it.
                direct = [await direct_hold(http, s.urls["w"]) for _ in range(3)]

                async def sees_direct_load() -> bool:
                    w = (await backend("gpu-a"))["worker"]
                    return w is not None and w["fresh"] and w["running"] == 3

                await wait_until(sees_direct_load)
                fresh_batch = (await routed_batch(http, gw.url))["gpu-a"]

                relay.failing = True

                async def stale() -> bool:
                    return not (await backend("gpu-a"))["metrics_fresh"]

                await wait_until(stale)
                stale_view = await backend("gpu-a")
                stale_batch = (await routed_batch(http, gw.url))["gpu-a"]
                own = await hold(http, gw.url)
                own_batch = (await routed_batch(http, gw.url))["gpu-a"]
                still = await chat(http, gw.url, max_tokens=8)
                samples = await scrape(gw.url)
                for h in [*direct, own]:
                    await h.close()
        finally:
            await relay_runner.cleanup()

    assert dead["metrics_fresh"] is False and dead["worker"] is None
    assert fresh_batch == 4  # three running on the worker (not ours) + this one
    assert stale_view["worker"]["fresh"] is False
    assert stale_batch == 1  # stale: only what the gateway itself has in flight counts
    assert own.backend == "gpu-a" and own_batch == 2
    assert still.backend == "gpu-a"
    assert metric(samples, "neogate_worker_scrape_failures_total", backend="gpu-dead") >= 1
    assert metric(samples, "neogate_worker_scrape_failures_total", backend="gpu-a") >= 1


# --- 6. explain every decision: /admin/backends, /admin/route, `neogate route` ----------------


async def neogate(*args: str) -> Any:
    """Run the `neogate` command line in a subprocess; its stdout parsed as JSON."""
    env = {**os.environ, "NEOGATE_ADMIN_KEY": ADMIN_KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def test_admin_backends_route_and_cli_explain_decisions(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    async with sims(
        a=create_worker_app(worker_options(1, 0.5)),
        b=create_worker_app(worker_options(2, 0.5)),
        p=create_provider_app(ProviderOptions(time_scale=0.05, tpm_limit=1_000_000)),
    ) as s:
        data = policy(
            [local("gpu-a", s.urls["a"]), local("gpu-b", s.urls["b"]),
             provider("sim-groq", s.urls["p"])],
            ["gpu-a", "gpu-b", "sim-groq"],
            tmp_path,
        )  # fmt: skip
        config_path = tmp_path / "policy.yaml"
        config_path.write_text(yaml.safe_dump(data))
        gw = await gateway_factory(data)
        async with aiohttp.ClientSession() as http:
            held = [await hold(http, gw.url) for _ in range(2 * SLO_CAPACITY)]  # 3 + 3: full
            await post_json(
                http,
                gw.url + "/admin/prices",
                {"backend": "sim-groq", "input_per_million": 0.06, "output_per_million": 0.09},
                headers=ADMIN,
            )
            spilled = [await chat(http, gw.url, max_tokens=8) for _ in range(3)]
            for name in ("gpu-a", "gpu-b"):  # back to 2 + 2
                leaving = next(h for h in held if h.backend == name)
                held.remove(leaving)
                await leaving.close()

            seen: list[dict[str, Any]] = []

            async def scraped() -> bool:
                seen.append(await get_json(http, gw.url + "/admin/backends", headers=ADMIN))
                workers = [b["worker"] for b in seen[-1]["backends"] if b["local"]]
                return all(w and w["fresh"] and w["running"] == 2 for w in workers)

            await wait_until(scraped)
            # The view that showed both workers freshly scraped: asking again could find a
            # scrape late on a loaded machine (stale after 1 s) and fail for that alone.
            view = seen[-1]
            explain = await get_json(
                http,
                gw.url + "/admin/route",
                params={"model": PUBLIC, "prompt_tokens": "100", "max_tokens": "50"},
                headers=ADMIN,
            )
            remote = await neogate(
                "route", "--url", gw.url, "--model", PUBLIC,
                "--prompt-tokens", "100", "--max-tokens", "50",
            )  # fmt: skip
            for h in held:
                await h.close()
        offline = await neogate(
            "route", "--config", str(config_path), "--model", PUBLIC,
            "--prompt-tokens", "100", "--max-tokens", "50",
        )  # fmt: skip

    by_name = {b["name"]: b for b in view["backends"]}
    version = view["price_version"]
    assert version >= 1 and all(b["price_version"] == version for b in by_name.values())
    groq = by_name["sim-groq"]
    assert groq["models"][PUBLIC]["price_out_per_million"] == pytest.approx(0.09)
    assert groq["models"][PUBLIC]["ttft_s"] > 0 and groq["models"][PUBLIC]["itl_s"] > 0
    assert groq["headroom"]["limit_tokens"] == 1_000_000
    assert groq["headroom"]["remaining_tokens"] is not None
    assert groq["health"]["healthy"] is True and groq["headroom"]["cooling_down"] is False
    assert {a.backend for a in spilled} == {"sim-groq"}
    for name in ("gpu-a", "gpu-b"):
        gpu = by_name[name]
        assert gpu["local"] and gpu["inflight"] == 2 and gpu["metrics_fresh"] is True
        assert gpu["worker"]["running"] == 2 and gpu["worker"]["fresh"] is True
        assert gpu["gpu"]["batch_now"] == 2
        assert gpu["gpu"]["cost_per_million_output_at_batch"] > 0
        assert gpu["models"][PUBLIC]["itl_s"] > 0 and gpu["health"]["healthy"] is True
    # The live decision: both workers at batch 2 + 1 = 3 are within the SLO and free.
    assert explain["policy"] == "cost" and explain["price_version"] == version
    assert explain["reason"].startswith("cost: gpu-")
    ranked = {c["backend"]: c for c in explain["candidates"]}
    assert set(ranked) == {"gpu-a", "gpu-b", "sim-groq"}
    assert ranked["gpu-a"]["predicted_batch"] == 3 and ranked["gpu-a"]["meets_slo"]
    assert ranked["sim-groq"]["predicted_cost_usd"] == pytest.approx((100 * 0.06 + 32 * 0.09) / 1e6)
    # `neogate route --url` asks the running gateway: the same live decision.
    assert (remote["policy"], remote["price_version"]) == ("cost", version)
    # The two workers tie on cost (both $0 with headroom); which of them ranks first follows
    # their latency estimates, which move between the two asks: the same candidates at the
    # same predicted batches, both workers before the paid provider.
    pairs = [
        [(c["backend"], c["predicted_batch"]) for c in d["candidates"]] for d in (remote, explain)
    ]
    assert sorted(pairs[0]) == sorted(pairs[1])
    assert [name for name, _ in pairs[0]][-1] == [name for name, _ in pairs[1]][-1] == "sim-groq"
    # Offline from the file: an idle worker at batch 1, the config's list price.
    assert offline["policy"] == "cost" and offline["reason"].startswith("cost: gpu-a $0")
    off = {c["backend"]: c for c in offline["candidates"]}
    assert off["gpu-a"]["predicted_batch"] == 1
    assert off["sim-groq"]["predicted_cost_usd"] == pytest.approx((100 * 0.05 + 32 * 0.08) / 1e6)


# --- 7. batch class and deadlines: wait in the gateway for local headroom, spill in time ------


async def test_batch_request_waits_for_local_then_deadline_spills(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    async with sims(
        a=create_worker_app(worker_options(1, 0.5)),
        b=create_worker_app(worker_options(2, 0.5)),
        p=create_provider_app(ProviderOptions(time_scale=0.05)),
    ) as s:
        gw = await gateway_factory(
            policy(
                [local("gpu-a", s.urls["a"]), local("gpu-b", s.urls["b"]),
                 provider("sim-groq", s.urls["p"])],
                ["gpu-a", "gpu-b", "sim-groq"],
                tmp_path,
            )
        )  # fmt: skip
        batch = {"x-neogate-slo-class": "batch"}
        async with aiohttp.ClientSession() as http:
            held = [await hold(http, gw.url) for _ in range(2 * SLO_CAPACITY)]
            assert sorted(h.backend for h in held) == ["gpu-a"] * 3 + ["gpu-b"] * 3
            # Interactive traffic now spills; a batch request waits instead of paying for it.
            interactive = await chat(http, gw.url, max_tokens=8)
            waiting = asyncio.create_task(chat(http, gw.url, max_tokens=8, headers=batch))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            explain = await get_json(
                http,
                gw.url + "/admin/route",
                params={"model": PUBLIC, "prompt_tokens": "10", "max_tokens": "8",
                        "slo_class": "batch"},
                headers=ADMIN,
            )  # fmt: skip
            provider_before = (await sim_stats(http, s, "p"))["total"]
            freed_at = time.monotonic()
            await held[0].close()  # one slot on gpu-a comes free
            served = await asyncio.wait_for(waiting, 10)

            # Saturated again, and no slot will come free: the deadline forces a spill in time.
            await wait_until(lambda: scraped_running(http, gw.url, "gpu-a", 2))
            held[0] = await hold(http, gw.url)
            assert held[0].backend == "gpu-a"
            deadline_s = 2.5
            spilled = await chat(
                http,
                gw.url,
                max_tokens=8,
                headers={**batch, "x-neogate-deadline-s": str(deadline_s)},
            )
            provider_after = (await sim_stats(http, s, "p"))["total"]
            for h in held:
                await h.close()

    assert interactive.backend == "sim-groq"
    assert explain["wait_for_local_s"] is not None and explain["wait_for_local_s"] > 0
    assert provider_before == 1  # only the interactive request; the batch one is queued
    assert served.backend == "gpu-a", served
    assert served.ended >= freed_at and served.ended - served.started >= 0.5
    assert "wait" in served.reason, served.reason
    assert spilled.backend == "sim-groq" and provider_after == 2
    assert "spilled after queue wait" in spilled.reason, spilled.reason
    took = spilled.ended - spilled.started
    # It waited (rather than spilling at once) and finished before its deadline.
    assert 0.5 < took < deadline_s, took


# --- 8. a long prompt's prefill priced by the decodes it would stall -------------------------


async def test_a_prompt_whose_prefill_would_stall_the_running_decodes_goes_out(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    # A worker whose prefill runs at 2,000 tokens/s: a 2,048-token chunked-prefill step lasts
    # 1.024 s, 32 x the 32 ms ITL target (over STALL_STEP_RATIO, 3). Two streams decode there
    # at ~26 ms a token. A ~1,200-token prompt's own 0.6 s prefill would fit its 1 s TTFT and
    # its own ITL (the prompts the worker is sent are a dozen tokens), but it would lie inside
    # the ~0.8 s decode of each running stream (32 expected tokens) past the ~0.19 share of
    # mixed steps their 32 ms allows: about two expected misses, over STALL_FREE_MISSES (0.15)
    # and the class's budget (nothing routed yet). It goes to the provider, and says why.
    slow = dict(GPU, profile={**GPU["profile"], "prefill_tokens_per_s": 2000.0})
    options = dataclasses.replace(worker_options(3, 1.0), prefill_tokens_per_s=2000.0)
    long_prompt = [{"role": "user", "content": "tell me about batching " * 200}]
    async with sims(w=create_worker_app(options), p=create_provider_app(ProviderOptions())) as s:
        gw = await gateway_factory(
            policy(
                [local("gpu-a", s.urls["w"], gpu=slow), provider("sim-groq", s.urls["p"])],
                ["gpu-a", "sim-groq"],
                tmp_path,
            )
        )

        async with aiohttp.ClientSession() as http:
            held = [await hold(http, gw.url), await hold(http, gw.url)]
            try:
                assert all(h.backend == "gpu-a" for h in held)
                await wait_until(lambda: scraped_running(http, gw.url, "gpu-a", 2))
                beside = await chat(http, gw.url, max_tokens=8, messages=long_prompt)
                short = await chat(http, gw.url, max_tokens=8)
            finally:
                for h in held:
                    await h.close()
            await wait_until(lambda: scraped_running(http, gw.url, "gpu-a", 0))
            # Alone on the worker, the same prompt is served locally: nothing to stall.
            alone = await chat(http, gw.url, max_tokens=8, messages=long_prompt)
    assert beside.backend == "sim-groq", beside.reason
    stall = re.search(
        r"gpu-a stall: its 0\.\d\ds prefill costs the decodes running (\d+\.\d\d) misses"
        r" > budget 0\.00",
        beside.reason,
    )
    assert stall is not None, beside.reason
    assert 1.0 <= float(stall.group(1)) <= 2.0, beside.reason  # two streams, each near-certain
    # A short prompt beside the same two streams stalls nothing worth pricing: local.
    assert short.backend == "gpu-a", short.reason
    assert alone.backend == "gpu-a", alone.reason
