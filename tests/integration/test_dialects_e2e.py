"""Real backends' dialects end to end: recorded wire shapes (tests/fixtures/wire/) replayed to the
real gateway on a loopback socket, the official `openai` SDK as client, the SQLite ledger read back.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai import AsyncOpenAI

from gateway.runtime import RUNTIME
from tests.conftest import ADMIN_KEY, GatewayFactory
from tests.integration.wirereplay import (
    Script,
    header_lines,
    one_backend_policy,
    replay,
    sse_events,
    wire_bytes,
)

MSG: list[Any] = [{"role": "user", "content": "hi"}]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _rows(path: Path, rid: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        cur = conn.execute("SELECT * FROM ledger WHERE client_request_id = ?", (rid,))
        return [dict(r) for r in cur.fetchall()]
    finally:
        conn.close()


def _client(url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=url + "/v1", api_key="anonymous", max_retries=0)


def _rid() -> str:
    return "dialect-" + uuid.uuid4().hex[:12]


# --- item 1: legacy local-worker error bodies and events ----------------------------


@pytest.mark.parametrize(
    ("kind", "fixture"),
    [
        ("sglang", "error_sglang.json"),  # SGLang: top-level "object": "error"
        ("vllm", "error_vllm_legacy.json"),  # vLLM before ErrorResponse(error=ErrorInfo)
        ("vllm", "error_vllm_current.json"),  # current vLLM: already nested
        ("openai_compatible", "error_sglang.json"),  # SGLang behind a generic proxy
    ],
)
async def test_a_worker_400_reaches_the_client_with_its_own_message(
    gateway_factory: GatewayFactory, tmp_path: Path, kind: str, fixture: str
) -> None:
    body = wire_bytes(fixture).strip()
    message = orjson.loads(body).get("message") or orjson.loads(body)["error"]["message"]
    async with replay({"w": Script(status=400, body=body)}) as up:
        gw = await gateway_factory(one_backend_policy(tmp_path, kind, up.v1, "w"))
        async with _client(gw.url) as oai:
            with pytest.raises(openai.BadRequestError) as err:
                await oai.chat.completions.create(model="m", messages=MSG, max_tokens=4)
    assert err.value.status_code == 400
    assert err.value.message.endswith(message)  # its own words, not "backend b answered 400"
    assert isinstance(err.value.body, dict) and err.value.body["message"] == message


async def test_a_legacy_error_event_mid_stream_ends_the_stream_as_an_error(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """SGLang streams OpenAI-shaped chunks, then its legacy error body as a `data:` event."""
    chunks = sse_events("openai_stream_include_usage__openai-python_inline-snapshot_173417d5.sse")
    legacy = wire_bytes("error_sglang.json").strip()
    events = [*chunks[:4], b"data: " + legacy]  # no [DONE]: the worker gave up
    rid = _rid()
    async with replay({"w": Script(events=events)}) as up:
        gw = await gateway_factory(one_backend_policy(tmp_path, "sglang", up.v1, "w"))
        async with _client(gw.url) as oai:
            stream = await oai.chat.completions.create(
                model="m",
                messages=MSG,
                max_tokens=40,
                stream=True,
                extra_headers={"x-request-id": rid},
            )
            with pytest.raises(openai.APIError) as err:
                async for _ in stream:
                    pass
    assert orjson.loads(legacy)["message"] in err.value.message
    (row,) = _rows(tmp_path / "ledger.db", rid)
    assert row["outcome"] == "upstream_error"


# --- item 2: Together's text mirror counted once ------------------------------------


def _together_chunk(text: str, *, finish: str | None = None, usage: Any = None) -> bytes:
    """A Together chat chunk in the recorded shape (together_stream_chunks.sse), carrying `text`."""
    first = orjson.loads(sse_events("together_stream_chunks.sse")[0][len(b"data: ") :])
    first["choices"][0]["text"] = text
    first["choices"][0]["delta"]["content"] = text
    first["choices"][0]["finish_reason"] = finish
    first["usage"] = usage
    return b"data: " + orjson.dumps(first)


async def test_a_cut_together_stream_is_billed_for_its_text_once(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    words = [" batching", " raises", " the", " tokens", " per", " second", " of", " a", " GPU"]
    events = [_together_chunk(w) for w in words * 3]  # cut: no usage chunk, no [DONE]
    rid = _rid()
    async with replay({"t": Script(events=events)}) as up:
        gw = await gateway_factory(one_backend_policy(tmp_path, "together", up.v1, "t"))
        async with _client(gw.url) as oai:
            stream = await oai.chat.completions.create(
                model="m",
                messages=MSG,
                max_tokens=40,
                stream=True,
                extra_headers={"x-request-id": rid},
            )
            text = ""
            with pytest.raises(openai.APIError):
                async for chunk in stream:
                    text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    (row,) = _rows(tmp_path / "ledger.db", rid)
    assert text == "".join(words * 3)
    tokenizer = gw.app[RUNTIME].current.estimator.tokenizer
    assert row["outcome"] == "upstream_cut"
    assert row["completion_tokens"] == tokenizer.count_text(text)  # not twice that


# --- item 1: Groq's x_groq-only usage reaches a client that asked for usage -----------


def _groq_x_groq_only() -> list[bytes]:
    """groq_stream_include_usage_gpt_oss.sse in Groq's older shape: usage only under `x_groq`
    (the top-level `usage` of the last chunk and the usage-only chunk removed)."""
    out = []
    for ev in sse_events("groq_stream_include_usage_gpt_oss.sse"):
        if not ev.startswith(b"data: {"):
            out.append(ev)
            continue
        chunk = orjson.loads(ev[len(b"data: ") :])
        if chunk["choices"]:  # the usage-only chunk is dropped
            chunk.pop("usage", None)
            out.append(b"data: " + orjson.dumps(chunk))
    return out


async def test_groq_x_groq_usage_becomes_the_standard_usage_chunk(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    events = _groq_x_groq_only()
    assert any(b'"x_groq"' in e and b'"usage"' in e for e in events)
    rid = _rid()
    async with replay({"g": Script(events=events)}) as up:
        gw = await gateway_factory(one_backend_policy(tmp_path, "groq", up.v1, "g"))
        async with _client(gw.url) as oai:
            stream = await oai.chat.completions.create(
                model="m",
                messages=MSG,
                max_tokens=16,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"x-request-id": rid},
            )
            chunks = [c async for c in stream]
            # A client that did not ask gets no usage chunk either way.
            plain = await oai.chat.completions.create(
                model="m", messages=MSG, max_tokens=16, stream=True
            )
            plain_chunks = [c async for c in plain]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and not chunks[-1].choices
    assert (usage[0].prompt_tokens, usage[0].completion_tokens, usage[0].total_tokens) == (
        73,
        16,
        89,
    )
    assert usage[0].completion_tokens_details is not None
    assert usage[0].completion_tokens_details.reasoning_tokens == 14
    assert chunks[-1].id == chunks[0].id and chunks[-1].model == "openai/gpt-oss-20b"
    assert all(c.usage is None for c in plain_chunks)
    (row,) = _rows(tmp_path / "ledger.db", rid)
    assert row["outcome"] == "ok" and row["completion_tokens"] == 16


# --- items 3 and 4: each provider's rate-limit headers --------------------------------


async def _backends(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/admin/backends", headers=ADMIN) as r:
        assert r.status == 200
        body: dict[str, Any] = await r.json()
    return {b["name"]: b for b in body["backends"]}


async def test_a_together_429_cools_down_for_its_x_ratelimit_reset(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """Together's 429 has no retry-after: its wait is x-ratelimit-reset (headers_together.txt)."""
    headers = header_lines("headers_together.txt")
    assert "retry-after" not in {k.lower() for k in headers}
    headers["x-ratelimit-remaining"] = "0"
    body = b'{"error": {"message": "rate limited", "type": "dynamic_request_limited"}}'
    async with replay({"t": Script(status=429, headers=headers, body=body)}) as up:
        gw = await gateway_factory(one_backend_policy(tmp_path, "together", up.v1, "t"))
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                gw.url + "/v1/chat/completions",
                json={"model": "m", "messages": MSG, "max_tokens": 4},
            ) as r,
        ):
            status, retry_ms = r.status, r.headers.get("retry-after-ms")
        b = (await _backends(gw.url))["b"]
    assert status == 429
    assert retry_ms == "2000"  # the provider's own wait, not the 1 s default
    assert b["headroom"]["cooling_down"]
    assert b["headroom"]["cooldown_until"] - b["headroom"]["observed_at"] == pytest.approx(2.0)


