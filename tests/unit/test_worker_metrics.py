"""vLLM and SGLang /metrics text to WorkerMetrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from adapters.worker_metrics import (
    MetricsParseError,
    generation_rate,
    parse_worker_metrics,
    window_mean,
    worker_signals,
)

MODEL = 'model_name="meta-llama/Llama-3.1-8B-Instruct"'

VLLM = f"""\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",{MODEL}}} 7.0
vllm:num_requests_running{{engine="1",{MODEL}}} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",{MODEL}}} 2.0
vllm:num_requests_waiting{{engine="1",{MODEL}}} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",{MODEL}}} 0.42
vllm:kv_cache_usage_perc{{engine="1",{MODEL}}} 0.61
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{engine="0",{MODEL}}} 120000.0
vllm:generation_tokens_total{{engine="1",{MODEL}}} 80000.0
vllm:generation_tokens_created{{engine="0",{MODEL}}} 1.7e9
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.001",{MODEL}}} 0.0
vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",{MODEL}}} 100.0
vllm:time_to_first_token_seconds_sum{{engine="0",{MODEL}}} 12.5
vllm:time_to_first_token_seconds_count{{engine="0",{MODEL}}} 100.0
vllm:inter_token_latency_seconds_sum{{engine="0",{MODEL}}} 60.0
vllm:inter_token_latency_seconds_count{{engine="0",{MODEL}}} 10000.0
process_resident_memory_bytes 1.2e9
"""

SGLANG = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="llama",tp_rank="0"} 12.0
sglang:num_queue_reqs{model_name="llama",tp_rank="0"} 3.0
sglang:token_usage{model_name="llama",tp_rank="0"} 0.25
sglang:generation_tokens_total{model_name="llama",tp_rank="0"} 5000.0
"""


def test_vllm_series_are_summed_and_kv_is_the_fullest_engine() -> None:
    m = parse_worker_metrics(VLLM, scraped_at=50.0)
    assert (m.running, m.waiting, m.flavor) == (12, 2, "vllm")
    assert m.kv_usage == 0.61
    assert m.generation_tokens_total == 200000.0
    assert (m.ttft_seconds_sum, m.ttft_seconds_count) == (12.5, 100.0)
    assert (m.itl_seconds_sum, m.itl_seconds_count) == (60.0, 10000.0)
    assert m.scraped_at == 50.0


def test_sglang_names() -> None:
    m = parse_worker_metrics(SGLANG, scraped_at=1.0)
    assert (m.running, m.waiting, m.kv_usage, m.flavor) == (12, 3, 0.25, "sglang")
    assert m.generation_tokens_total == 5000.0 and m.ttft_seconds_sum is None


def test_older_vllm_gpu_cache_usage_and_percent_scale() -> None:
    text = "vllm:num_requests_running 3\nvllm:gpu_cache_usage_perc 87.5\n"
    m = parse_worker_metrics(text, scraped_at=0.0)
    assert m.running == 3 and m.waiting == 0 and m.kv_usage == pytest.approx(0.875)


def test_labels_with_braces_spaces_and_escaped_quotes() -> None:
    text = (
        'vllm:num_requests_running{model_name="odd } name \\" x",engine="0"} 4 1700000000000\n'
        'vllm:num_requests_waiting{model_name="a b"} 1\n'
        "vllm:num_requests_waiting{broken 9\n"
        "vllm:num_requests_waiting NaN\n"
    )
    m = parse_worker_metrics(text, scraped_at=0.0)
    assert (m.running, m.waiting) == (4, 1)


@pytest.mark.parametrize(
    "text", ["", "# only comments\n", "process_cpu_seconds_total 3\n", "<html>502</html>"]
)
def test_missing_signals_raise(text: str) -> None:
    with pytest.raises(MetricsParseError):
        parse_worker_metrics(text, scraped_at=0.0)


def test_freshness() -> None:
    m = parse_worker_metrics(SGLANG, scraped_at=100.0)
    assert m.is_fresh(104.0, max_age_s=5.0)
    assert not m.is_fresh(106.0, max_age_s=5.0)


def test_generation_rate_and_window_mean() -> None:
    a = parse_worker_metrics(SGLANG, scraped_at=10.0)
    b = parse_worker_metrics(SGLANG.replace("5000.0", "9000.0"), scraped_at=12.0)
    assert generation_rate(a, b) == 2000.0
    # A restarted worker resets its counters: no rate rather than a negative one.
    restarted = parse_worker_metrics(SGLANG.replace("5000.0", "100.0"), scraped_at=14.0)
    assert generation_rate(b, restarted) is None
    assert window_mean(12.5, 100.0, 17.5, 120.0) == pytest.approx(0.25)
    assert window_mean(12.5, 100.0, 12.5, 100.0) is None


