"""EWMA latency estimates with spread, and samples from gateway timings and Groq usage."""

from __future__ import annotations

import math

import pytest

from policies.latency import (
    DecayingRate,
    Ewma,
    LatencyEstimate,
    LatencySample,
    TtftFit,
    sample_from_groq_usage,
    sample_from_server_timings,
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


def test_sample_from_server_timings() -> None:
    # Groq's figures as parsed numbers: TTFT = 0.037 + 0.00068, ITL = 0.463 / 377.
    s = sample_from_server_timings(0.037, 0.000680, 0.463, 377)
    assert s is not None
    assert s.ttft_s == pytest.approx(0.03768)
    assert s.itl_s == pytest.approx(0.463 / 377)
    assert sample_from_server_timings(None, 0.5, None, 0) == LatencySample(0.5, None)
    assert sample_from_server_timings(None, None, 1.0, 100) == LatencySample(None, 0.01)
    # A negative or infinite time is not a measurement; no tokens give no ITL.
    assert sample_from_server_timings(-1.0, 0.25, None, 10) == LatencySample(0.25, None)
    assert sample_from_server_timings(None, float("inf"), -0.1, 10) is None
    assert sample_from_server_timings(None, None, 1.0, 0) is None
    assert sample_from_server_timings(None, None, None, 5) is None


def test_ttft_fit_learns_intercept_and_slope() -> None:
    fit = TtftFit()
    for i in range(300):
        prompt = (i * 7919) % 20_000
        fit = fit.update(prompt, 0.2 + prompt / 40_000, alpha=0.05)
    assert fit.intercept == pytest.approx(0.2, abs=1e-3)
    assert fit.slope == pytest.approx(1 / 40_000, rel=1e-3)
    assert fit.spread == pytest.approx(0.0, abs=1e-3)
    assert fit.at(10_000) == pytest.approx(0.45, abs=1e-3)
    # A prompt-blind EWMA over the same samples would carry the prompt spread as jitter.
    blind = Ewma(0.0)
    for i in range(300):
        blind = blind.update(0.2 + ((i * 7919) % 20_000) / 40_000, alpha=0.05)
    assert blind.spread > 0.1


def test_ttft_fit_is_fed_through_update_and_never_slopes_down() -> None:
    est = LatencyEstimate.prior(0.3, 0.01)
    est = update(est, LatencySample(0.5, 0.01, prompt_tokens=100))
    est = update(est, LatencySample(0.3, 0.01, prompt_tokens=5000))
    assert est.ttft_fit.count == 2 and est.ttft_fit.slope == 0.0
    assert update(est, LatencySample(0.3, None)).ttft_fit is est.ttft_fit


def test_decaying_rate() -> None:
    r = DecayingRate(tau_s=10.0)
    r = r.add(1000, now=0.0)
    assert r.value(0.0) == pytest.approx(100.0)
    assert r.value(10.0) == pytest.approx(100.0 / math.e)
    # A steady 2000 tokens/s converges to 2000.
    steady = DecayingRate(tau_s=5.0)
    for i in range(1, 400):
        steady = steady.add(200, now=i * 0.1)
    assert steady.value(39.9) == pytest.approx(2000, rel=0.05)


def test_relative_error_counts_shortfalls_relative_to_the_prediction() -> None:
    from policies.latency import RelativeError

    # Predicted 1.0 s, took 1.5 s: 0.5 / (1.0 + 0.05) = 0.47619 short.
    e = RelativeError().update(1.0, 1.5, now=100.0, alpha=0.2)
    assert e.spread(100.0) == pytest.approx(0.5 / 1.05)
    # Faster than predicted is no risk: a zero sample. Five seconds later the variance
    # has halved: 0.8 x (0.226757 / 2) + 0.2 x 0 = 0.090703.
    e2 = e.update(1.0, 0.2, now=105.0, alpha=0.2)
    assert e2.var == pytest.approx(0.8 * (0.5 / 1.05) ** 2 / 2)
    # A 60k-token prompt predicted at 3.0 s that took 6.0 s: 3 / 3.05 = 0.9836 short ...
    big = RelativeError().update(3.0, 6.0, now=0.0)
    assert big.spread(0.0) == pytest.approx(3.0 / 3.05)


def test_relative_error_fades_while_no_sample_comes() -> None:
    from policies.latency import TRUST_HALF_LIFE_S, RelativeError

    e = RelativeError().update(3.0, 6.0, now=0.0)
    # The variance halves every half-life, so the spread halves every two.
    assert e.spread(2 * TRUST_HALF_LIFE_S) == pytest.approx(e.spread(0.0) / 2)
    assert e.spread(6 * TRUST_HALF_LIFE_S) == pytest.approx(e.spread(0.0) / 8)
