"""Lifetimes (issue 15): what lives as long as the process survives a reload; a runtime is
never changed once built; one attempt's outcome is what routing learns from."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import GatewayConfig, parse_config
from gateway.errors import UpstreamUnavailable
from gateway.flow.estimate import Estimate
from gateway.flow.feedback import Feedback
from gateway.flow.reliability import Reliability
from gateway.flow.slo_budgets import SloBudgets
from gateway.http.auth import Tenant
from gateway.metering.outcome import AttemptOutcome
from gateway.metering.usage import UpstreamTimings
from gateway.metrics import GatewayMetrics
from gateway.process import AppOptions
from gateway.state.live import LiveState, LocalRoom
from gateway.wiring import reload_runtime, running
from policies.types import Slo

PRICE: dict[str, Any] = {"price": {"input_per_million": 1.0, "output_per_million": 2.0}}


def _doc(tmp: Path) -> dict[str, Any]:
    return {
        "backends": [
            {"name": "a", "base_url": "http://127.0.0.1:9/v1", "models": {"m": "m"}, **PRICE},
            {"name": "b", "base_url": "http://127.0.0.1:10/v1", "models": {"m": "m"}, **PRICE},
        ],
        "models": [{"name": "m", "backends": ["a", "b"]}],
        "tenants": [{"name": "t", "budgets": {"usd_total": 1.0}}],
        "ledger": {"path": str(tmp / "ledger.db"), "spool_path": str(tmp / "ledger.spool")},
        "tokenizer": {"source": "estimate"},
        "reliability": {"breaker_consecutive_failures": 2},
    }


def _config(doc: dict[str, Any]) -> GatewayConfig:
    return parse_config(yaml.safe_dump(doc))


async def test_a_reload_keeps_what_lives_as_long_as_the_process(tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    async with running(_config(doc), AppOptions(server_secret="s")) as ref:
        process, before = ref.process, ref.current
        # Trip a's breaker (2 failures in a row), hold a gate slot and a budget reservation.
        for _ in range(2):
            assert before.feedback.admit("a")
            before.feedback.on_failure("a", UpstreamUnavailable("down"), 0.1)
        breaker = before.live.backends["a"].breaker
        assert breaker.snapshot(time.time()).state == "open"
        token = process.reliability.gate.try_acquire("b")
        assert token is not None
        held = await before.meter.reserve(
            Tenant.from_spec(before.config.tenants[0]), before.models["m"], Estimate(10, 5, 5, True)
        )
        adapter_a, adapter_b = before.backends["a"], before.backends["b"]

        # Reload: b moves to another upstream, the tenant's budget and the policy change.
        doc["backends"][1]["base_url"] = "http://127.0.0.1:11/v1"
        doc["tenants"][0]["budgets"] = {"usd_total": 2.0}
        doc["models"][0]["policy"] = {"kind": "pinned", "order": ["b", "a"]}
        new = await reload_runtime(ref, _config(doc), "test")

        assert ref.current is new and new is not before and ref.process is process
        assert new.process is process and new.meter.ledger is process.ledger is not None
        # a's upstream is unchanged: its adapter (warm pool) and live entry carry over,
        # breaker and all, still open; b's upstream changed: a new entry and adapter.
        assert new.backends["a"] is adapter_a and new.backends["b"] is not adapter_b
        assert new.live.backends["a"] is before.live.backends["a"]
        assert new.live.backends["a"].breaker is breaker
        assert breaker.snapshot(time.time()).state == "open"
        assert new.live.backends["b"] is not before.live.backends["b"]
        assert process.adapters.kept(new.specs["b"]) is new.backends["b"]
        # The gate slot and the reservation are still counted; the new limit is in force.
        assert process.reliability.gate.snapshot().inflight == {"b": 1}
        assert process.admission.outstanding == 1
        assert process.admission.limits["t"].nusd_total == 2 * 10**9
        process.reliability.gate.release(token)
        await process.admission.release(held)
        assert process.admission.outstanding == 0
        # Prices: the config's again, under a version past the one in force before.
        assert new.live.prices.book.version == before.live.prices.book.version + 1

        # A breaker setting that changes starts every breaker afresh at the new setting.
        doc["reliability"] = {"breaker_consecutive_failures": 3}
        newer = await reload_runtime(ref, _config(doc), "test")
        fresh = newer.live.backends["a"].breaker
        assert fresh is not breaker and fresh.config.consecutive_failures == 3
        assert newer.live.backends["a"] is before.live.backends["a"]


async def test_a_runtime_is_not_changed_once_built(tmp_path: Path) -> None:
    async with running(_config(_doc(tmp_path)), AppOptions(server_secret="s")) as ref:
        with pytest.raises(dataclasses.FrozenInstanceError):
            ref.current.router = ref.current.router  # type: ignore[misc]


POLICY = """
backends:
  - name: groq
    kind: groq
    base_url: http://127.0.0.1:9/v1
    models: {m: m}
    price: {input_per_million: 0.05, output_per_million: 0.08}
  - name: gpu
    kind: vllm
    base_url: http://127.0.0.1:10/v1
    models: {m: m}
    gpu: {price_per_hour: 3.6, profile: llama-3.1-8b-h200}