# --- real shapes (tests/fixtures/wire/SOURCES.md) -------------------------------------

WIRE = Path(__file__).resolve().parents[1] / "fixtures" / "wire"


def test_sglang_tp_ranks_are_one_batch_not_a_sum() -> None:
    """--enable-metrics-for-all-schedulers: each TP rank exports the same running count."""
    text = (WIRE / "sglang_metrics_tp_ranks_all_schedulers.prom").read_text()
    m = parse_worker_metrics(text, scraped_at=0.0)
    assert (m.running, m.waiting) == (4, 3)  # not 8: the max across ranks


def test_sglang_ranks_lagging_take_the_max_and_dp_ranks_add() -> None:
    text = (
        'sglang:num_running_reqs{dp_rank="0",tp_rank="0"} 6\n'
        'sglang:num_running_reqs{dp_rank="0",tp_rank="1"} 5\n'
        'sglang:num_running_reqs{dp_rank="1",tp_rank="0"} 2\n'
        'sglang:num_running_reqs{dp_rank="1",tp_rank="1"} 2\n'
    )
    assert parse_worker_metrics(text, scraped_at=0.0).running == 8


def test_sglang_priority_buckets_use_the_aggregate() -> None:
    text = (WIRE / "sglang_metrics_priority_buckets.prom").read_text()
    assert parse_worker_metrics(text, scraped_at=0.0).running == 14  # not 28


def test_sglang_documented_metrics() -> None:
    m = parse_worker_metrics((WIRE / "sglang_metrics_docs.prom").read_text(), scraped_at=0.0)
    assert (m.running, m.waiting, m.flavor) == (162, 2826, "sglang")
    assert m.kv_usage == 0.28 and m.used_tokens == 123859.0
    assert m.cache_hit_rate == pytest.approx(0.0075075526)


def test_vllm_v1_prefix_cache_counters_and_v0_names() -> None:
    m = parse_worker_metrics((WIRE / "vllm_v1_metrics_excerpts.prom").read_text(), 0.0)
    assert m.running == 8 and m.prefix_cache_queries_total == 32.0
    assert m.prefix_cache_hits_total == 0.0
    v0 = parse_worker_metrics((WIRE / "vllm_v0_metrics_prodstack318.prom").read_text(), 0.0)
    assert (v0.running, v0.waiting, v0.kv_usage) == (0, 0, 0.0)


def test_vllm_queue_preemption_and_waiting_by_reason_signals() -> None:
    def scrape(t: float, queue_sum: float, queue_n: float, preempt: float, hits: float) -> str:
        return (
            f'vllm:num_requests_running{{engine="0"}} 30\n'
            f'vllm:num_requests_waiting{{engine="0"}} 4\n'
            f'vllm:num_requests_waiting_by_reason{{engine="0",reason="capacity"}} 3\n'
            f'vllm:num_requests_waiting_by_reason{{engine="0",reason="deferred"}} 1\n'
            f'vllm:request_queue_time_seconds_sum{{engine="0"}} {queue_sum}\n'
            f'vllm:request_queue_time_seconds_count{{engine="0"}} {queue_n}\n'
            f'vllm:num_preemptions_total{{engine="0"}} {preempt}\n'
            f'vllm:prefix_cache_queries_total{{engine="0"}} {t * 1000}\n'
            f'vllm:prefix_cache_hits_total{{engine="0"}} {hits}\n'
        )

    a = parse_worker_metrics(scrape(10, 5.0, 10, 2, 4000), scraped_at=10.0)
    b = parse_worker_metrics(scrape(12, 8.0, 16, 6, 5000), scraped_at=12.0)
    assert b.waiting_for_capacity == 3
    sig = worker_signals(a, b)
    assert sig.queue_mean_s == pytest.approx(0.5)
    assert sig.preemptions_per_s == pytest.approx(2.0)
    assert sig.prefix_hit_rate == pytest.approx(0.5)
    assert worker_signals(None, b).queue_mean_s is None
    # A quiet window (no request left the queue) keeps what the last busy one said.
    quiet = worker_signals(b, b, sig)
    assert quiet.queue_mean_s == pytest.approx(0.5) and quiet.preemptions_per_s == 2.0
    later = parse_worker_metrics(scrape(22, 8.0, 16, 6, 5000), scraped_at=22.0)
    faded = worker_signals(b, later, sig)  # no new preemptions in 10 s: the burst fades
    assert faded.preemptions_per_s == pytest.approx(2.0 * math.exp(-1.0))
    assert worker_signals(b, b).queue_mean_s is None
