"""Load shapes: length distributions, schedules of steps/ramps/bursts, and Poisson arrival times.

Pure code: parsing and sampling take an explicit `random.Random`, so a seed reproduces a run.

Distribution syntax (token counts, always clamped to at least 1):
    const:128 | 128          always 128
    uniform:32-512           integers 32..512 inclusive
    lognormal:MEAN,SIGMA     log-normal with arithmetic mean MEAN and log-space sigma SIGMA
    lognormal:MEAN,SIGMA,MAX same, capped at MAX

Schedule syntax (comma-separated steps, levels are concurrency in closed loop, req/s in open loop):
    32:20s                   hold level 32 for 20 seconds (units: ms, s, m; bare number = seconds)
    1-32:30s                 ramp linearly from 1 to 32 over 30 seconds
    burst:100                fire 100 extra requests at once at this point (takes no time)
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal


class ScheduleError(ValueError):
    """A distribution or schedule string that does not parse."""


@dataclass(frozen=True, slots=True)
class Distribution:
    """A distribution of positive integer token counts."""

    kind: Literal["const", "uniform", "lognormal"]
    a: float
    b: float = 0.0
    cap: int | None = None

    def sample(self, rng: random.Random) -> int:
        """Draw one value (>= 1)."""
        if self.kind == "const":
            v = int(self.a)
        elif self.kind == "uniform":
            v = rng.randint(int(self.a), int(self.b))
        else:
            # Parameterised by the arithmetic mean so "lognormal:256,0.5" averages ~256 tokens.
            mu = math.log(self.a) - self.b * self.b / 2.0
            v = round(rng.lognormvariate(mu, self.b))
        if self.cap is not None:
            v = min(v, self.cap)
        return max(1, v)

    @property
    def mean(self) -> float:
        """The mean before clamping (for sizing and reports)."""
        if self.kind == "const":
            return self.a
        if self.kind == "uniform":
            return (self.a + self.b) / 2.0
        return self.a

    def __str__(self) -> str:
        if self.kind == "const":
            return f"const:{int(self.a)}"
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}-{int(self.b)}"
        cap = f",{self.cap}" if self.cap is not None else ""
        return f"lognormal:{self.a:g},{self.b:g}{cap}"


def _num(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ScheduleError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise ScheduleError(f"{what}: {text!r} is not finite")
    return v


def _positive_int(text: str, what: str) -> int:
    v = _num(text, what)
    if v < 1 or v != int(v):
        raise ScheduleError(f"{what}: {text!r} must be a positive integer")
    return int(v)


def parse_distribution(text: str) -> Distribution:
    """Parse `const:N`, `N`, `uniform:LO-HI` or `lognormal:MEAN,SIGMA[,MAX]`."""
    text = text.strip()
    kind, sep, rest = text.partition(":")
    if not sep:
        return Distribution("const", _positive_int(kind, "distribution"))
    kind = kind.strip().lower()
    if kind == "const":
        return Distribution("const", _positive_int(rest, "const"))
    if kind == "uniform":
        lo, dash, hi = rest.partition("-")
        if not dash:
            raise ScheduleError(f"uniform needs LO-HI, got {rest!r}")
        a, b = _positive_int(lo, "uniform low"), _positive_int(hi, "uniform high")
        if b < a:
            raise ScheduleError(f"uniform:{rest}: high is below low")
        return Distribution("uniform", a, b)
    if kind == "lognormal":
        parts = rest.split(",")
        if len(parts) not in (2, 3):
            raise ScheduleError(f"lognormal needs MEAN,SIGMA[,MAX], got {rest!r}")
        mean, sigma = _num(parts[0], "lognormal mean"), _num(parts[1], "lognormal sigma")
        if mean <= 0 or sigma < 0:
            raise ScheduleError(f"lognormal:{rest}: mean must be > 0 and sigma >= 0")
        cap = _positive_int(parts[2], "lognormal max") if len(parts) == 3 else None
        return Distribution("lognormal", mean, sigma, cap)
    raise ScheduleError(f"unknown distribution {kind!r} (const, uniform, lognormal)")


def parse_duration(text: str) -> float:
    """Parse `500ms`, `10s`, `2m` or a bare number of seconds."""
    t = text.strip().lower()
    scale = 1.0
    if t.endswith("ms"):
        t, scale = t[:-2], 0.001
    elif t.endswith("s"):
        t = t[:-1]
    elif t.endswith("m"):
        t, scale = t[:-1], 60.0
    v = _num(t, "duration") * scale
    if v < 0:
        raise ScheduleError(f"duration {text!r} is negative")
    return v


@dataclass(frozen=True, slots=True)
class Step:
    """One schedule step: a level held or ramped over a duration, or a burst (duration 0)."""

    start_level: float
    end_level: float
    duration: float
    burst: int = 0

    def level_at(self, dt: float) -> float:
        """Level `dt` seconds into this step."""
        if self.duration <= 0:
            return self.end_level
        f = min(max(dt / self.duration, 0.0), 1.0)
        return self.start_level + (self.end_level - self.start_level) * f


@dataclass(frozen=True, slots=True)
class Schedule:
    """An ordered list of steps."""

    steps: tuple[Step, ...]

    @property
    def duration(self) -> float:
        """Total seconds covered by the schedule."""
        return sum(s.duration for s in self.steps)

    @property
    def max_level(self) -> float:
        """Highest level reached by any step (bursts excluded)."""
        levels = [max(s.start_level, s.end_level) for s in self.steps if not s.burst]
        return max(levels, default=0.0)

    @property
    def burst_total(self) -> int:
        """Requests fired by bursts."""
        return sum(s.burst for s in self.steps)

    def __str__(self) -> str:
        out = []
        for s in self.steps:
            if s.burst:
                out.append(f"burst:{s.burst}")
            elif s.start_level == s.end_level:
                out.append(f"{s.end_level:g}:{s.duration:g}s")
            else:
                out.append(f"{s.start_level:g}-{s.end_level:g}:{s.duration:g}s")
        return ",".join(out)


def constant_schedule(level: float, duration: float) -> Schedule:
    """One step holding `level` for `duration` seconds."""
    return Schedule((Step(level, level, duration),))


def parse_schedule(text: str) -> Schedule:
    """Parse `LEVEL:DUR`, `A-B:DUR` and `burst:N` steps separated by commas."""
    steps: list[Step] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        head, sep, tail = item.partition(":")
        if not sep:
            raise ScheduleError(f"step {item!r}: expected LEVEL:DURATION or burst:N")
        if head.strip().lower() == "burst":
            steps.append(Step(0.0, 0.0, 0.0, burst=_positive_int(tail, "burst")))
            continue
        lo, dash, hi = head.partition("-")
        a = _num(lo, f"step {item!r} level")
        b = _num(hi, f"step {item!r} level") if dash else a
        if a < 0 or b < 0:
            raise ScheduleError(f"step {item!r}: levels must be >= 0")
        dur = parse_duration(tail)
        if dur <= 0:
            raise ScheduleError(f"step {item!r}: duration must be > 0")
        steps.append(Step(a, b, dur))
    if not steps:
        raise ScheduleError("empty schedule")
    return Schedule(tuple(steps))


def concurrency_changes(schedule: Schedule) -> list[tuple[float, int]]:
    """(time, concurrency) change points of a closed-loop schedule; ramps move one at a time."""
    out: list[tuple[float, int]] = []
    t = 0.0
    current = -1
    for s in schedule.steps:
        if s.burst:
            continue
        a, b = round(s.start_level), round(s.end_level)
        if a != current:
            out.append((t, a))
            current = a
        if b != a:
            n = abs(b - a)
            sign = 1 if b > a else -1
            for k in range(1, n + 1):
                # A unit step happens where the linear ramp crosses the midpoint to the next level.
                frac = (k - 0.5) / n
                out.append((t + s.duration * frac, a + sign * k))
            current = b
        t += s.duration
    return out


def burst_times(schedule: Schedule) -> list[tuple[float, int]]:
    """(time, count) of every burst in the schedule."""
    out: list[tuple[float, int]] = []
    t = 0.0
    for s in schedule.steps:
        if s.burst:
            out.append((t, s.burst))
        t += s.duration
    return out


def poisson_arrivals(schedule: Schedule, rng: random.Random) -> Iterator[float]:
    """Arrival offsets (seconds from start, non-decreasing) of an open-loop run.

    Constant steps draw exponential gaps; at a step boundary the draw restarts, which is exact
    for a Poisson process because it is memoryless. Ramps use thinning against the step's peak.
    Bursts yield `count` arrivals at the same instant.
    """
    t0 = 0.0
    for s in schedule.steps:
        if s.burst:
            for _ in range(s.burst):
                yield t0
            continue
        peak = max(s.start_level, s.end_level)
        end = t0 + s.duration
        if peak > 0:
            t = t0
            ramp = s.start_level != s.end_level
            while True:
                t += rng.expovariate(peak)
                if t >= end:
                    break
                if ramp and rng.random() * peak > s.level_at(t - t0):
                    continue
                yield t
        t0 = end
