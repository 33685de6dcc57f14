"""vLLM / SGLang Prometheus `/metrics` text -> a frozen `WorkerMetrics` value (pure parsing).

How series combine is the metrics-label part of the workers' dialects:
- series of one metric per model or per data-parallel engine (vLLM `engine`, SGLang
  `dp_rank`) are summed: they are different batches;
- SGLang's tensor/pipeline-parallel ranks (`tp_rank`, `pp_rank`; every rank exports with
  `--enable-metrics-for-all-schedulers`) are one batch seen by each rank: the **max**
  across ranks is taken, not the sum (which multiplied load by the TP size) and not rank
  0 alone: the ranks report the same numbers, a rank scraped a moment later may lag its
  peers by a step, and the max never under-counts load nor depends on rank 0 being in
  the scrape;
- SGLang's per-priority buckets come with an aggregate (`priority=""`): the aggregate is
  used, the buckets are not added to it;
- KV-cache use is the fullest engine's.
The scraper (gateway) fetches the text and passes the clock reading; this module does no I/O.
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
# Time requests spent queued in the worker before their prefill started.
_QUEUE = ("vllm:request_queue_time_seconds", "sglang:queue_time_seconds")
_PREEMPT = ("vllm:num_preemptions_total", "vllm:num_preemptions")
# Prefix-cache counters in tokens (vLLM V1; the gpu_ names are the deprecated ones).
_PC_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
_PC_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
_HIT_RATE = ("sglang:cache_hit_rate",)
_USED_TOKENS = ("sglang:num_used_tokens",)
_WAITING_BY_REASON = "vllm:num_requests_waiting_by_reason"
# Time constant over which a burst of preemptions stops counting as memory pressure.
PREEMPTION_MEMORY_S = 10.0
_TTFT_SUM = tuple(n + "_sum" for n in _TTFT)
_TTFT_COUNT = tuple(n + "_count" for n in _TTFT)
_ITL_SUM = tuple(n + "_sum" for n in _ITL)
_ITL_COUNT = tuple(n + "_count" for n in _ITL)
_QUEUE_SUM = tuple(n + "_sum" for n in _QUEUE)
_QUEUE_COUNT = tuple(n + "_count" for n in _QUEUE)
_WANTED = frozenset(
    [
        *_RUNNING,
        *_WAITING,
        *_KV,
        *_GEN,
        *_TTFT_SUM,
        *_TTFT_COUNT,
        *_ITL_SUM,
        *_ITL_COUNT,
        *_QUEUE_SUM,
        *_QUEUE_COUNT,
        *_PREEMPT,
        *_PC_QUERIES,
        *_PC_HITS,
        *_HIT_RATE,
        *_USED_TOKENS,
        _WAITING_BY_REASON,
    ]
)
# Labels of ranks that serve one batch together: their series are copies, not parts.
_RANK_LABELS = frozenset({"tp_rank", "pp_rank"})

Labels = tuple[tuple[str, str], ...]


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
    queue_seconds_sum: float | None = None
    queue_seconds_count: float | None = None
    # Counters: preemptions (vLLM) and prefix-cache queried / hit tokens (vLLM).
    preemptions_total: float | None = None
    prefix_cache_queries_total: float | None = None
    prefix_cache_hits_total: float | None = None
    # Gauges: SGLang's own cache hit rate (0..1) and tokens held in its KV pool; vLLM's
    # waiting requests by reason (`capacity`: no KV room; `deferred`: other constraints).
    cache_hit_rate: float | None = None
    used_tokens: float | None = None
    waiting_for_capacity: int | None = None

    def is_fresh(self, now: float, max_age_s: float) -> bool:
        """True if scraped no longer than `max_age_s` before `now`."""
        return 0.0 <= now - self.scraped_at <= max_age_s


def _split_sample(line: str) -> tuple[str, str, float] | None:
    """(metric name, raw label text, value) of one exposition line; quotes in labels respected."""
    brace = line.find("{")
    space = line.find(" ")
    labels = ""
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
        labels = line[brace + 1 : i]
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
    return name, labels, value


def _parse_labels(text: str) -> dict[str, str]:
    """`a="x",b="y"` -> {"a": "x", "b": "y"} (escapes kept as written: only compared)."""
    out: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        eq = text.find("=", i)
        if eq == -1 or eq + 1 >= n or text[eq + 1] != '"':
            break
        key = text[i:eq].strip().lstrip(",").strip()
        j = eq + 2
        while j < n and text[j] != '"':
            j += 2 if text[j] == "\\" else 1
        out[key] = text[eq + 2 : j]
        i = j + 1
    return out


def _combine(series: dict[Labels, float]) -> float:
    """One metric's value from its series: ranks collapsed by max, priority buckets by their
    aggregate, everything else (models, engines, data-parallel ranks) summed."""
    by_rest: dict[Labels, float] = {}
    for labels, value in series.items():
        rest = tuple(kv for kv in labels if kv[0] not in _RANK_LABELS)
        old = by_rest.get(rest)
        by_rest[rest] = value if old is None or value > old else old
    if any(k == "priority" for labels in by_rest for k, _ in labels):
        aggregates = {lab: v for lab, v in by_rest.items() if ("priority", "") in lab}
        bucketed = {lab for lab in by_rest if any(k == "priority" for k, _ in lab)}
        if aggregates:
            by_rest = {
                lab: v for lab, v in by_rest.items() if lab not in bucketed or lab in aggregates
            }
    return sum(by_rest.values())


def parse_worker_metrics(text: str, scraped_at: float) -> WorkerMetrics:
    """Parse a `/metrics` body from vLLM or SGLang.

    Raises MetricsParseError if neither the running nor the waiting count is present.
    """
    series: dict[str, dict[Labels, float]] = {}
    kv: float | None = None
    flavor: str | None = None
    waiting_capacity: float | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] == "#" or not line.startswith(("vllm:", "sglang:")):
            continue
        parsed = _split_sample(line)
        if parsed is None:
            continue
        name, label_text, value = parsed
        if name not in _WANTED or math.isnan(value):
            continue
        labels = _parse_labels(label_text) if label_text else {}
        if name in _KV:
            # Some versions report percent (0..100); routing wants a fraction.
            frac = value / 100.0 if value > 1.0 else value
            kv = frac if kv is None or frac > kv else kv
            continue
        if name == _WAITING_BY_REASON:
            if labels.get("reason") == "capacity":
                waiting_capacity = (waiting_capacity or 0.0) + value
            continue
        key = tuple(sorted((k, v) for k, v in labels.items() if k not in ("le", "quantile")))
        series.setdefault(name, {})[key] = value
        if name in _RUNNING or name in _WAITING:
            flavor = _RUNNING.get(name) or _WAITING[name]

    sums = {name: _combine(s) for name, s in series.items()}
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
        queue_seconds_sum=_first(sums, _QUEUE_SUM),
        queue_seconds_count=_first(sums, _QUEUE_COUNT),
        preemptions_total=_first(sums, _PREEMPT),
        prefix_cache_queries_total=_first(sums, _PC_QUERIES),
        prefix_cache_hits_total=_first(sums, _PC_HITS),
        cache_hit_rate=_first_mean(series, _HIT_RATE),
        used_tokens=_first(sums, _USED_TOKENS),
        waiting_for_capacity=None if waiting_capacity is None else int(waiting_capacity),
    )


def _first_mean(series: dict[str, dict[Labels, float]], names: Iterable[str]) -> float | None:
    """A ratio gauge (0..1) is not summed: the mean of the first name's series."""
    for n in names:
        values = list(series.get(n, {}).values())
        if values:
            return sum(values) / len(values)
    return None


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


