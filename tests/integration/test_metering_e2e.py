"""Metering end to end: the real gateway on real sockets, the OpenAI SDK as client, rows from the ledger.

Every test sends requests with its own `x-request-id`, then reads that request's
ledger row from the database file the gateway wrote (or PostgreSQL) and the
Prometheus text of GET /metrics. One gateway and its simulated backends are shared
by the module (building a gateway loads a BPE tokenizer, ~1 s).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import parse_config
from gateway.http.app import AppOptions, create_app
from gateway.http.edge_site import open_site
from gateway.metering.ledger import make_store
from gateway.metering.ledger.rows import COLUMNS
from gateway.metering.money import usd_to_nusd
from gateway.runtime import RUNTIME
from loadtest.sim.common import start_site
from loadtest.sim.faults import TOKENS_BEFORE_MIDSTREAM_FAULT
from loadtest.sim.provider import ProviderOptions, create_provider_app
from loadtest.sim.worker import WorkerOptions, create_worker_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADMIN_KEY = "ng-admin-e2e-key-0123456789"
SECRET = "e2e-server-secret"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
REASONER = "sim-reasoning-8b"
GPU = {"price_per_hour": 2.95, "mode": "reserved"}
GROQ_PRICE = {
    "input_per_million": 0.05,
    "output_per_million": 0.08,
    "cached_input_per_million": 0.025,
}
# A local worker billed per token (no GPU cost model): its cached-input price applies.
PRICED_WORKER = {
    "input_per_million": 0.1,
    "output_per_million": 0.2,
    "cached_input_per_million": 0.01,
}
# NVIDIA NIM 1.8.0, Llama-3.1-8B on one H100: output tokens/s across the batch by concurrency,
# and prefill tokens/s (the figures of DESIGN.md; the default profile of a `gpu:` backend).
NIM_8B_H100 = ((1, 215.0), (5, 1077.0), (25, 4679.0), (50, 8018.0), (100, 12215.0), (200, 13348.0))
NIM_8B_H100_PREFILL = 20_000.0


def nim_8b_h100_tokens_per_s(batch: int) -> float:
    """Straight lines between the measured points, flat past the last one."""
    for (ca, ta), (cb, tb) in itertools.pairwise(NIM_8B_H100):
        if ca <= batch <= cb:
            return ta + (tb - ta) * (batch - ca) / (cb - ca)
    return NIM_8B_H100[-1][1]


MSG = [{"role": "user", "content": "Explain continuous batching on GPUs in a few words."}]
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


# --- helpers shared with the other end-to-end files ----------------------------------------


def new_rid(tag: str = "t") -> str:
    return f"{tag}-{uuid.uuid4().hex[:16]}"


def sqlite_rows(
    path: str | Path, where: str = "1=1", params: Sequence[Any] = ()
) -> list[dict[str, Any]]:
    """Ledger rows straight from the SQLite file (a separate read-only connection)."""
    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        cur = conn.execute(f"SELECT * FROM ledger WHERE {where} ORDER BY ts", tuple(params))
        return [dict(r) for r in cur.fetchall()]
    finally:
        conn.close()


async def rows_for(path: str | Path, rid: str, *, wait_s: float = 0.0) -> list[dict[str, Any]]:
    """The rows of one request; with `wait_s`, poll until one appears (for rows written after the client left)."""
    deadline = time.monotonic() + wait_s
    while True:
        rows = await asyncio.to_thread(sqlite_rows, path, "client_request_id = ?", [rid])
        if rows or time.monotonic() >= deadline:
            return rows
        await asyncio.sleep(0.02)


async def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics parsed into {(sample name, labels): value}."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def metric(
    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def names(samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float]) -> set[str]:
    return {n for n, _ in samples}


def expected_cost_nusd(row: Mapping[str, Any]) -> int:
    """The cost a row must carry, recomputed from its own token counts and unit prices."""
    cached_price = row["price_cached_nusd_per_m"]
    if cached_price is None:
        cached_price = row["price_in_nusd_per_m"]
    uncached = row["prompt_tokens"] - row["cached_tokens"]
    total = (
        Decimal(uncached) * row["price_in_nusd_per_m"]
        + Decimal(row["cached_tokens"]) * cached_price
        + Decimal(row["completion_tokens"]) * row["price_out_nusd_per_m"]
    ) / 1_000_000
    return int(total.quantize(Decimal(1), rounding="ROUND_HALF_EVEN"))


def nusd_per_m(usd_per_m: float) -> int:
    return usd_to_nusd(Decimal(str(usd_per_m)))


async def raw_sse(url: str, body: dict[str, Any], rid: str) -> list[bytes]:
    """POST a streamed request and return its SSE events (blank-line separated, without framing)."""
    headers = {"x-request-id": rid}
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        raw = await r.read()
    return [e for e in raw.split(b"\n\n") if e]


@dataclass
class Env:
    url: str
    ledger: Path
    app: web.Application
    slow_worker: str  # base URL without /v1
    tokenizer: Any

    @property
    def v1(self) -> str:
        return self.url + "/v1"


def e2e_policy(urls: Mapping[str, str], data_dir: Path) -> dict[str, Any]:
    """One backend per concern; every public model has exactly one backend, so routing is fixed."""
    return {
        "backends": [
            {
                "name": "gpu-a",
                "kind": "vllm",
                "base_url": urls["gpu"],
                "models": {
                    "failover-8b": LLAMA,
                    "local-8b": LLAMA,
                    "local-reasoner": REASONER,
                    "local-cut": LLAMA + "@cut",
                    "local-reasoner-cut": REASONER + "@cut",
                },
                "gpu": GPU,
            },
            {
                "name": "gpu-priced",
                "kind": "vllm",
                "base_url": urls["gpu"],
                "models": {"local-priced": LLAMA},
                "price": PRICED_WORKER,
            },
            {
                "name": "gpu-slow",
                "kind": "vllm",
                "base_url": urls["slow"],
                "models": {"slow-8b": LLAMA},
                "gpu": GPU,
            },
            {
                "name": "sim-groq",
                "kind": "groq",
                "base_url": urls["provider"],
                "models": {
                    "groq-8b": "llama-3.1-8b-instant",
                    "groq-timed": "llama-3.1-8b-instant",
                    "groq-cut": "llama-3.1-8b-instant@cut",
                    "groq-errmid": "llama-3.1-8b-instant@error_midstream",
                    "groq-malformed": "llama-3.1-8b-instant@malformed",
                },
                "price": GROQ_PRICE,
            },
            {
                "name": "sim-groq-bad",
                "kind": "groq",
                "base_url": urls["provider"],
                "models": {"failover-8b": "llama-3.1-8b-instant@error500"},
                "price": GROQ_PRICE,
            },
        ],
        "models": [
            {
                "name": "failover-8b",
                "backends": ["sim-groq-bad", "gpu-a"],
                "policy": {"kind": "pinned", "order": ["sim-groq-bad", "gpu-a"]},
            },
            {"name": "local-8b", "backends": ["gpu-a"]},
            {"name": "local-reasoner", "backends": ["gpu-a"]},
            {"name": "local-cut", "backends": ["gpu-a"]},
            {"name": "local-reasoner-cut", "backends": ["gpu-a"]},
            {"name": "local-priced", "backends": ["gpu-priced"]},
            {"name": "slow-8b", "backends": ["gpu-slow"]},
            {"name": "groq-8b", "backends": ["sim-groq"]},
            {"name": "groq-timed", "backends": ["sim-groq"]},
            {"name": "groq-cut", "backends": ["sim-groq"]},
            {"name": "groq-errmid", "backends": ["sim-groq"]},
            {"name": "groq-malformed", "backends": ["sim-groq"]},
        ],
        "ledger": {
            "kind": "sqlite",
            "path": str(data_dir / "ledger.db"),
            "spool_path": str(data_dir / "ledger.spool"),
        },
        "tokenizer": {"source": "bpe-openai"},
    }


async def start_sims(
    provider_time_scale: float = 0.01,
) -> tuple[dict[str, str], list[web.AppRunner]]:
    """A fast worker (with a reasoning model), a slow worker and a Groq-like provider."""
    runners: list[web.AppRunner] = []
    urls: dict[str, str] = {}
    specs = {
        "gpu": create_worker_app(
            WorkerOptions(model_ids=(LLAMA, REASONER), seed=1, time_scale=0.01)
        ),
        # ~9 ms per token at batch 1: a 1,000-token answer takes ~9 s unless it is cancelled.
        "slow": create_worker_app(WorkerOptions(seed=2, time_scale=2.0)),
        "provider": create_provider_app(
            ProviderOptions(time_scale=provider_time_scale, ttft_s_mean=0.2, prompt_cache=True)
        ),
    }
    for name, app in specs.items():
        runner, port = await start_site(app)
        runners.append(runner)
        urls[name] = f"http://127.0.0.1:{port}/v1"
    return urls, runners


async def start_gateway(policy: dict[str, Any], **opts: Any) -> tuple[web.AppRunner, str]:
    config = parse_config(yaml.safe_dump(policy), source="<e2e>")
    app = create_app(
        config,
        AppOptions(
            anonymous_allowed=opts.pop("anonymous", True),
            admin_key=ADMIN_KEY,
            server_secret=SECRET,
            **opts,
        ),
    )
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = await open_site(runner, "127.0.0.1", 0, fast_edge=config.listen.fast_edge)
    return runner, site.name


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    data = tmp_path_factory.mktemp("e2e")
    urls, sims = await start_sims()
    runner, url = await start_gateway(e2e_policy(urls, data))
    try:
        rt = runner.app[RUNTIME].current
        yield Env(
            url, data / "ledger.db", runner.app, urls["slow"].removesuffix("/v1"),
            rt.estimator.tokenizer,
        )  # fmt: skip
    finally:
        await runner.cleanup()
        for r in sims:
            await r.cleanup()


@pytest_asyncio.fixture(loop_scope="module")
async def oai(env: Env) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=env.v1, api_key="anonymous", max_retries=0) as c:
        yield c


def only_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(rows) == 1, rows
    return rows[0]


# --- non-streamed ----------------------------------------------------------------------------


async def test_non_stream_provider_row_at_list_price(env: Env, oai: AsyncOpenAI) -> None:
    rid = new_rid("ns-groq")
    raw = await oai.chat.completions.with_raw_response.create(
        model="groq-8b", messages=MSG, max_tokens=20, extra_headers={"x-request-id": rid}
    )
    reply = raw.parse()
    assert raw.headers["x-client-request-id"] == rid
    assert raw.headers["x-request-id"] != rid  # the ledger key is always the gateway's own
    assert reply.usage is not None
    row = only_row(await rows_for(env.ledger, rid))
    assert row["outcome"] == "ok" and row["stream"] == 0 and row["attempt"] == 0
    assert row["tenant"] == "anonymous"
    assert (row["model"], row["backend"], row["backend_model"]) == (
        "groq-8b", "sim-groq", "llama-3.1-8b-instant",
    )  # fmt: skip
    assert row["token_source"] == "reported"
    assert row["prompt_tokens"] == reply.usage.prompt_tokens
    assert row["completion_tokens"] == reply.usage.completion_tokens > 0
    assert row["counted_completion_tokens"] is not None and row["divergent"] == 0
    # The list price in force, and its version: the one the routing decision used.
    assert row["price_in_nusd_per_m"] == nusd_per_m(0.05)
    assert row["price_out_nusd_per_m"] == nusd_per_m(0.08)
    assert row["price_cached_nusd_per_m"] == nusd_per_m(0.025)
    assert row["price_version"] == raw.headers["x-neogate-price-version"]
    assert row["cost_nusd"] == expected_cost_nusd(row) > 0
    assert row["batch_size"] is None and row["is_local"] == 0
    assert row["ttft_s"] is not None and 0 < row["ttft_s"] <= row["total_s"] < 10


async def test_non_stream_local_gpu_charged_at_batch_never_zero(env: Env, oai: AsyncOpenAI) -> None:
    rid = new_rid("ns-gpu")
    raw = await oai.chat.completions.with_raw_response.create(
        model="local-8b", messages=MSG, max_tokens=16, extra_headers={"x-request-id": rid}
    )
    reply = raw.parse()
    assert reply.usage is not None
    row = only_row(await rows_for(env.ledger, rid))
    assert row["backend"] == "gpu-a" and row["is_local"] == 1
    assert row["prompt_tokens"] == reply.usage.prompt_tokens
    assert row["completion_tokens"] == reply.usage.completion_tokens == 16
    batch = row["batch_size"]
    assert isinstance(batch, int) and batch >= 1
    # Chargeback at the batch the request shared, derived by hand (not from GpuModel): the
    # GPU's dollars per second over its decode throughput at that batch, and over its prefill
    # speed for input tokens. Prices are taken at the request's context (prompt + half the
    # expected output) rounded up to a power of two: a short prompt and 16 tokens land in the
    # 16..32 bucket; this profile has one curve for every context.
    version, _, at = row["price_version"].partition("/gpu@")
    assert version == raw.headers["x-neogate-price-version"]
    assert at.startswith(f"b{batch}c")
    context = int(at.removeprefix(f"b{batch}c"))
    assert context in (16, 32)
    out_usd_per_m = round(2.95 / 3600 / nim_8b_h100_tokens_per_s(batch) * 1e6, 9)
    in_usd_per_m = round(2.95 / 3600 / NIM_8B_H100_PREFILL * 1e6, 9)  # 0.040972222 $/M
    assert in_usd_per_m == 0.040972222
    assert row["price_out_nusd_per_m"] == nusd_per_m(out_usd_per_m) > 0
    assert row["price_in_nusd_per_m"] == nusd_per_m(in_usd_per_m) > 0
    assert row["price_cached_nusd_per_m"] == 0  # a prefix-cache hit costs no prefill time
    assert row["cost_nusd"] == expected_cost_nusd(row) > 0
    if batch == 1:
        # DESIGN.md worked figure: H100 at 2.95 $/h, 8B at c=1 -> ~3.82 $/M output tokens.
        assert 3.7 < out_usd_per_m < 3.9


# --- streamed ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["local-8b", "groq-8b"])
async def test_stream_with_include_usage(env: Env, oai: AsyncOpenAI, model: str) -> None:
    rid = new_rid("st-usage")
    stream = await oai.chat.completions.create(
        model=model,
        messages=MSG,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": rid},
    )
    chunks = [c async for c in stream]
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    row = only_row(await rows_for(env.ledger, rid))
    assert row["stream"] == 1 and row["outcome"] == "ok" and row["token_source"] == "reported"
    assert row["prompt_tokens"] == usage.prompt_tokens
    assert row["completion_tokens"] == usage.completion_tokens == 12
    # The gateway's own count of what it relayed sits beside the reported one.
    assert row["counted_completion_tokens"] == env.tokenizer.count_text(text)
    assert row["divergent"] == 0
    assert row["cost_nusd"] == expected_cost_nusd(row) > 0
    assert 0 < row["ttft_s"] <= row["total_s"]


@pytest.mark.parametrize("model", ["local-8b", "groq-8b"])
async def test_stream_without_include_usage_still_metered(
    env: Env, oai: AsyncOpenAI, model: str
) -> None:
    rid = new_rid("st-nousage")
    stream = await oai.chat.completions.create(
        model=model, messages=MSG, max_tokens=10, stream=True, extra_headers={"x-request-id": rid}
    )
    chunks = [c async for c in stream]
    assert chunks and all(c.usage is None and c.choices for c in chunks)
    # (Groq's own `x_groq.usage` on the last chunk passes through: Groq sends it unasked.)
    row = only_row(await rows_for(env.ledger, rid))
    # The upstream was asked for usage anyway: the row holds its counts, not an estimate.
    assert row["token_source"] == "reported"
    assert row["completion_tokens"] == 10 and row["prompt_tokens"] > 0
    assert row["cost_nusd"] == expected_cost_nusd(row) > 0


async def test_client_disconnect_mid_stream(env: Env, oai: AsyncOpenAI) -> None:
    rid = new_rid("disc")
    max_tokens = 1000
    stream = await oai.chat.completions.create(
        model="slow-8b",
        messages=MSG,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": rid},
    )
    got = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
            if got == 5:
                break
    await stream.close()
    left_at = time.monotonic()
    row = only_row(await rows_for(env.ledger, rid, wait_s=5.0))
    assert row["outcome"] == "client_disconnect" and row["stream"] == 1
    assert row["token_source"] == "counted", "no usage chunk arrived: the relayed text is counted"
    assert got <= row["completion_tokens"] < max_tokens
    assert row["completion_tokens"] == row["counted_completion_tokens"]
    assert row["cost_nusd"] == expected_cost_nusd(row) > 0
    # The upstream request was cancelled: the worker's batch empties long before
    # the ~9 s the full answer would take.
    await worker_drains(env.slow_worker, left_at)


async def worker_drains(worker: str, since: float, within_s: float = 2.0) -> None:
    """Wait until the simulated worker runs nothing and serves no request; fail after `within_s`."""
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(worker + "/sim/control") as r:
                running = (await r.json())["running"]
            async with s.get(worker + "/sim/stats") as r:
                in_flight = (await r.json())["in_flight"]
            if running == 0 and in_flight == 0:
                return
            assert time.monotonic() - since < within_s, (running, in_flight)
            await asyncio.sleep(0.02)


async def test_client_disconnect_non_stream_cancels_upstream(env: Env) -> None:
    rid = new_rid("leave-whole")
    async with AsyncOpenAI(base_url=env.v1, api_key="anonymous", max_retries=0, timeout=0.3) as oai:
        with pytest.raises(openai.APITimeoutError):
            await oai.chat.completions.create(
                model="slow-8b",
                messages=MSG,
                max_tokens=1000,
                extra_headers={"x-request-id": rid},
            )
    await worker_drains(env.slow_worker, time.monotonic())
    # Nothing was delivered, but the worker had the prompt (prefill): that is the row,
    # the tenant's, at the price in force; no completion tokens.
    row = only_row(await rows_for(env.ledger, rid, wait_s=5.0))
    assert row["outcome"] == "client_disconnect" and row["stream"] == 0
    assert row["tenant"] == "anonymous" and row["backend"] == "gpu-slow"
    assert row["completion_tokens"] == 0 and row["prompt_tokens"] > 0
    assert row["token_source"] == "estimated"
    assert row["cost_nusd"] == expected_cost_nusd(row) > 0


@pytest.mark.parametrize("model", ["groq-cut", "local-cut"])
async def test_upstream_cut_mid_stream(env: Env, model: str) -> None:
    rid = new_rid("cut")
    body = {
        "model": model,
        "messages": MSG,
        "max_tokens": 50,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = await raw_sse(env.v1 + "/chat/completions", body, rid)
    assert b"data: [DONE]" not in events
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert set(last) == {"error"} and last["error"]["message"]
    text = ""
    for event in events[:-1]:
        for choice in orjson.loads(event.removeprefix(b"data: "))["choices"]:
            text += choice["delta"].get("content") or ""
    row = only_row(await rows_for(env.ledger, rid))
    assert row["outcome"] == "upstream_cut"
    assert row["token_source"] == "counted"
    assert row["completion_tokens"] == env.tokenizer.count_text(text)
    assert 0 < row["completion_tokens"] < 50
    assert row["completion_tokens"] >= TOKENS_BEFORE_MIDSTREAM_FAULT
    assert row["prompt_tokens"] > 0 and row["cost_nusd"] == expected_cost_nusd(row) > 0


async def test_reasoning_delivered_before_a_cut_is_billed(env: Env) -> None:
    """No usage arrives on a cut stream: every delivered token is counted, reasoning too."""
    rid = new_rid("cut-reason")
    body = {"model": "local-reasoner-cut", "messages": MSG, "max_tokens": 40, "stream": True}
    events = await raw_sse(env.v1 + "/chat/completions", body, rid)
    reasoning = content = ""
    for event in events[:-1]:
        for choice in orjson.loads(event.removeprefix(b"data: "))["choices"]:
            reasoning += choice["delta"].get("reasoning_content") or ""
            content += choice["delta"].get("content") or ""
    # The simulated reasoner spends the first half of its answer thinking: all the
    # tokens delivered before the cut are reasoning.
    assert reasoning and not content
    row = only_row(await rows_for(env.ledger, rid))
    assert row["outcome"] == "upstream_cut" and row["token_source"] == "counted"
    assert row["completion_tokens"] == env.tokenizer.count_text(reasoning)
    assert row["completion_tokens"] >= TOKENS_BEFORE_MIDSTREAM_FAULT
    assert row["cost_nusd"] == expected_cost_nusd(row) > 0


async def test_upstream_cut_seen_by_the_sdk(env: Env, oai: AsyncOpenAI) -> None:
    rid = new_rid("cut-sdk")
    stream = await oai.chat.completions.create(
        model="groq-cut",
        messages=MSG,
        max_tokens=40,
        stream=True,
        extra_headers={"x-request-id": rid},
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    assert only_row(await rows_for(env.ledger, rid))["outcome"] == "upstream_cut"


async def test_upstream_error_event_mid_stream(env: Env, oai: AsyncOpenAI) -> None:
    """The upstream's own `data: {"error"}` reaches the client only after the row is committed."""
    rid = new_rid("errmid")
    stream = await oai.chat.completions.create(
        model="groq-errmid",
        messages=MSG,
        max_tokens=40,
        stream=True,
        extra_headers={"x-request-id": rid},
    )
    text = ""
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    row = only_row(await rows_for(env.ledger, rid))
    assert row["outcome"] == "upstream_error" and row["token_source"] == "counted"
    assert row["completion_tokens"] == env.tokenizer.count_text(text) > 0


