"""Continuous batching of a simulated GPU worker: one step gives every running sequence a token.

A step over b sequences lasts b / T(b) seconds, T being the decode throughput curve
(interpolated; proportional below its first point, flat past its last). The step that admits
new requests also pays their uncached prompt tokens / prefill throughput, and gives them their
first token. Requests wait in FIFO order while the batch is full (`max_batch` sequences) or
their KV reservation (prompt + n x completion tokens) would exceed `kv_capacity_tokens`.

All durations are wall-clock: simulated seconds x time_scale. The loop does not sleep once per
step: it advances whole segments of steps on a virtual clock (waking about every millisecond,
or at each step when steps are longer), so a fast time_scale costs no more wake-ups than a slow
one, and a late wake-up catches up instead of losing throughput. An arrival interrupts a
segment and joins at the next step boundary.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from loadtest.sim.serve import GenerationAborted
from policies.profile import Profile

TICK_S = 0.001

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
# vLLM's inter-token buckets, with finer ones below 10 ms for fast time scales.
ITL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075,
               0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip


def step_seconds(curve: Mapping[int, float], max_batch: int) -> list[float]:
    """Simulated seconds of one decode step, indexed by batch size 0..max_batch."""
    points = sorted(curve.items())
    out = [0.0]
    for b in range(1, max_batch + 1):
        if b <= points[0][0]:
            tput = points[0][1] * b / points[0][0]
        elif b >= points[-1][0]:
            tput = points[-1][1]
        else:
            i = bisect.bisect_left(points, (b, 0.0))
            (c0, t0), (c1, t1) = points[i - 1], points[i]
            tput = t0 + (t1 - t0) * (b - c0) / (c1 - c0)
        out.append(b / tput)
    return out


@dataclass
class Histogram:
    """A Prometheus histogram that can record the same value many times at once."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float, times: int = 1) -> None:
        """Record `value` `times` times."""
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += times
        self.total += value * times
        self.count += times

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs including +Inf."""
        out: list[tuple[str, float]] = []
        running = 0
        for le, c in zip(self.buckets, self.counts, strict=True):
            running += c
            out.append((repr(le), running))
        out.append(("+Inf", self.count))
        return out


@dataclass
class ModelStats:
    """Counters and histograms of one model name."""

    generation_tokens: int = 0
    prompt_tokens: int = 0
    finished: Counter[str] = field(default_factory=Counter)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))


class State(enum.Enum):
    """Where a job is."""

    NEW = 0
    WAITING = 1
    RUNNING = 2
    DONE = 3
    CANCELLED = 4


class Job:
    """One request in the worker: n sequences sharing a prompt. It is the request's Generation."""

    __slots__ = (
        "arrived",
        "batch_seen",
        "cached",
        "event",
        "finish_reason",
        "first_token_at",
        "kv",
        "model",
        "n",
        "produced",
        "prompt_text",
        "prompt_tokens",
        "scheduler",
        "state",
        "target",
    )

    def __init__(
        self,
        scheduler: Scheduler,
        model: str,
        n: int,
        prompt_tokens: int,
        prompt_text: str,
        target: int,
        finish_reason: str = "stop",
    ) -> None:
        self.scheduler = scheduler
        self.model = model
        self.n = n
        self.prompt_tokens = prompt_tokens
        self.prompt_text = prompt_text
        self.target = target
        self.finish_reason = finish_reason
        self.kv = prompt_tokens + n * target
        self.produced = 0
        self.cached = 0
        self.arrived = 0.0
        self.first_token_at: float | None = None
        self.batch_seen = 0
        self.state = State.NEW
        self.event = asyncio.Event()

    def start(self) -> None:
        """Queue for a batch slot."""
        self.scheduler.submit(self)

    async def wait_past(self, sent: int) -> int:
        """Wait for tokens beyond `sent` (per choice)."""
        while self.produced <= sent and self.state is not State.DONE:
            if self.state is State.CANCELLED:
                raise GenerationAborted("the worker dropped this request")
            self.event.clear()
            await self.event.wait()
        return self.produced

    def close(self) -> None:
        """Leave the batch (or the queue) if still there."""
        self.scheduler.cancel(self)


