"""Latency estimators: exponentially weighted mean and spread of TTFT and inter-token latency.

Values are immutable; `update` returns a new estimate. The gateway keeps one per
(backend, model) and feeds it each finished request; Groq's server-side usage
timings give an ITL sample even for non-streamed requests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_ALPHA = 0.1


@dataclass(frozen=True, slots=True)
class Ewma:
    """Exponentially weighted mean and variance; `count` samples seen (0: prior only)."""

    mean: float
    var: float = 0.0
    count: int = 0

    @property
    def spread(self) -> float:
        """Standard deviation of the weighted samples."""
        return math.sqrt(self.var)

    def update(self, sample: float, alpha: float = DEFAULT_ALPHA) -> Ewma:
        """Fold one sample in; the first sample replaces the prior mean."""
        if not math.isfinite(sample) or sample < 0:
            return self
        if self.count == 0:
            return Ewma(sample, 0.0, 1)
        diff = sample - self.mean
        incr = alpha * diff
        return Ewma(self.mean + incr, (1.0 - alpha) * (self.var + diff * incr), self.count + 1)


@dataclass(frozen=True, slots=True)
class TtftFit:
    """TTFT as `intercept + slope * prompt_tokens`, by exponentially weighted least squares.

    A provider's TTFT grows with the prompt; one EWMA over mixed prompt sizes would mix
    that growth into its spread. `spread` is the EW deviation of the fit's residuals.
    """

    mean_x: float = 0.0
    mean_y: float = 0.0
    cov_xx: float = 0.0
    cov_xy: float = 0.0
    resid_var: float = 0.0
    count: int = 0

    @property
    def slope(self) -> float:
        """Seconds per prompt token (never negative: a longer prompt is never faster)."""
        if self.cov_xx <= 1e-9:
            return 0.0
        s = self.cov_xy / self.cov_xx
        return s if s > 0 else 0.0

    @property
    def intercept(self) -> float:
        """TTFT of an empty prompt."""
        v = self.mean_y - self.slope * self.mean_x
        return v if v > 0 else 0.0

    @property
    def spread(self) -> float:
        """Deviation of samples around the fit."""
        return math.sqrt(self.resid_var)

    def at(self, prompt_tokens: float) -> float:
        """Predicted TTFT for this prompt size."""
        return self.intercept + self.slope * prompt_tokens

    def update(self, prompt_tokens: float, ttft_s: float, alpha: float = DEFAULT_ALPHA) -> TtftFit:
        """Fold one (prompt size, TTFT) sample in."""
        if not math.isfinite(ttft_s) or ttft_s < 0 or prompt_tokens < 0:
            return self
        if self.count == 0:
            return TtftFit(prompt_tokens, ttft_s, 0.0, 0.0, 0.0, 1)
        resid = ttft_s - self.at(prompt_tokens)
        dx = prompt_tokens - self.mean_x
        dy = ttft_s - self.mean_y
        keep = 1.0 - alpha
        return TtftFit(
            self.mean_x + alpha * dx,
            self.mean_y + alpha * dy,
            keep * (self.cov_xx + alpha * dx * dx),
            keep * (self.cov_xy + alpha * dx * dy),
            keep * (self.resid_var + alpha * resid * resid),
            self.count + 1,
        )


# Below this many seconds a prediction's error is judged against this floor (a 2 ms
# prediction that takes 4 ms is not "100% off" in any way that matters to an SLO).
REL_FLOOR_S = 0.05
# The same floor for inter-token latency, whose predictions are milliseconds: judged
# against the 50 ms TTFT floor, a 5 ms ITL prediction that took 15 ms counted as an 18%
# error, and the margin built from it (18% x 5 ms) covered a tenth of the real shortfall.
ITL_REL_FLOOR_S = 0.002
# Half-life of a local worker's prediction-error variance while no sample arrives: an idle
# worker is trusted again within seconds (its std halves every two half-lives).
TRUST_HALF_LIFE_S = 5.0


@dataclass(frozen=True, slots=True)
class RelativeError:
    """How far a model's predictions fell short, relative to their size, fading with time.

    Each sample's shortfall `max(0, measured - predicted) / (predicted + floor_s)` is
    folded into an exponentially weighted mean square; `spread(now)` is its root, decayed
    by TRUST_HALF_LIFE_S since the last sample. Only shortfalls count: a request that came
    back faster than predicted never makes the worker look riskier. A margin built from
    it scales with the prediction it guards (a 60k-token prompt's error does not follow a
    10-token prompt), and an idle worker's margin falls back to the model's own prediction.
    """

    var: float = 0.0
    at: float = 0.0
    count: int = 0

    def update(
        self,
        predicted_s: float,
        measured_s: float,
        now: float,
        alpha: float = DEFAULT_ALPHA,
        floor_s: float = REL_FLOOR_S,
    ) -> RelativeError:
        """Fold one (predicted, measured) pair in at time `now`; the margin that reads it
        back must scale by the same `predicted + floor_s`."""
        if not (math.isfinite(predicted_s) and math.isfinite(measured_s)) or predicted_s < 0:
            return self
        short = measured_s - predicted_s
        e = short / (predicted_s + floor_s) if short > 0 else 0.0
        if self.count == 0:
            return RelativeError(e * e, now, 1)
        var = self.decayed_var(now)
        return RelativeError((1.0 - alpha) * var + alpha * e * e, now, self.count + 1)

    def decayed_var(self, now: float) -> float:
        """The variance as of `now`: halved every TRUST_HALF_LIFE_S without a sample."""
        age = now - self.at
        if age <= 0 or self.var == 0.0:
            return self.var
        return self.var * math.exp(-math.log(2.0) * age / TRUST_HALF_LIFE_S)

    def spread(self, now: float) -> float:
        """Relative standard error as of `now`."""
        return math.sqrt(self.decayed_var(now))


@dataclass(frozen=True, slots=True)
class LatencySample:
    """One finished request's latencies; None where it could not be measured."""

    ttft_s: float | None = None
    itl_s: float | None = None
    # Prompt size of the request, for the prompt-aware TTFT fit.
    prompt_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class LatencyEstimate:
    """TTFT and ITL estimates of one backend for one model.

    `ttft_fit` learns from samples that carry their prompt size; once it has a few, use
    `ttft_fit.intercept`, `.slope` and `.spread` for the snapshot instead of `ttft`.
    """

    ttft: Ewma
    itl: Ewma
    ttft_fit: TtftFit = TtftFit()

    @classmethod
    def prior(cls, ttft_s: float, itl_s: float) -> LatencyEstimate:
        """A starting guess (from config) that the first real sample replaces."""
        return cls(Ewma(ttft_s), Ewma(itl_s))


