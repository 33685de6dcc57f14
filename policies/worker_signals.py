"""Queue time, preemptions and provider queueing as inputs to the predictions (pure).

Scraped worker signals (vLLM `request_queue_time_seconds`, `num_preemptions_total`,
`num_requests_waiting_by_reason`; SGLang `queue_time_seconds`) and Groq's reported
`queue_time` sharpen what the cost model alone predicts:

- TTFT queue term (local): while requests wait on a worker, its measured queue time is a
  floor for the new request's wait before its own prefill; the cost model only knows the
  queue the gateway can see.
- Preemption pressure (local): a worker that evicts requests for KV room is at the batch
  its memory sustains, whatever its running count says: it is treated as being one short
  of the SLO-feasible batch b* (the largest batch whose ITL meets the class's target), so
  a request there is predicted at b*, and a batch beyond it is not offered.
- Provider queue (Groq): TTFT samples include `queue_time`; the slow TTFT average is moved
  by the difference between the recent and the long-run queue time, so a queue that builds
  up shows at once instead of over many samples.
"""

from __future__ import annotations

# Preemptions per second above which a worker is under memory pressure.
PREEMPTION_PRESSURE_PER_S = 0.05


def under_pressure(preemptions_per_s: float | None, waiting_for_capacity: int | None) -> bool:
    """True while the worker preempts, or queues requests for lack of KV room."""
    return (preemptions_per_s or 0.0) > PREEMPTION_PRESSURE_PER_S or (waiting_for_capacity or 0) > 0


def pressured_load(load: int, b_star: int, pressured: bool) -> int:
    """The load to predict with: at least b* - 1 on a worker under memory pressure, so
    this request is predicted at b* (`GpuModel.slo_batch`)."""
    if not pressured:
        return load
    return max(load, b_star - 1)


def ttft_with_queue(
    model_ttft_s: float, queue_wait_s: float | None, queued: int, own_prefill_s: float
) -> float:
    """The cost model's TTFT, floored by the measured queue wait while requests are waiting."""
    if queue_wait_s is None or queued <= 0:
        return model_ttft_s
    floor = queue_wait_s + own_prefill_s
    return floor if floor > model_ttft_s else model_ttft_s


def provider_ttft(
    ttft_mean_s: float, queue_slow_s: float | None, queue_fast_s: float | None
) -> float:
    """A provider's TTFT average moved by how far its recent queue time is from the long run."""
    if queue_slow_s is None or queue_fast_s is None:
        return ttft_mean_s
    moved = ttft_mean_s + (queue_fast_s - queue_slow_s)
    return moved if moved > 0.0 else 0.0