async def test_malformed_stream_event_ends_the_stream_with_an_error(
    env: Env, oai: AsyncOpenAI
) -> None:
    """An upstream event that is not JSON is never relayed: the SDK gets an error event (not
    a JSONDecodeError), no [DONE], and the row says `upstream_protocol_error` with what was
    delivered before it."""
    rid = new_rid("malformed")
    stream = await oai.chat.completions.create(
        model="groq-malformed",
        messages=MSG,
        max_tokens=40,
        stream=True,
        extra_headers={"x-request-id": rid},
    )
    text = ""
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    assert "not a JSON object" in caught.value.message
    row = only_row(await rows_for(env.ledger, rid))
    assert row["outcome"] == "upstream_protocol_error" and row["token_source"] == "counted"
    assert row["completion_tokens"] == env.tokenizer.count_text(text) > 0
    assert row["cost_nusd"] == expected_cost_nusd(row) > 0

    rid = new_rid("malformed-raw")
    body = {"model": "groq-malformed", "messages": MSG, "max_tokens": 40, "stream": True}
    events = await raw_sse(env.v1 + "/chat/completions", body, rid)
    assert b"data: [DONE]" not in events
    for event in events:  # every event the client got parses
        orjson.loads(event.removeprefix(b"data: "))
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_bad_event" and last["error"]["type"]


