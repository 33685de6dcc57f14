"""The hindsight bound's external side: what a provider can charge a request within its SLO,
and how much a TPM-limited provider can admit per stretch of time.

Provider latency in the simulator is deterministic per request (`request_noise` draws it up
front from the seed), so the bound knows exactly whether a provider answers a request within
its SLO if dispatched at time d: its TTFT from arrival is `d - arrival + ttft`, its mean ITL
the provider's ITL for that request, its total `d - arrival + total`. So each (request,
provider) pair has a latest dispatch time (`ExternalOption.latest_s`), or none at all (a
provider too slow for it). A router may dispatch anywhere in [arrival, latest] (a batch
request may wait), so the bound charges the lowest list price in force over that window.

A TPM limit is the simulator's token bucket: `tpm_limit` tokens, refilled at `tpm_limit / 60`
per second, full at t = 0, each request taking prompt + max_tokens; the relaxation follows
its level on a grid of cells (`bound_lp`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loadtest.simulate.backends import ProviderSpec
from loadtest.simulate.scenario import Scenario
from loadtest.simulate.traces import TraceRequest
from policies.types import Slo


@dataclass(frozen=True, slots=True)
class ExternalOption:
    """One provider that can serve a request within its SLO."""

    provider: str
    usd: float  # the least its list prices in force over the dispatch window charge
    latest_s: float  # the latest dispatch time that still meets the SLO


def latest_dispatch(p: ProviderSpec, tr: TraceRequest, slo: Slo, z: tuple[float, float]) -> float:
    """Latest dispatch time at which `p` meets the request's SLO (-inf: never), as
    `SimProvider.attempt` times it."""
    ttft = (p.ttft_median_s + tr.prompt_tokens / p.prefill_tokens_per_s) * math.exp(
        p.ttft_sigma * z[0]
    )
    itl = p.itl_median_s * math.exp(p.itl_sigma * z[1])
    total = ttft + max(tr.output_tokens - 1, 0) * itl
    if slo.max_itl_s is not None and tr.output_tokens > 1 and itl > slo.max_itl_s:
        return -math.inf
    latest = math.inf
    if slo.max_ttft_s is not None:
        latest = min(latest, tr.t + slo.max_ttft_s - ttft)
    if slo.max_total_s is not None:
        latest = min(latest, tr.t + slo.max_total_s - total)
    return latest if latest >= tr.t else -math.inf


def prices_in_window(sc: Scenario, name: str, t0: float, t1: float) -> list[tuple[float, float]]:
    """Every (input, output) USD per million tokens `name` charges at some time in [t0, t1]."""
    spec = next(p for p in sc.providers if p.name == name)
    current = (spec.input_per_million, spec.output_per_million)
    out = []
    for ch in sorted(sc.price_changes, key=lambda c: c.at_s):
        if ch.backend != name:
            continue
        if ch.at_s <= t0:
            current = (ch.input_per_million, ch.output_per_million)
        elif ch.at_s <= t1:
            out.append((ch.input_per_million, ch.output_per_million))
    return [current, *out]


def external_options(
    sc: Scenario, tr: TraceRequest, slo: Slo, z: tuple[float, float]
) -> tuple[ExternalOption, ...]:
    """The providers that can serve `tr` within its SLO, each at its least price in force
    over the dispatch window."""
    out = []
    for p in sc.providers:
        latest = latest_dispatch(p, tr, slo, z)
        if latest == -math.inf:
            continue
        prices = prices_in_window(sc, p.name, tr.t, latest)
        usd = min((pi * tr.prompt_tokens + po * tr.output_tokens) / 1e6 for pi, po in prices)
        out.append(ExternalOption(p.name, usd, latest))
    return tuple(out)