async def test_together_and_groq_headers_feed_headroom_in_their_own_windows(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    ok = wire_bytes("groq_chat_nonstream.json").strip()
    together = {k: v for k, v in header_lines("headers_together.txt").items() if "reset" not in k}
    groq = {k: v for k, v in header_lines("headers_groq.txt").items() if k != "retry-after"}
    fireworks = header_lines("headers_fireworks.txt")
    async with (
        replay({"t": Script(headers=together, body=ok)}) as t_up,
        replay({"g": Script(headers=groq, body=ok)}) as g_up,
        replay({"f": Script(headers=fireworks, body=ok)}) as f_up,
    ):
        policy = one_backend_policy(tmp_path, "together", t_up.v1, "t")
        policy["backends"].append(
            {
                **policy["backends"][0],
                "name": "g",
                "kind": "groq",
                "base_url": g_up.v1,
                "models": {"m2": "g"},
                "rate_limits": {"requests_per_minute": 30},
            }
        )
        policy["models"].append({"name": "m2", "backends": ["g"]})
        policy["backends"].append(
            {
                **policy["backends"][0],
                "name": "f",
                "kind": "fireworks",
                "base_url": f_up.v1,
                "models": {"m3": "f"},
            }
        )
        policy["models"].append({"name": "m3", "backends": ["f"]})
        gw = await gateway_factory(policy)
        async with _client(gw.url) as oai:
            for model in ("m", "m2", "m3"):
                await oai.chat.completions.create(model=model, messages=MSG, max_tokens=4)
        backends = await _backends(gw.url)
    assert (len(t_up.received), len(g_up.received), len(f_up.received)) == (1, 1, 1)
    t = backends["b"]["headroom"]
    assert (t["limit_requests"], t["remaining_requests"]) == (10, 9)
    assert (t["limit_tokens"], t["remaining_tokens"]) == (200000, 199000)
    assert t["window_s"] == 1.0
    g = backends["g"]["headroom"]
    # Groq's request headers are per day; its per-minute request limit is the configured one.
    assert (g["daily_limit_requests"], g["daily_remaining_requests"]) == (14400, 14370)
    assert g["limit_requests"] == 30 and g["remaining_requests"] == 29
    assert (g["limit_tokens"], g["remaining_tokens"]) == (18000, 17997)
    f = backends["f"]["headroom"]
    # Fireworks sends limits only (tokens per second, enforced per minute): what remains is
    # the limit less our own last minute (our prompt estimate; the answer's 26 output tokens).
    assert (f["limit_tokens"], f["limit_output_tokens"]) == (3_600_000 * 60, 36_000 * 60)
    assert f["remaining_output_tokens"] == 36_000 * 60 - 26
    assert 3_600_000 * 60 - 60 < f["remaining_tokens"] < 3_600_000 * 60


# --- item 7: queue time, preemptions, cache hits, Groq queue_time -------------------


def _vllm_scrape(
    queue_sum: float, queue_n: int, preemptions: int, hits: int, for_capacity: int = 2
) -> str:
    """vLLM V1 /metrics in the recorded shape (vllm_v1_metrics_excerpts.prom: names, `engine`
    and `model_name` labels) with the queue, preemption and waiting-by-reason series."""
    lab = 'engine="0",model_name="zai-org/GLM-4.5"'
    recorded = wire_bytes("vllm_v1_metrics_excerpts.prom").decode()
    recorded = "\n".join(ln for ln in recorded.splitlines() if "prefix_cache" not in ln)
    return (
        recorded
        + f"\nvllm:num_requests_waiting{{{lab}}} 3.0\n"
        + f'vllm:num_requests_waiting_by_reason{{{lab},reason="capacity"}} {for_capacity}\n'
        + f"vllm:request_queue_time_seconds_sum{{{lab}}} {queue_sum}\n"
        + f"vllm:request_queue_time_seconds_count{{{lab}}} {queue_n}\n"
        + f"vllm:num_preemptions_total{{{lab}}} {preemptions}\n"
        + f"vllm:prefix_cache_queries_total{{{lab}}} {1000 + 1000 * queue_n}\n"
        + f"vllm:prefix_cache_hits_total{{{lab}}} {hits}\n"
    )


async def test_worker_and_provider_queue_signals_in_admin_backends(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    scrapes = [_vllm_scrape(10.0, 10, 5, 0), _vllm_scrape(22.0, 20, 9, 6000)]
    groq = wire_bytes("groq_chat_nonstream.json").strip()
    async with (
        replay({}, metrics=scrapes) as worker,
        replay({"g": Script(body=groq)}) as provider,
    ):
        policy = one_backend_policy(tmp_path, "vllm", worker.v1, "w")
        policy["routing"] = {"scrape_interval_s": 0.05}
        policy["backends"].append(
            {**policy["backends"][0], "name": "g", "kind": "groq", "base_url": provider.v1}
        )
        policy["backends"][1]["models"] = {"m2": "g"}
        policy["models"].append({"name": "m2", "backends": ["g"]})
        gw = await gateway_factory(policy)
        async with _client(gw.url) as oai:
            await oai.chat.completions.create(model="m2", messages=MSG, max_tokens=4)
        for _ in range(100):
            backends = await _backends(gw.url)
            w = backends["b"]["worker"]
            if w is not None and w["queue_mean_s"] is not None:
                break
            await asyncio.sleep(0.05)
    assert w["waiting"] == 3 and w["waiting_for_capacity"] == 2
    assert w["queue_mean_s"] == pytest.approx(1.2)  # (22 - 10) s over (20 - 10) requests
    assert w["preemptions_per_s"] > 0 and w["under_pressure"]
    assert w["prefix_cache_hit_rate"] == pytest.approx(0.6)
    g = backends["g"]["queue_s"]["m2"]
    assert g["long_run"] == pytest.approx(0.071900347) == g["recent"]  # Groq usage.queue_time


async def test_a_preempting_worker_is_routed_as_one_at_b_star(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """Two identical vLLM workers with the same running count; one preempts between its
    scrapes. The router predicts that one at b* and prefers the calm one."""
    calm = [_vllm_scrape(10.0, 10, 5, 0, for_capacity=0)]
    pressed = [_vllm_scrape(10.0, 10, 5, 0), _vllm_scrape(22.0, 20, 9, 6000)]
    gpu = {"price_per_hour": 2.95, "mode": "reserved", "profile": "llama-3.1-8b-h100"}
    async with replay({}, metrics=calm) as a, replay({}, metrics=pressed) as b:
        policy = one_backend_policy(tmp_path, "vllm", a.v1, "w", gpu=gpu)
        policy["backends"][0]["name"] = "calm"
        del policy["backends"][0]["price"]
        policy["backends"].append({**policy["backends"][0], "name": "pressed", "base_url": b.v1})
        policy["models"] = [{"name": "m", "backends": ["pressed", "calm"]}]
        policy["routing"] = {"scrape_interval_s": 0.05}
        gw = await gateway_factory(policy)
        for _ in range(100):
            backends = await _backends(gw.url)
            w = backends["pressed"]["worker"]
            if w is not None and w["preemptions_per_s"] is not None:
                break
            await asyncio.sleep(0.05)
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                gw.url + "/admin/route",
                params={"model": "m", "prompt_tokens": "256"},
                headers=ADMIN,
            ) as r,
        ):
            assert r.status == 200
            decision = await r.json()
    cands = {c["backend"]: c for c in decision["candidates"]}
    assert backends["pressed"]["worker"]["under_pressure"]
    assert not backends["calm"]["worker"]["under_pressure"]
    assert cands["calm"]["predicted_batch"] == 3 + 8 + 1  # waiting + running + this one
    assert cands["pressed"]["predicted_batch"] == cands["pressed"]["slo_batch"]
    assert decision["candidates"][0]["backend"] == "calm"