@dataclass(frozen=True, slots=True)
class WorkerSignals:
    """What two scrapes of one worker say about the window between them (None: unknown)."""

    queue_mean_s: float | None = None  # mean time a request waited before its prefill
    preemptions_per_s: float | None = None  # requests evicted from the batch (KV pressure)
    prefix_hit_rate: float | None = None  # share of prompt tokens served from the prefix cache


def worker_signals(
    previous: WorkerMetrics | None, current: WorkerMetrics, last: WorkerSignals | None = None
) -> WorkerSignals:
    """The windowed signals between two scrapes (SGLang's hit rate is its own gauge).

    A window in which no request left the queue (or queried the prefix cache) says nothing
    new about those: the `last` values carry over rather than vanish between busy windows.
    """
    if previous is None:
        return WorkerSignals(prefix_hit_rate=current.cache_hit_rate)
    dt = current.scraped_at - previous.scraped_at
    preempt = None
    a, b = previous.preemptions_total, current.preemptions_total
    if a is not None and b is not None and dt > 0 and b >= a:
        preempt = (b - a) / dt
    hit = current.cache_hit_rate
    q0, q1 = previous.prefix_cache_queries_total, current.prefix_cache_queries_total
    h0, h1 = previous.prefix_cache_hits_total, current.prefix_cache_hits_total
    if hit is None and None not in (q0, q1, h0, h1):
        assert q0 is not None and q1 is not None and h0 is not None and h1 is not None
        if q1 > q0 and h1 >= h0:
            hit = min(1.0, (h1 - h0) / (q1 - q0))
    queue = window_mean(
        previous.queue_seconds_sum,
        previous.queue_seconds_count,
        current.queue_seconds_sum,
        current.queue_seconds_count,
    )
    if last is not None:
        queue = last.queue_mean_s if queue is None else queue
        hit = last.prefix_hit_rate if hit is None else hit
        if last.preemptions_per_s and dt >= 0:
            # Preemptions come in bursts: the pressure fades over seconds, not one scrape.
            faded = last.preemptions_per_s * math.exp(-dt / PREEMPTION_MEMORY_S)
            preempt = faded if preempt is None or faded > preempt else preempt
    return WorkerSignals(queue_mean_s=queue, preemptions_per_s=preempt, prefix_hit_rate=hit)
