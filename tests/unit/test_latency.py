"""EWMA latency estimates with spread, and samples from gateway timings and Groq usage."""

from __future__ import annotations

import math

import pytest

from policies.latency import (
    Ewma,
    LatencyEstimate,
    LatencySample,
    sample_from_groq_usage,
    sample_from_timings,
    update,
)


def test_first_sample_replaces_the_prior_then_ewma() -> None:
    e = Ewma(0.5)
    e1 = e.update(0.2, alpha=0.5)
    assert (e1.mean, e1.var, e1.count) == (0.2, 0.0, 1)
    e2 = e1.update(0.4, alpha=0.5)
    assert e2.mean == pytest.approx(0.3)
    # EW variance: (1 - a) * (var + diff * a * diff) = 0.5 * (0 + 0.2 * 0.1)
    assert e2.var == pytest.approx(0.01)
    assert e2.spread == pytest.approx(0.1)


def test_ewma_converges_and_spread_tracks_jitter() -> None:
    steady = Ewma(1.0)
    jittery = Ewma(1.0)
    for i in range(400):
        steady = steady.update(0.3, alpha=0.1)
        jittery = jittery.update(0.2 if i % 2 else 0.4, alpha=0.1)
    assert steady.mean == pytest.approx(0.3) and steady.spread == pytest.approx(0.0, abs=1e-9)
    assert jittery.mean == pytest.approx(0.3, abs=0.02)
    assert 0.08 < jittery.spread < 0.12


def test_bad_samples_are_ignored() -> None:
    e = Ewma(0.3, 0.01, 5)
    assert e.update(math.nan) is e and e.update(-1.0) is e and e.update(math.inf) is e


def test_update_estimate_with_partial_samples() -> None:
    est = LatencyEstimate.prior(0.5, 0.02)
    a = update(est, LatencySample(ttft_s=0.3), alpha=0.2)
    assert a.ttft.mean == 0.3 and a.itl == est.itl
    b = update(a, LatencySample(itl_s=0.01), alpha=0.2)
    assert b.itl.mean == 0.01 and b.ttft == a.ttft
    assert update(b, LatencySample()) is b


def test_sample_from_gateway_timings() -> None:
    s = sample_from_timings(0.2, 1.2, completion_tokens=101)
    assert s.ttft_s == 0.2 and s.itl_s == pytest.approx(0.01)
    assert sample_from_timings(0.2, 0.2, completion_tokens=1).itl_s is None
    assert sample_from_timings(None, 1.0, completion_tokens=10) == LatencySample(None, None)


def test_sample_from_groq_usage() -> None:
    usage = {
        "prompt_tokens": 24,
        "completion_tokens": 377,
        "total_tokens": 401,
        "queue_time": 0.037,
        "prompt_time": 0.000680,
        "completion_time": 0.463,
        "total_time": 0.464,
    }
    s = sample_from_groq_usage(usage)
    assert s is not None
    assert s.ttft_s == pytest.approx(0.03768)
    assert s.itl_s == pytest.approx(0.463 / 377)
    assert sample_from_groq_usage({"prompt_tokens": 3, "completion_tokens": 4}) is None
    only_completion = sample_from_groq_usage({"completion_time": 1.0}, completion_tokens=100)
    assert only_completion == LatencySample(None, 0.01)
    assert sample_from_groq_usage({"prompt_time": "fast", "completion_time": True}) is None
