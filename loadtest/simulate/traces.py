"""Request traces for the policy simulator: built-in generators and a JSON-lines file format.

A trace is open-loop: arrival times and token counts are fixed, so every policy
serves exactly the same requests. Concurrency in the built-in traces is *offered*
concurrency: arrival rate x a reference service time (a local H100 at moderate
batch, `REFERENCE_SERVICE_S`); what each policy then sees depends on its backends.

File format (one JSON object per line; a first line may carry {"duration_s": ...}):

    {"t": 0.12, "prompt_tokens": 812, "output_tokens": 140, "max_tokens": 1024,
     "slo_class": "interactive"}
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

# Mean seconds one request of the mix below takes on a local H100 at moderate batch:
# ~1600 prompt tokens at 20k tokens/s plus ~300 output tokens at ~5.5 ms.
REFERENCE_SERVICE_S = 1.8


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request: arrival time (s), real token counts, the client's max_tokens, SLO class."""

    t: float
    prompt_tokens: int
    output_tokens: int
    max_tokens: int
    slo_class: str
    tenant: str = ""


@dataclass(frozen=True, slots=True)
class Trace:
    """A named, time-ordered list of requests over `duration_s` seconds."""

    name: str
    duration_s: float
    requests: tuple[TraceRequest, ...]


@dataclass(frozen=True, slots=True)
class Mix:
    """One kind of request in a trace: its share, token-count distributions and class."""

    share: float
    prompt_median: float
    prompt_sigma: float
    prompt_range: tuple[int, int]
    output_median: float
    output_sigma: float
    output_range: tuple[int, int]
    max_tokens: int
    slo_class: str = ""
    tenant: str = ""


# Chat turns with system prompt and history; document jobs with long inputs.
DEFAULT_MIX = (
    Mix(0.85, 700, 0.9, (16, 12_000), 180, 0.8, (4, 1024), 1024, "interactive"),
    Mix(0.15, 3500, 0.7, (256, 24_000), 400, 0.6, (16, 2048), 2048, "batch"),
)


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return min(max(round(median * math.exp(sigma * rng.gauss(0.0, 1.0))), lo), hi)


def _draw(rng: random.Random, t: float, mix: tuple[Mix, ...]) -> TraceRequest:
    u = rng.random() * sum(m.share for m in mix)
    m = mix[-1]
    for cand in mix:
        if u < cand.share:
            m = cand
            break
        u -= cand.share
    return TraceRequest(
        t=t,
        prompt_tokens=_lognormal_int(rng, m.prompt_median, m.prompt_sigma, *m.prompt_range),
        output_tokens=_lognormal_int(rng, m.output_median, m.output_sigma, *m.output_range),
        max_tokens=m.max_tokens,
        slo_class=m.slo_class,
        tenant=m.tenant,
    )


def _poisson(
    name: str,
    seed: int,
    duration_s: float,
    concurrency: Callable[[float], float],
    peak: float,
    mix: tuple[Mix, ...] = DEFAULT_MIX,
) -> Trace:
    """Non-homogeneous Poisson arrivals by thinning, rate = concurrency(t) / reference service."""
    rng = random.Random(seed)
    lam_max = peak / REFERENCE_SERVICE_S
    t = 0.0
    out: list[TraceRequest] = []
    while True:
        t += rng.expovariate(lam_max)
        if t >= duration_s:
            break
        if rng.random() * peak <= concurrency(t):
            out.append(_draw(rng, t, mix))
    return Trace(name, duration_s, tuple(out))


