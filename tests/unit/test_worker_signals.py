"""Queue time, preemption pressure and provider queueing sharpen the predictions (policies.worker_signals)."""

from __future__ import annotations

import pytest

from policies.costmodel import GpuModel
from policies.predict import predict
from policies.spec import GpuSpec
from policies.types import BackendSnapshot, RouteRequest, Slo
from policies.worker_signals import (
    pressured_load,
    provider_ttft,
    ttft_with_queue,
    under_pressure,
)

GPU = GpuModel.from_spec(GpuSpec(price_per_hour=3.5, mode="reserved"))
SLO = Slo(max_ttft_s=2.0, max_itl_s=0.01)


def req(prompt: int = 512) -> RouteRequest:
    return RouteRequest("m", prompt, 256, 128, True, "interactive", SLO)


def local(**kw: object) -> BackendSnapshot:
    base: dict[str, object] = {
        "name": "gpu",
        "backend_model": "m",
        "is_local": True,
        "gpu": GPU,
        "metrics_fresh": True,
        "running": 4,
    }
    base.update(kw)
    return BackendSnapshot(**base)  # type: ignore[arg-type]


def test_a_preempting_worker_is_predicted_at_b_star() -> None:
    b_star = GPU.slo_batch(SLO.max_itl_s, 0.0, 512 + 128 / 2)
    assert 1 < b_star < GPU.max_batch
    calm = predict(req(), local(), 0.0, 0.0)
    pressed = predict(req(), local(preempting=True), 0.0, 0.0)
    assert calm.predicted_batch == 5
    assert pressed.predicted_batch == b_star  # one short of b*, plus this request
    assert pressed.predicted_itl_s > calm.predicted_itl_s
    assert pressed.slo_batch == b_star
    assert pressured_load(40, b_star, True) == max(40, b_star - 1)
    assert pressured_load(40, b_star, False) == 40
    # A stale scrape says nothing about pressure now.
    assert predict(req(), local(preempting=True, metrics_fresh=False), 0.0, 0.0).predicted_batch < 5


def test_under_pressure() -> None:
    assert under_pressure(0.5, 0) and under_pressure(None, 2)
    assert not under_pressure(0.0, 0) and not under_pressure(None, None)


def test_measured_queue_time_floors_the_ttft_while_requests_wait() -> None:
    base = predict(req(), local(queued=3), 0.0, 0.0)
    waited = predict(req(), local(queued=3, queue_wait_s=4.0), 0.0, 0.0)
    assert waited.predicted_ttft_s == pytest.approx(4.0 + GPU.prefill_time_s(512))
    assert waited.predicted_ttft_s > base.predicted_ttft_s and not waited.meets_slo
    # Nothing waiting now: the past queue time does not apply.
    idle = predict(req(), local(queued=0, queue_wait_s=4.0), 0.0, 0.0)
    assert idle.predicted_ttft_s == predict(req(), local(queued=0), 0.0, 0.0).predicted_ttft_s
    assert ttft_with_queue(1.0, 0.1, 2, 0.05) == 1.0


def test_provider_ttft_follows_its_recent_queue() -> None:
    assert provider_ttft(0.30, 0.05, 0.45) == pytest.approx(0.70)
    assert provider_ttft(0.30, 0.20, 0.0) == pytest.approx(0.10)
    assert provider_ttft(0.30, None, 0.4) == 0.30