def update(
    est: LatencyEstimate, sample: LatencySample, alpha: float = DEFAULT_ALPHA
) -> LatencyEstimate:
    """The estimate after one more sample."""
    ttft = est.ttft if sample.ttft_s is None else est.ttft.update(sample.ttft_s, alpha)
    itl = est.itl if sample.itl_s is None else est.itl.update(sample.itl_s, alpha)
    fit = est.ttft_fit
    if sample.ttft_s is not None and sample.prompt_tokens is not None:
        fit = fit.update(sample.prompt_tokens, sample.ttft_s, alpha)
    if ttft is est.ttft and itl is est.itl and fit is est.ttft_fit:
        return est
    return LatencyEstimate(ttft, itl, fit)


def sample_from_timings(
    ttft_s: float | None, total_s: float | None, completion_tokens: int
) -> LatencySample:
    """A sample from what the gateway measured: ITL is the mean gap after the first token."""
    itl = None
    if ttft_s is not None and total_s is not None and completion_tokens > 1 and total_s >= ttft_s:
        itl = (total_s - ttft_s) / (completion_tokens - 1)
    return LatencySample(ttft_s, itl)


def _seconds(usage: Mapping[str, object], key: str) -> float | None:
    v = usage.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return _usable(float(v))


def _usable(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) and v >= 0 else None


def sample_from_groq_usage(
    usage: Mapping[str, object], completion_tokens: int | None = None
) -> LatencySample | None:
    """A server-side sample from Groq usage timings (`queue_time`, `prompt_time`, `completion_time`).

    Pass the `usage` object (for streams: the final chunk's `x_groq.usage`); see
    `sample_from_server_timings`. None when the timings are absent.
    """
    if completion_tokens is None:
        ct = usage.get("completion_tokens")
        completion_tokens = ct if isinstance(ct, int) and not isinstance(ct, bool) else None
    return sample_from_server_timings(
        _seconds(usage, "queue_time"),
        _seconds(usage, "prompt_time"),
        _seconds(usage, "completion_time"),
        completion_tokens,
    )


def sample_from_server_timings(
    queue_s: float | None,
    prompt_s: float | None,
    completion_s: float | None,
    completion_tokens: int | None,
) -> LatencySample | None:
    """A server-side sample from a provider's own timings, in seconds (None: not reported).

    TTFT is queue + prompt time (no network); ITL is completion time per output token.
    A negative or non-finite time counts as not reported. None when neither can be had.
    """
    queue, prompt, completion = _usable(queue_s), _usable(prompt_s), _usable(completion_s)
    ttft = None if prompt is None else prompt + (queue or 0.0)
    itl = None
    if completion is not None and completion_tokens is not None and completion_tokens > 0:
        itl = completion / completion_tokens
    if ttft is None and itl is None:
        return None
    return LatencySample(ttft, itl)


@dataclass(frozen=True, slots=True)
class DecayingRate:
    """A rate (units per second) that forgets exponentially with time constant `tau_s`.

    Used for the prompt tokens per second the gateway sends a local worker: `add` on each
    dispatch, `value` when building a snapshot.
    """

    tau_s: float = 10.0
    level: float = 0.0
    at: float = 0.0

    def value(self, now: float) -> float:
        """The rate as of `now`."""
        if self.level == 0.0 or now <= self.at:
            return self.level
        return self.level * math.exp((self.at - now) / self.tau_s)

    def add(self, amount: float, now: float) -> DecayingRate:
        """The rate after `amount` units arrived at `now`."""
        # `value(now)` inline: three of these run on every request.
        level, at, tau = self.level, self.at, self.tau_s
        if level != 0.0 and not now <= at:
            level *= math.exp((at - now) / tau)
        return DecayingRate(tau, level + amount / tau, at if at > now else now)