def bursty(seed: int = 1, duration: float = 1200.0, mix: tuple[Mix, ...] = DEFAULT_MIX) -> Trace:
    """Offered concurrency swings ~1 -> ~32 -> ~1 every ~150 s for 20 minutes.

    Each cycle: a quiet spell at ~1, a 15 s ramp, a plateau at 28-36, a 15 s ramp down;
    spell lengths vary by cycle. 85% interactive chat, 15% batch document jobs.
    """
    shape = random.Random(seed * 7919 + 1)
    cycles: list[tuple[float, float, float, float]] = []
    start = 0.0
    while start < duration:
        quiet = shape.uniform(35.0, 60.0)
        high = shape.uniform(35.0, 55.0)
        peak = shape.uniform(28.0, 36.0)
        cycles.append((start, quiet, high, peak))
        start += quiet + 15.0 + high + 15.0

    def concurrency(t: float) -> float:
        for s, quiet, high, peak in cycles:
            x = t - s
            end = quiet + 30.0 + high
            if 0 <= x < end:
                if x < quiet:
                    return 1.0
                if x < quiet + 15.0:
                    return 1.0 + (peak - 1.0) * (x - quiet) / 15.0
                if x < quiet + 15.0 + high:
                    return peak
                return peak - (peak - 1.0) * (x - quiet - 15.0 - high) / 15.0
        return 1.0

    return _poisson("bursty", seed, duration, concurrency, 36.0, mix)


def steady(
    seed: int = 1,
    duration: float = 600.0,
    mix: tuple[Mix, ...] = DEFAULT_MIX,
    concurrency: float = 16.0,
    name: str = "steady",
) -> Trace:
    """A constant offered concurrency (~16 by default) for 10 minutes, same request mix."""
    return _poisson(name, seed, duration, lambda _t: concurrency, concurrency, mix)


def diurnal(
    seed: int = 1,
    duration: float = 3600.0,
    mix: tuple[Mix, ...] = DEFAULT_MIX,
    low: float = 1.0,
    high: float = 40.0,
) -> Trace:
    """A day compressed into `duration`: night at `low` until 06:00, a morning ramp to a
    midday peak at `high`, an afternoon dip to ~70%, down to night again by 20:24."""

    def concurrency(t: float) -> float:
        x = t / duration  # 0 = midnight
        day = max(0.0, math.sin(math.pi * (x - 0.25) / 0.6)) if 0.25 <= x <= 0.85 else 0.0
        dip = 0.3 * math.exp(-(((x - 0.6) / 0.05) ** 2))
        return low + (high - low) * day * (1.0 - dip)

    return _poisson("diurnal", seed, duration, concurrency, high, mix)


BUILTIN: Mapping[str, Callable[[int], Trace]] = MappingProxyType(
    {"bursty": bursty, "steady": steady}
)


def offered_concurrency(trace: Trace, bucket_s: float = 10.0) -> list[tuple[float, float]]:
    """(bucket start, arrivals per second x reference service time) for plotting."""
    n = max(1, math.ceil(trace.duration_s / bucket_s))
    counts = [0] * n
    for r in trace.requests:
        counts[min(int(r.t // bucket_s), n - 1)] += 1
    return [(i * bucket_s, c / bucket_s * REFERENCE_SERVICE_S) for i, c in enumerate(counts)]


def load_trace(path: Path) -> Trace:
    """Read a JSON-lines trace file; raises ValueError naming the bad line."""
    requests: list[TraceRequest] = []
    duration = 0.0
    with path.open(encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if "duration_s" in obj and "t" not in obj:
                    duration = float(obj["duration_s"])
                    continue
                requests.append(
                    TraceRequest(
                        t=float(obj["t"]),
                        prompt_tokens=int(obj["prompt_tokens"]),
                        output_tokens=max(1, int(obj["output_tokens"])),
                        max_tokens=int(obj.get("max_tokens", obj["output_tokens"])),
                        slo_class=str(obj.get("slo_class", "interactive")),
                        tenant=str(obj.get("tenant", "")),
                    )
                )
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{no}: {e}") from None
    requests.sort(key=lambda r: r.t)
    if not requests:
        raise ValueError(f"{path}: no requests")
    return Trace(path.stem, max(duration, requests[-1].t), tuple(requests))


def dump_trace(trace: Trace) -> Iterable[str]:
    """The JSON lines of a trace (header first), e.g. to save a built-in one and edit it."""
    yield json.dumps({"duration_s": trace.duration_s})
    for r in trace.requests:
        obj: dict[str, object] = {
            "t": round(r.t, 4),
            "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens,
            "max_tokens": r.max_tokens,
            "slo_class": r.slo_class,
        }
        if r.tenant:
            obj["tenant"] = r.tenant
        yield json.dumps(obj)