async def test_tool_call_arguments_counted_when_the_stream_breaks(env: Env) -> None:
    rid = new_rid("tool-cut")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "detail": {"type": "string"}},
                },
            },
        }
    ]
    body = {
        "model": "local-cut",
        "messages": MSG,
        "tools": tools,
        "tool_choice": "required",
        "max_tokens": 64,
        "stream": True,
    }
    events = await raw_sse(env.v1 + "/chat/completions", body, rid)
    args = ""
    name = ""
    for event in events[:-1]:
        for choice in orjson.loads(event.removeprefix(b"data: "))["choices"]:
            for call in choice["delta"].get("tool_calls") or []:
                name += call.get("function", {}).get("name") or ""
                args += call.get("function", {}).get("arguments") or ""
    assert args, "the cut stream delivered part of the arguments"
    row = only_row(await rows_for(env.ledger, rid))
    assert row["outcome"] == "upstream_cut" and row["token_source"] == "counted"
    assert row["completion_tokens"] == env.tokenizer.count_text(name + args) > 0


@pytest.mark.parametrize("stream", [False, True])
async def test_failover_before_first_byte_meters_the_attempt_that_answered(
    env: Env, oai: AsyncOpenAI, stream: bool
) -> None:
    rid = new_rid("failover")
    raw = await oai.chat.completions.with_raw_response.create(
        model="failover-8b",
        messages=MSG,
        max_tokens=5,
        stream=stream,
        extra_headers={"x-request-id": rid},
    )
    if stream:
        _ = [c async for c in raw.parse()]
    assert raw.headers["x-neogate-backend"] == "gpu-a"
    assert raw.headers["x-neogate-attempts"] == "2"
    # The refused attempt consumed nothing: one row, for the attempt that answered.
    row = only_row(await rows_for(env.ledger, rid))
    assert (row["attempt"], row["backend"], row["outcome"]) == (1, "gpu-a", "ok")
    assert row["completion_tokens"] == 5 and row["cost_nusd"] == expected_cost_nusd(row) > 0


