"""Load shapes: distribution and schedule parsing, seeded sampling, Poisson arrivals, ramps."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from loadtest.schedule import (
    Distribution,
    ScheduleError,
    Step,
    burst_times,
    concurrency_changes,
    constant_schedule,
    parse_distribution,
    parse_duration,
    parse_schedule,
    poisson_arrivals,
)


def test_parse_distributions() -> None:
    assert parse_distribution("const:128") == Distribution("const", 128)
    assert parse_distribution("64") == Distribution("const", 64)
    assert parse_distribution("uniform:32-512") == Distribution("uniform", 32, 512)
    assert parse_distribution("lognormal:256,0.5") == Distribution("lognormal", 256, 0.5)
    assert parse_distribution("lognormal:256,0.5,1000").cap == 1000
    assert str(parse_distribution("uniform:32-512")) == "uniform:32-512"
    assert str(parse_distribution("lognormal:256,0.5,1000")) == "lognormal:256,0.5,1000"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "const:0",
        "const:-3",
        "uniform:10",
        "uniform:50-10",
        "lognormal:1",
        "lognormal:-1,0.5",
        "zipf:1.2",
        "const:abc",
        "lognormal:nan,1",
    ],
)
def test_bad_distributions_are_refused(text: str) -> None:
    with pytest.raises(ScheduleError):
        parse_distribution(text)


def test_seeded_sampling_is_reproducible_and_in_range() -> None:
    d = parse_distribution("uniform:32-512")
    a = [d.sample(random.Random(7)) for _ in range(3)]
    b = [d.sample(random.Random(7)) for _ in range(3)]
    assert a == b
    rng = random.Random(1)
    xs = [d.sample(rng) for _ in range(5000)]
    assert min(xs) >= 32 and max(xs) <= 512
    assert min(xs) < 40 and max(xs) > 500  # covers the whole range
    assert abs(statistics.mean(xs) - 272) < 10


def test_lognormal_has_the_requested_mean_and_cap() -> None:
    rng = random.Random(3)
    d = parse_distribution("lognormal:200,0.6")
    xs = [d.sample(rng) for _ in range(20000)]
    assert abs(statistics.mean(xs) - 200) < 6
    assert min(xs) >= 1
    capped = parse_distribution("lognormal:200,1.5,300")
    assert max(capped.sample(rng) for _ in range(5000)) == 300


def test_parse_durations() -> None:
    assert parse_duration("10s") == 10
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2m") == 120
    assert parse_duration("1.5") == 1.5
    with pytest.raises(ScheduleError):
        parse_duration("soon")


def test_parse_schedule_steps_ramps_and_bursts() -> None:
    s = parse_schedule("1:10s, 32:20s,burst:50, 1-8:4s ,1:10s")
    assert s.steps == (
        Step(1, 1, 10),
        Step(32, 32, 20),
        Step(0, 0, 0, burst=50),
        Step(1, 8, 4),
        Step(1, 1, 10),
    )
    assert s.duration == 44
    assert s.max_level == 32
    assert s.burst_total == 50
    assert str(s) == "1:10s,32:20s,burst:50,1-8:4s,1:10s"
    assert parse_schedule(str(s)) == s


@pytest.mark.parametrize("text", ["", "5", "5:0s", "-1:5s", "burst:0", "x:5s", "5:-1s"])
def test_bad_schedules_are_refused(text: str) -> None:
    with pytest.raises(ScheduleError):
        parse_schedule(text)


def test_concurrency_changes_of_steps_and_ramps() -> None:
    assert concurrency_changes(parse_schedule("1:10s,32:20s,1:10s")) == [
        (0.0, 1),
        (10.0, 32),
        (30.0, 1),
    ]
    ramp = concurrency_changes(parse_schedule("2-4:4s"))
    assert ramp == [(0.0, 2), (1.0, 3), (3.0, 4)]
    down = concurrency_changes(parse_schedule("3-1:2s,1:1s"))
    assert down == [(0.0, 3), (0.5, 2), (1.5, 1)]


def test_burst_times() -> None:
    assert burst_times(parse_schedule("burst:5,2:3s,burst:7,1:1s")) == [(0.0, 5), (3.0, 7)]


def test_poisson_arrivals_rate_and_gaps() -> None:
    arr = list(poisson_arrivals(constant_schedule(200, 50), random.Random(11)))
    assert all(b >= a for a, b in itertools.pairwise(arr))
    assert arr[0] >= 0 and arr[-1] < 50
    assert abs(len(arr) - 10_000) < 400  # Poisson: sd = 100
    gaps = [b - a for a, b in itertools.pairwise(arr)]
    # Exponential gaps: mean = sd = 1/rate.
    assert abs(statistics.mean(gaps) - 0.005) < 0.0003
    assert abs(statistics.stdev(gaps) - 0.005) < 0.0005
    assert arr == list(poisson_arrivals(constant_schedule(200, 50), random.Random(11)))


def test_poisson_arrivals_follow_steps_ramps_and_bursts() -> None:
    s = parse_schedule("100:10s,burst:30,0:5s,0-200:10s")
    arr = list(poisson_arrivals(s, random.Random(5)))
    first = [t for t in arr if t < 10]
    assert abs(len(first) - 1000) < 130
    assert arr.count(10.0) == 30
    assert not [t for t in arr if 10 < t < 15]
    ramp = [t - 15 for t in arr if t >= 15]
    # Linear ramp 0 -> 200/s over 10 s: 1000 arrivals, three quarters in the second half.
    assert abs(len(ramp) - 1000) < 130
    assert abs(sum(1 for t in ramp if t >= 5) / len(ramp) - 0.75) < 0.05
