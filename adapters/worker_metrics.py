"""vLLM / SGLang Prometheus `/metrics` text -> a frozen `WorkerMetrics` value (pure parsing).

Series of the same metric (per model, per data-parallel engine) are summed, except
KV-cache use, where the fullest engine counts. The scraper (gateway) fetches the text
and passes the clock reading; this module does no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Flavor = Literal["vllm", "sglang"]

_RUNNING = {"vllm:num_requests_running": "vllm", "sglang:num_running_reqs": "sglang"}
_WAITING = {"vllm:num_requests_waiting": "vllm", "sglang:num_queue_reqs": "sglang"}
# Newer vLLM says kv_cache_usage_perc, older gpu_cache_usage_perc; both are 0..1 fractions.
_KV = {
    "vllm:kv_cache_usage_perc": "vllm",
    "vllm:gpu_cache_usage_perc": "vllm",
    "sglang:token_usage": "sglang",
}
_GEN = {"vllm:generation_tokens_total": "vllm", "sglang:generation_tokens_total": "sglang"}
_TTFT = ("vllm:time_to_first_token_seconds", "sglang:time_to_first_token_seconds")
_ITL = (
    "vllm:inter_token_latency_seconds",
    "vllm:time_per_output_token_seconds",
    "sglang:inter_token_latency_seconds",
    "sglang:time_per_output_token_seconds",
)
_TTFT_SUM = tuple(n + "_sum" for n in _TTFT)
_TTFT_COUNT = tuple(n + "_count" for n in _TTFT)
_ITL_SUM = tuple(n + "_sum" for n in _ITL)
_ITL_COUNT = tuple(n + "_count" for n in _ITL)
_WANTED = frozenset(
    [*_RUNNING, *_WAITING, *_KV, *_GEN, *_TTFT_SUM, *_TTFT_COUNT, *_ITL_SUM, *_ITL_COUNT]
)


class MetricsParseError(ValueError):
    """The text holds none of the signals routing needs: judge the worker as if unscraped."""


@dataclass(frozen=True, slots=True)
class WorkerMetrics:
    """One scrape of a local worker."""

    running: int
    waiting: int
    kv_usage: float | None
    generation_tokens_total: float | None
    scraped_at: float
    flavor: Flavor
    # Histogram sums and counts, for a windowed mean between two scrapes.
    ttft_seconds_sum: float | None = None
    ttft_seconds_count: float | None = None
    itl_seconds_sum: float | None = None
    itl_seconds_count: float | None = None

    def is_fresh(self, now: float, max_age_s: float) -> bool:
        """True if scraped no longer than `max_age_s` before `now`."""
        return 0.0 <= now - self.scraped_at <= max_age_s


def _split_sample(line: str) -> tuple[str, float] | None:
    """(metric name, value) of one exposition line; labels are skipped, quotes respected."""
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        name = line[:brace]
        i = brace + 1
        in_quote = False
        n = len(line)
        while i < n:
            ch = line[i]
            if in_quote:
                if ch == "\\":
                    i += 1
                elif ch == '"':
                    in_quote = False
            elif ch == '"':
                in_quote = True
            elif ch == "}":
                break
            i += 1
        else:
            return None
        rest = line[i + 1 :].split()
    else:
        if space == -1:
            return None
        name = line[:space]
        rest = line[space:].split()
    if not rest:
        return None
    try:
        value = float(rest[0])
    except ValueError:
        return None
    return name, value


def parse_worker_metrics(text: str, scraped_at: float) -> WorkerMetrics:
    """Parse a `/metrics` body from vLLM or SGLang.

    Raises MetricsParseError if neither the running nor the waiting count is present.
    """
    sums: dict[str, float] = {}
    kv: float | None = None
    flavor: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] == "#" or not line.startswith(("vllm:", "sglang:")):
            continue
        parsed = _split_sample(line)
        if parsed is None:
            continue
        name, value = parsed
        if name not in _WANTED or math.isnan(value):
            continue
        if name in _KV:
            # Some versions report percent (0..100); routing wants a fraction.
            frac = value / 100.0 if value > 1.0 else value
            kv = frac if kv is None or frac > kv else kv
        else:
            sums[name] = sums.get(name, 0.0) + value
        if name in _RUNNING or name in _WAITING:
            flavor = _RUNNING.get(name) or _WAITING[name]

    running = _first(sums, _RUNNING)
    waiting = _first(sums, _WAITING)
    if flavor is None or (running is None and waiting is None):
        raise MetricsParseError("no vLLM or SGLang request gauges in the metrics text")
    return WorkerMetrics(
        running=int(running or 0),
        waiting=int(waiting or 0),
        kv_usage=kv,
        generation_tokens_total=_first(sums, _GEN),
        scraped_at=scraped_at,
        flavor="vllm" if flavor == "vllm" else "sglang",
        ttft_seconds_sum=_first(sums, _TTFT_SUM),
        ttft_seconds_count=_first(sums, _TTFT_COUNT),
        itl_seconds_sum=_first(sums, _ITL_SUM),
        itl_seconds_count=_first(sums, _ITL_COUNT),
    )


def _first(sums: dict[str, float], names: Iterable[str]) -> float | None:
    """The summed value of the first of `names` present (names are in order of preference)."""
    for n in names:
        if n in sums:
            return sums[n]
    return None


def generation_rate(previous: WorkerMetrics, current: WorkerMetrics) -> float | None:
    """Output tokens/s between two scrapes; None across a counter reset or without the counter."""
    a, b = previous.generation_tokens_total, current.generation_tokens_total
    dt = current.scraped_at - previous.scraped_at
    if a is None or b is None or dt <= 0 or b < a:
        return None
    return (b - a) / dt


def window_mean(
    sum_a: float | None, count_a: float | None, sum_b: float | None, count_b: float | None
) -> float | None:
    """Mean of a histogram's observations between two scrapes (e.g. TTFT); None if none."""
    if sum_a is None or count_a is None or sum_b is None or count_b is None:
        return None
    dc = count_b - count_a
    ds = sum_b - sum_a
    if dc <= 0 or ds < 0:
        return None
    return ds / dc
