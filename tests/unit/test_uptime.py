"""GPU uptime from scrapes, and the hours an on_demand GPU is held, worked by hand."""

from __future__ import annotations

import pytest

from gateway.metering.uptime import (
    Span,
    UptimeRow,
    UptimeTracker,
    covered_s,
    held,
    merged,
)

GAP = 4.0  # two scrape intervals of 2 s


def test_a_run_of_successes_is_one_interval_extended_in_place() -> None:
    t = UptimeTracker()
    t.up("gpu", 100.0, GAP)
    assert t.unwritten() == [UptimeRow("gpu", 100.0, 100.0)]  # observed, zero length so far
    t.up("gpu", 102.0, GAP)
    t.up("gpu", 104.0, GAP)
    # One row (keyed on its start), its end the last success.
    assert t.unwritten() == [UptimeRow("gpu", 100.0, 104.0)]


def test_written_rows_are_acknowledged_and_an_extended_one_stays_unwritten() -> None:
    t = UptimeTracker()
    t.up("gpu", 100.0, GAP)
    t.up("gpu", 102.0, GAP)
    rows = t.unwritten()
    t.up("gpu", 104.0, GAP)  # a scrape between the read and the write's success
    t.written(rows)
    assert t.unwritten() == [UptimeRow("gpu", 100.0, 104.0)]
    t.written(t.unwritten())
    assert t.unwritten() == []
    t.up("gpu", 106.0, GAP)  # the same open row, a later end
    assert t.unwritten() == [UptimeRow("gpu", 100.0, 106.0)]


def test_a_failed_scrape_ends_the_interval_at_the_last_success() -> None:
    t = UptimeTracker()
    for now in (100.0, 102.0, 104.0):
        t.up("gpu", now, GAP)
    t.down("gpu")  # failed at 106
    t.up("gpu", 108.0, GAP)  # back at 108: a new row, even within the gap
    assert t.unwritten() == [UptimeRow("gpu", 100.0, 104.0), UptimeRow("gpu", 108.0, 108.0)]


def test_a_silence_longer_than_the_gap_starts_a_new_interval() -> None:
    t = UptimeTracker()
    t.up("gpu", 100.0, GAP)
    t.up("gpu", 103.9, GAP)  # 3.9 s: within two intervals, the run goes on
    t.up("gpu", 108.0, GAP)  # 4.1 s of silence (the process stalled): a new run
    assert t.unwritten() == [UptimeRow("gpu", 100.0, 103.9), UptimeRow("gpu", 108.0, 108.0)]
    t.up("gpu", 107.0, GAP)  # the clock stepped back: a new run rather than a negative span
    assert UptimeRow("gpu", 107.0, 107.0) in t.unwritten()


def test_backends_are_tracked_apart() -> None:
    t = UptimeTracker()
    t.up("a", 100.0, GAP)
    t.up("b", 101.0, GAP)
    t.down("a")
    t.up("b", 103.0, GAP)
    assert t.unwritten() == [UptimeRow("a", 100.0, 100.0), UptimeRow("b", 101.0, 103.0)]


def test_merged_joins_overlapping_and_touching_spans() -> None:
    spans = [Span(10, 20), Span(0, 5), Span(15, 30), Span(30, 31), Span(40, 40), Span(2, 3)]
    assert merged(spans) == [Span(0, 5), Span(10, 31), Span(40, 40)]


def test_two_processes_watching_one_worker_are_not_counted_twice() -> None:
    # `--workers 2`: both scrape the same worker; their runs overlap by 50 s. Process 1
    # restarted at 200 (a fresh observer, a fresh row).
    p1 = [Span(0, 100), Span(200, 260)]
    p2 = [Span(50, 150)]
    assert covered_s([*p1, *p2], 0, 3600) == 150 + 60  # not 100 + 60 + 100
    assert covered_s(p1 + p2 + p1, 0, 3600) == 210  # the same rows twice change nothing


def test_uptime_is_clipped_to_the_window() -> None:
    spans = [Span(-50, 30), Span(80, 120), Span(500, 600)]
    # Window [0, 100): 30 s of the first, 20 s of the second, none of the third.
    assert covered_s(spans, 0, 100) == 50
    assert covered_s(spans, 1000, 2000) == 0


def test_a_crash_leaves_its_open_interval_at_the_last_write() -> None:
    # Scrapes every 2 s, a write every 2 s: the last write before kill -9 at 109 said 100-108;
    # the scrape at 109 never reached the ledger. After the restart a new observer's row
    # starts at 130. Lost: 108-109, under one interval.
    rows = [Span(100, 108), Span(130, 140)]
    assert covered_s(rows, 0, 200) == 18


def test_reserved_is_held_the_window_on_demand_its_uptime() -> None:
    up = [Span(0, 900), Span(600, 1800), Span(3000, 4000)]
    r = held("reserved", up, 0, 3600)
    assert (r.seconds, r.held_from, r.observed_s) == (3600, "window", 2400)
    d = held("on_demand", up, 0, 3600)
    assert (d.seconds, d.held_from, d.observed_s) == (2400, "uptime", 2400)


def test_on_demand_with_nothing_observed_is_unknown_not_zero_nor_the_window() -> None:
    d = held("on_demand", [Span(5000, 6000)], 0, 3600)  # outside the window
    assert (d.seconds, d.held_from, d.observed_s) == (None, "no uptime observed", None)
    # A reserved GPU is the window all the same; what was observed says none.
    r = held("reserved", [], 0, 3600)
    assert (r.seconds, r.held_from, r.observed_s) == (3600, "window", None)


def test_one_scrape_seen_is_observed_and_held_zero() -> None:
    # One success at the window's start: up was seen, for no measurable time.
    d = held("on_demand", [Span(0, 0)], 0, 3600)
    assert (d.seconds, d.held_from) == (0, "uptime")
    assert held("on_demand", [Span(3600, 3600)], 0, 3600).seconds == pytest.approx(0)