models:
  - name: m
    backends: [groq, gpu]
"""


def _feedback() -> tuple[Feedback, LiveState, LocalRoom]:
    config = parse_config(POLICY)
    live = LiveState({b.name: b for b in config.backends}, 0.0, alpha=0.2)
    room = LocalRoom()
    clock = iter(float(i) for i in range(100, 10_000))
    store = SloBudgets()
    budgets = store.view({n: Slo.from_spec(c) for n, c in config.slo_classes.items()}, ["m"])
    store.adopt(budgets)
    fb = Feedback(
        live,
        GatewayMetrics(),
        Reliability.from_config(config),
        room,
        budgets,
        clock=lambda: next(clock),
    )
    return fb, live, room


def test_an_outcome_with_provider_timings_teaches_the_server_side_latency() -> None:
    fb, live, _ = _feedback()
    fb.on_start("groq", {}, 24)
    assert live.backends["groq"].inflight == 1
    # Groq's own figures: TTFT = queue + prompt = 0.037 + 0.00068 = 0.03768 s (no network),
    # ITL = 0.463 s / 377 tokens. The gateway's measured 0.5 s / 2.0 s are not used.
    fb.on_end(
        AttemptOutcome(
            backend="groq",
            model="m",
            status="ok",
            ttft_s=0.5,
            total_s=2.0,
            prompt_tokens=24,
            completion_tokens=377,
            timings=UpstreamTimings(queue_s=0.037, prompt_s=0.00068, completion_s=0.463),
        )
    )
    groq = live.backends["groq"]
    assert groq.inflight == 0
    est = groq.latency["m"]
    assert est.ttft.mean == pytest.approx(0.03768)  # the first sample replaces the prior
    assert est.itl.mean == pytest.approx(0.463 / 377)
    assert est.ttft_fit.count == 1 and est.ttft_fit.mean_x == 24
    assert groq.queue_s["m"] == (0.037, 0.037)
    assert groq.sent_output.level > 0


def test_an_outcome_without_timings_teaches_the_measured_latency() -> None:
    fb, live, _ = _feedback()
    fb.on_start("groq", {}, 10)
    # Measured: first byte at 0.2 s, done at 1.2 s, 101 tokens: ITL = 1.0 / 100 = 0.01 s.
    fb.on_end(AttemptOutcome("groq", "m", "ok", 0.2, 1.2, 10, 101))
    est = live.backends["groq"].latency["m"]
    assert est.ttft.mean == pytest.approx(0.2) and est.itl.mean == pytest.approx(0.01)
    assert "m" not in live.backends["groq"].queue_s
    # No byte reached the client and no timings: nothing to learn, but it is no longer in flight.
    fb.on_start("groq", {}, 10)
    fb.on_end(AttemptOutcome("groq", "m", "upstream_error", None, 0.3, 10))
    assert live.backends["groq"].latency["m"] == est and live.backends["groq"].inflight == 0


async def test_a_local_outcome_wakes_requests_queued_for_local_room() -> None:
    fb, live, room = _feedback()
    room.waiting = 1  # one request queued for local headroom
    woken = asyncio.create_task(room.wait(5.0))
    await asyncio.sleep(0)
    fb.on_start("gpu", {}, 100)
    fb.on_end(AttemptOutcome("gpu", "m", "ok", 0.1, 0.5, 100, 41))
    await asyncio.wait_for(woken, 1.0)  # well before its 5 s timeout
    assert live.backends["gpu"].inflight == 0