# --- n, cached, reasoning ----------------------------------------------------------------


async def test_n2_non_stream_and_stream(env: Env, oai: AsyncOpenAI) -> None:
    rid = new_rid("n2")
    reply = await oai.chat.completions.create(
        model="local-8b", messages=MSG, max_tokens=6, n=2, extra_headers={"x-request-id": rid}
    )
    assert len(reply.choices) == 2 and reply.usage is not None
    row = only_row(await rows_for(env.ledger, rid))
    assert row["completion_tokens"] == reply.usage.completion_tokens == 12
    assert row["counted_completion_tokens"] == sum(
        env.tokenizer.count_text(c.message.content or "") for c in reply.choices
    )

    rid = new_rid("n2-stream")
    stream = await oai.chat.completions.create(
        model="local-8b",
        messages=MSG,
        max_tokens=6,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": rid},
    )
    chunks = [c async for c in stream]
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 12
    row = only_row(await rows_for(env.ledger, rid))
    assert row["completion_tokens"] == 12 and row["stream"] == 1 and row["divergent"] == 0


@pytest.mark.parametrize(("model", "cached_price"), [("local-priced", 0.01), ("groq-8b", 0.025)])
async def test_cached_prompt_billed_at_cached_price(
    env: Env, oai: AsyncOpenAI, model: str, cached_price: float
) -> None:
    long_prompt = [
        {"role": "system", "content": "You are a careful assistant. " * 60 + uuid.uuid4().hex},
        {"role": "user", "content": "Summarise the above."},
    ]
    rids = [new_rid("cache-1"), new_rid("cache-2")]
    usages = []
    for rid in rids:
        reply = await oai.chat.completions.create(
            model=model, messages=long_prompt, max_tokens=4, extra_headers={"x-request-id": rid}
        )
        assert reply.usage is not None
        usages.append(reply.usage)
    details = usages[1].prompt_tokens_details
    assert details is not None and details.cached_tokens
    cached = details.cached_tokens
    first = only_row(await rows_for(env.ledger, rids[0]))
    second = only_row(await rows_for(env.ledger, rids[1]))
    assert first["cached_tokens"] == 0
    assert second["cached_tokens"] == cached and 0 < cached <= second["prompt_tokens"]
    assert second["price_cached_nusd_per_m"] == nusd_per_m(cached_price)
    assert second["cost_nusd"] == expected_cost_nusd(second)
    # Same prompt, same answer length: the repeat is cheaper by exactly the cache discount.
    discount = Decimal(cached) * (second["price_in_nusd_per_m"] - nusd_per_m(cached_price)) / 10**6
    assert first["prompt_tokens"] == second["prompt_tokens"]
    assert first["completion_tokens"] == second["completion_tokens"]
    assert abs(first["cost_nusd"] - second["cost_nusd"] - discount) <= 1


