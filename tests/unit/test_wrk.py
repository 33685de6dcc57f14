"""Parsing wrk's output: req/s counts good answers only (an error is not throughput)."""

from __future__ import annotations

import pytest

from loadtest.wrk import parse_wrk

WRK_WITH_ERRORS = """\
Running 5s test @ http://127.0.0.1:8080/v1/chat/completions
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.12ms    1.01ms  22.90ms   90.00%
    Req/Sec     6.02k   210.00     6.40k    80.00%
  Latency Distribution
     50%    5.12ms
     75%    5.60ms
     90%    6.10ms
     99%   22.90ms
  30000 requests in 5.00s, 12.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 6000
Requests/sec:   6000.00
Transfer/sec:      2.40MB
"""


def test_errors_are_not_counted_as_throughput() -> None:
    r = parse_wrk(WRK_WITH_ERRORS, cpu_s=1.5)
    # wrk says 6,000 req/s; 6,000 of its 30,000 answers were errors: 24,000 good in 5 s.
    assert r.rps == pytest.approx(4800.0)
    assert (r.requests, r.non2xx, r.socket_errors, r.errors) == (30000, 6000, 5, 6005)
    assert (r.p50_ms, r.p99_ms, r.cpu_s) == (5.12, 22.9, 1.5)


def test_a_clean_run_keeps_wrks_rate() -> None:
    text = WRK_WITH_ERRORS.replace("  Non-2xx or 3xx responses: 6000\n", "").replace(
        "  Socket errors: connect 0, read 3, write 0, timeout 2\n", ""
    )
    r = parse_wrk(text.replace("30000 requests in 5.00s", "30000 requests in 1.00m"), 0.0)
    assert r.rps == pytest.approx(500.0) and r.errors == 0


def test_output_without_a_rate_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no rate"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n", 0.0)