class Scheduler:
    """The engine loop of one simulated worker."""

    def __init__(
        self,
        profile: Profile,
        max_batch: int,
        kv_capacity_tokens: int,
        time_scale: float,
        prefix_cache: Callable[[str, int], int],
    ) -> None:
        self.max_batch = max_batch
        self.kv_capacity = kv_capacity_tokens
        self.profile = profile
        self.time_scale = time_scale
        # One context length measured: step times depend on the batch only (precomputed).
        self._steps: list[float] | None = None
        if len(profile.contexts) == 1:
            self._steps = [0.0] + [
                b / profile.decode_tokens_per_s(b) * time_scale for b in range(1, max_batch + 1)
            ]
        self._prefix_cache = prefix_cache
        # Timers (call_at) run on the loop's clock, so the engine uses it too; run() binds it
        # (asyncio's default is time.monotonic, uvloop's is its own).
        self._clock: Callable[[], float] = time.monotonic
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.slots = 0  # running sequences
        self.kv_used = 0
        self.models: dict[str, ModelStats] = {}
        self._t = 0.0  # virtual time of the last step boundary (wall-clock seconds)
        self._wake: asyncio.Future[bool] | None = None

    def model_stats(self, model: str) -> ModelStats:
        """Stats of `model`, created on first use."""
        stats = self.models.get(model)
        if stats is None:
            stats = self.models[model] = ModelStats()
        return stats

    def fits(self, job: Job) -> bool:
        """Whether the job could ever run on this worker."""
        return job.n <= self.max_batch and job.kv <= self.kv_capacity

    def submit(self, job: Job) -> None:
        """Queue a job and wake the loop."""
        job.arrived = self._clock()
        job.state = State.WAITING
        self.waiting.append(job)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(True)

    def cancel(self, job: Job) -> None:
        """Remove a job that has not finished (client gone, stream cut)."""
        if job.state is State.WAITING:
            self.waiting.remove(job)
        elif job.state is State.RUNNING:
            self.running.remove(job)
            self._release(job)
        else:
            return
        self.model_stats(job.model).finished["abort"] += 1
        job.state = State.CANCELLED
        job.event.set()

    def abort_all(self) -> None:
        """Drop every job (shutdown): their handlers end at once instead of finishing."""
        for job in [*self.waiting, *self.running]:
            self.cancel(job)

    def _release(self, job: Job) -> None:
        self.slots -= job.n
        self.kv_used -= job.kv

    async def _pause(self, until: float | None, interruptible: bool = True) -> bool:
        """Sleep until `until` (None: until an arrival); True if an arrival woke us."""
        loop = asyncio.get_running_loop()
        if not interruptible:
            assert until is not None
            await asyncio.sleep(max(until - self._clock(), 0.0))
            return False
        fut: asyncio.Future[bool] = loop.create_future()
        self._wake = fut
        handle = None if until is None else loop.call_at(until, _resolve, fut)
        try:
            return await fut
        finally:
            self._wake = None
            if handle is not None:
                handle.cancel()

    def _admit(self) -> list[Job]:
        admitted: list[Job] = []
        while self.waiting:
            job = self.waiting[0]
            if self.slots + job.n > self.max_batch or self.kv_used + job.kv > self.kv_capacity:
                break  # first come, first served: no overtaking
            self.waiting.popleft()
            job.state = State.RUNNING
            job.cached = self._prefix_cache(job.prompt_text, job.prompt_tokens)
            self.running.append(job)
            self.slots += job.n
            self.kv_used += job.kv
            self.model_stats(job.model).prompt_tokens += job.prompt_tokens
            admitted.append(job)
        return admitted

    async def run(self) -> None:
        """The engine loop; runs until cancelled."""
        self._clock = asyncio.get_running_loop().time
        while True:
            if not self.running and not self.waiting:
                await self._pause(None)
                self._t = self._clock()
                continue
            admitted = self._admit()
            if not self.running:
                await self._pause(None)  # only reachable if capacity shrank; wait for a change
                continue
            step = self._step()
            if admitted:
                self._t = max(self._t, *(job.arrived for job in admitted))
                duration = step + sum(self._prefill_s(job) for job in admitted)
                end = self._t + duration
                await self._pause(end, interruptible=False)
                self._t = end
                self._advance(1, duration)
                continue
            remaining = min(job.target - job.produced for job in self.running)
            now = self._clock()
            due = int((now - self._t) / step)  # steps already owed after a late wake-up
            k = min(remaining, max(1, int(TICK_S / step), due))
            end = self._t + k * step
            if end > now and await self._pause(end):
                # An arrival: finish the step in progress, then admit it.
                k = min(k, int((self._clock() - self._t) / step) + 1)
                end = self._t + k * step
                await self._pause(end, interruptible=False)
            elif end <= now:
                await asyncio.sleep(0)  # let the handlers write what we produce
            self._t = end
            self._advance(k, step)

    def _step(self) -> float:
        """Wall-clock seconds of one decode step of the running batch at its mean context."""
        b = self.slots
        if self._steps is not None:
            return self._steps[b]
        context = sum(j.prompt_tokens + j.produced for j in self.running) / len(self.running)
        return b / self.profile.decode_tokens_per_s(b, context) * self.time_scale

    def _prefill_s(self, job: Job) -> float:
        """Wall-clock seconds to prefill a job's uncached prompt tokens (speed by prompt length)."""
        uncached = job.prompt_tokens - job.cached
        return self.profile.prefill_time_s(uncached) * self.time_scale

    def _advance(self, k: int, step: float) -> None:
        """k steps of `step` seconds happened for everything running."""
        finished = False
        batch = self.slots
        for job in self.running:
            stats = self.model_stats(job.model)
            gained = min(k, job.target - job.produced)
            if job.first_token_at is None:
                job.first_token_at = self._t
                job.batch_seen = batch
                stats.ttft.observe(self._t - job.arrived)
                if gained > 1:
                    stats.itl.observe(step, (gained - 1) * job.n)
            else:
                stats.itl.observe(step, gained * job.n)
            job.produced += gained
            stats.generation_tokens += gained * job.n
            job.event.set()
            if job.produced >= job.target:
                finished = True
        if finished:
            still: list[Job] = []
            for job in self.running:
                if job.produced >= job.target:
                    job.state = State.DONE
                    self._release(job)
                    self.model_stats(job.model).finished[job.finish_reason] += 1
                else:
                    still.append(job)
            self.running = still


def _resolve(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)