async def test_reasoning_tokens_recorded(env: Env, oai: AsyncOpenAI) -> None:
    rid = new_rid("reason")
    reply = await oai.chat.completions.create(
        model="local-reasoner", messages=MSG, max_tokens=20, extra_headers={"x-request-id": rid}
    )
    assert reply.usage is not None and reply.usage.completion_tokens_details is not None
    reasoning = reply.usage.completion_tokens_details.reasoning_tokens
    assert reasoning
    row = only_row(await rows_for(env.ledger, rid))
    assert row["reasoning_tokens"] == reasoning
    assert row["completion_tokens"] == reply.usage.completion_tokens >= reasoning

    rid = new_rid("reason-stream")
    stream = await oai.chat.completions.create(
        model="local-reasoner",
        messages=MSG,
        max_tokens=20,
        stream=True,
        extra_headers={"x-request-id": rid},
    )
    _ = [c async for c in stream]
    row = only_row(await rows_for(env.ledger, rid))
    assert row["reasoning_tokens"] == reasoning and row["token_source"] == "reported"


async def test_a_repeated_client_request_id_is_billed_every_time(
    env: Env, oai: AsyncOpenAI
) -> None:
    before = len(await asyncio.to_thread(sqlite_rows, env.ledger))
    rid = new_rid("reused")
    for _ in range(3):
        reply = await oai.chat.completions.create(
            model="groq-8b", messages=MSG, max_tokens=3, extra_headers={"x-request-id": rid}
        )
        assert reply.choices
    after = len(await asyncio.to_thread(sqlite_rows, env.ledger))
    assert after - before == 3


# --- Groq timings feed the latency estimates -------------------------------------------------


async def test_groq_timings_update_latency_estimate(env: Env, oai: AsyncOpenAI) -> None:
    rid = new_rid("groq-timed")
    reply = await oai.chat.completions.create(
        model="groq-timed", messages=MSG, max_tokens=8, extra_headers={"x-request-id": rid}
    )
    assert reply.usage is not None
    extra = reply.usage.model_extra or {}
    assert {"queue_time", "prompt_time", "completion_time", "total_time"} <= set(extra)
    row = only_row(await rows_for(env.ledger, rid))
    assert row["backend"] == "sim-groq" and row["token_source"] == "reported"
    async with (
        aiohttp.ClientSession() as s,
        s.get(env.url + "/admin/backends", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r,
    ):
        assert r.status == 200
        backends = {b["name"]: b for b in (await r.json())["backends"]}
    ttft = backends["sim-groq"]["models"]["groq-timed"]["ttft_s"]
    # The first sample replaces the prior (0.35 s): the provider's own queue + prompt time.
    assert ttft == pytest.approx(extra["queue_time"] + extra["prompt_time"], rel=1e-6)


# --- Prometheus -----------------------------------------------------------------------------


async def test_prometheus_metering_metrics(env: Env, oai: AsyncOpenAI) -> None:
    before = await scrape(env.url)
    stream = await oai.chat.completions.create(
        model="local-8b",
        messages=MSG,
        max_tokens=9,
        stream=True,
        extra_headers={"x-request-id": new_rid("prom")},
    )
    _ = [c async for c in stream]
    after = await scrape(env.url)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    lab = {"backend": "gpu-a", "model": "local-8b"}
    assert delta("neogate_requests_total", outcome="ok", **lab) == 1
    assert delta("neogate_tokens_total", kind="completion", **lab) == 9
    assert delta("neogate_tokens_total", kind="prompt", **lab) > 0
    assert delta("neogate_cost_usd_total", **lab) > 0
    assert delta("neogate_time_to_first_token_seconds_count", **lab) == 1
    assert delta("neogate_inter_token_latency_seconds_count", **lab) == 1
    assert delta("neogate_ledger_rows_written_total") >= 1
    assert delta("neogate_ledger_write_seconds_count") >= 1
    assert delta("neogate_ledger_batch_rows_count") >= 1
    present = names(after)
    for name in (
        "neogate_ledger_backlog_rows",
        "neogate_ledger_spool_rows",
        "neogate_ledger_spool_bytes",
        "neogate_ledger_up",
    ):
        assert name in present, name
    assert metric(after, "neogate_ledger_up") == 1
    assert metric(after, "neogate_ledger_spool_rows") == 0


# --- PostgreSQL ledger ---------------------------------------------------------------------


async def pg_rows(schema: str, rid: str) -> list[dict[str, Any]]:
    store = make_store("postgres", dsn=PG_DSN, schema=schema, create=False)
    await store.open()
    try:
        cols = ", ".join(COLUMNS)
        recs = await store.fetch(f"SELECT {cols} FROM ledger WHERE client_request_id = ?", [rid])
        return [dict(zip(COLUMNS, rec, strict=True)) for rec in recs]
    finally:
        await store.close()


async def drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


async def test_postgres_ledger(tmp_path: Path) -> None:
    urls, sims = await start_sims()
    schema = f"e2e_{uuid.uuid4().hex[:12]}"
    policy = e2e_policy(urls, tmp_path)
    policy["ledger"] = {
        "kind": "postgres",
        "dsn": PG_DSN,
        "schema_name": schema,
        "spool_path": str(tmp_path / "ledger.spool"),
    }
    runner, url = await start_gateway(policy)
    try:
        async with AsyncOpenAI(base_url=url + "/v1", api_key="anonymous", max_retries=0) as oai:
            rid_whole, rid_stream = new_rid("pg-ns"), new_rid("pg-st")
            reply = await oai.chat.completions.create(
                model="groq-8b",
                messages=MSG,
                max_tokens=7,
                extra_headers={"x-request-id": rid_whole},
            )
            stream = await oai.chat.completions.create(
                model="local-8b", messages=MSG, max_tokens=5, stream=True,
                extra_headers={"x-request-id": rid_stream},
            )  # fmt: skip
            _ = [c async for c in stream]
        assert reply.usage is not None
        (whole,) = await pg_rows(schema, rid_whole)
        assert whole["completion_tokens"] == reply.usage.completion_tokens == 7
        assert whole["prompt_tokens"] == reply.usage.prompt_tokens
        assert whole["price_out_nusd_per_m"] == nusd_per_m(0.08)
        assert whole["cost_nusd"] == expected_cost_nusd(whole) > 0 and whole["outcome"] == "ok"
        (streamed,) = await pg_rows(schema, rid_stream)
        assert streamed["stream"] is True and streamed["completion_tokens"] == 5
        assert streamed["token_source"] == "reported" and streamed["batch_size"] >= 1
        assert streamed["cost_nusd"] == expected_cost_nusd(streamed) > 0
        assert (
            not (tmp_path / "ledger.spool").exists()
            or os.path.getsize(tmp_path / "ledger.spool") == 0
        )
    finally:
        await runner.cleanup()
        for r in sims:
            await r.cleanup()
        await drop_schema(schema)


# --- database outage: spool, then exactly-once replay ------------------------------------------


async def test_sqlite_locked_rows_spooled_then_replayed_once(tmp_path: Path) -> None:
    urls, sims = await start_sims()
    runner, url = await start_gateway(e2e_policy(urls, tmp_path))
    ledger_path = tmp_path / "ledger.db"
    locker = sqlite3.connect(ledger_path, isolation_level=None, check_same_thread=False)
    try:
        writer = runner.app[RUNTIME].current.meter.ledger
        assert writer is not None
        async with AsyncOpenAI(base_url=url + "/v1", api_key="anonymous", max_retries=0) as oai:
            before = new_rid("pre-lock")
            await oai.chat.completions.create(
                model="groq-8b", messages=MSG, max_tokens=3, extra_headers={"x-request-id": before}
            )
            locker.execute("BEGIN EXCLUSIVE")
            rids = [new_rid("locked") for _ in range(4)]

            async def one(i: int, rid: str) -> None:
                if i % 2:
                    stream = await oai.chat.completions.create(
                        model="local-8b", messages=MSG, max_tokens=4, stream=True,
                        extra_headers={"x-request-id": rid},
                    )  # fmt: skip
                    assert [c async for c in stream]
                else:
                    reply = await oai.chat.completions.create(
                        model="groq-8b",
                        messages=MSG,
                        max_tokens=4,
                        extra_headers={"x-request-id": rid},
                    )
                    assert reply.choices[0].message.content

            await asyncio.gather(*(one(i, rid) for i, rid in enumerate(rids)))
            stats = writer.stats()
            assert not stats.db_up and stats.spool_rows == len(rids) == stats.rows_spooled
            samples = await scrape(url)
            assert metric(samples, "neogate_ledger_up") == 0
            assert metric(samples, "neogate_ledger_spool_rows") == len(rids)
            assert metric(samples, "neogate_ledger_write_errors_total") >= 1
            locker.execute("ROLLBACK")
            assert await writer.replay_now() == len(rids)
            # A second replay finds nothing: every row went in exactly once.
            assert await writer.replay_now() == 0
        rows = await asyncio.to_thread(sqlite_rows, ledger_path)
        by_rid: dict[str, int] = {}
        for r in rows:
            by_rid[r["client_request_id"]] = by_rid.get(r["client_request_id"], 0) + 1
        assert by_rid == {rid: 1 for rid in [before, *rids]}
        assert writer.stats().spool_rows == 0 and writer.stats().db_up
        samples = await scrape(url)
        assert metric(samples, "neogate_ledger_rows_replayed_total") == len(rids)
        assert metric(samples, "neogate_ledger_spool_rows") == 0
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()
        await runner.cleanup()
        for r in sims:
            await r.cleanup()
