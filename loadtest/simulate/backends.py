"""Modelled backends in simulated time: a fluid model of a GPU worker and an external provider.

The GPU worker runs on `GpuPhysics` (measured rates, chunked-prefill steps, KV capacity),
not on the router's cost model: prompts are prefilled one after another (FIFO) with a
per-request speed noise the router does not know; while a prefill runs, every step
also carries the running requests' decode tokens and lasts as the physics says; all
running requests advance one token per step. Between events all rates are constant,
so the state jumps from event to event.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections import deque
from dataclasses import dataclass, field

from loadtest.simulate.physics import GpuPhysics
from policies.headroom import Headroom
from policies.types import NO_HEADROOM

_EPS_TOKENS = 1e-6


@dataclass(slots=True)
class Job:
    """One request inside a simulated worker."""

    rid: int
    prompt_tokens: int
    output_tokens: int
    # Effective prompt work (prompt tokens x speed noise).
    prefill_work: float
    remaining: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    # The worker's batch-time integral when this job started decoding, for chargeback.
    joined_batch_s: float = 0.0
    joined_at: float = 0.0

    def copy(self) -> Job:
        """An independent copy (for `SimGpu.fork`)."""
        return Job(
            self.rid,
            self.prompt_tokens,
            self.output_tokens,
            self.prefill_work,
            self.remaining,
            self.first_token_at,
            self.finished_at,
            self.joined_batch_s,
            self.joined_at,
        )

    @property
    def kv_need(self) -> int:
        """KV-cache tokens the request holds by its end."""
        return self.prompt_tokens + self.output_tokens

    @property
    def mean_context(self) -> float:
        """Its context length halfway through decoding (what its attention reads on average)."""
        return self.prompt_tokens + self.output_tokens / 2


@dataclass(slots=True)
class WorkerEvent:
    """Something a worker reports to the engine."""

    kind: str  # "first_token" | "done"
    job: Job
    at: float


@dataclass
class SimGpu:
    """A local GPU worker (vLLM-like continuous batching) as a fluid queueing model."""

    name: str
    physics: GpuPhysics
    max_waiting: int = 1024
    t: float = 0.0
    v: float = 0.0  # decode tokens each running request has produced since t=0
    prefill: deque[Job] = field(default_factory=deque)
    waiting: deque[Job] = field(default_factory=deque)
    running: list[tuple[float, int, Job]] = field(default_factory=list)
    busy_s: float = 0.0
    batch_s: float = 0.0
    tokens_out: int = 0
    version: int = 0
    # When the last request finished: a GPU is held at least until then.
    last_done: float = 0.0
    # Sum over running requests of their mean context (prompt + half the output).
    _context_sum: float = 0.0
    # Prompt + output tokens of everything admitted (prefilling or running): the KV cache.
    kv_tokens: int = 0
    _rates_at: int = -1
    _rates: tuple[float, float] = (0.0, 0.0)

    def fork(self) -> SimGpu:
        """An independent copy of the worker as it stands, its jobs copied (`Engine.fork`)."""
        new = copy.copy(self)
        new.prefill = deque(j.copy() for j in self.prefill)
        new.waiting = deque(j.copy() for j in self.waiting)
        # A heap stays a heap under an order-preserving copy.
        new.running = [(at, rid, j.copy()) for at, rid, j in self.running]
        return new

    def load(self) -> int:
        """Requests on the worker: running, prefilling and waiting for a slot."""
        return len(self.running) + len(self.prefill) + len(self.waiting)

    def rates(self) -> tuple[float, float]:
        """(prefill tokens/s, decode tokens/s per running request) right now."""
        if self._rates_at == self.version:
            return self._rates
        ph = self.physics
        b = len(self.running)
        ctx = self._context_sum / b if b else 0.0
        if self.prefill:
            head = self.prefill[0].prompt_tokens
            if b:
                step, chunk = ph.mixed_step(b, ctx, head)
                rates = (chunk / step, 1.0 / step)
            else:
                rates = (ph.prefill_tokens_per_s(head), 0.0)
        else:
            rates = (0.0, 1.0 / ph.decode_step_s(b, ctx) if b else 0.0)
        self._rates_at, self._rates = self.version, rates
        return rates

    def advance(self, now: float) -> None:
        """Move the fluid state to `now` (no event may lie in between)."""
        dt = now - self.t
        if dt <= 0:
            return
        pre, dec = self.rates()
        if self.prefill:
            self.prefill[0].remaining -= pre * dt
        if self.running:
            self.v += dec * dt
            self.batch_s += len(self.running) * dt
        if self.prefill or self.running:
            self.busy_s += dt
        self.t = now

    def next_event(self) -> float | None:
        """Time of the next prefill completion or decode completion."""
        pre, dec = self.rates()
        best = math.inf
        if self.prefill and pre > 0:
            best = self.t + max(self.prefill[0].remaining, 0.0) / pre
        if self.running and dec > 0:
            best = min(best, self.t + max(self.running[0][0] - self.v, 0.0) / dec)
        return None if math.isinf(best) else best

    def _fits(self, job: Job) -> bool:
        ph = self.physics
        held = len(self.running) + len(self.prefill)
        if held >= ph.max_batch:
            return False
        cap = ph.kv_capacity_tokens
        # An empty worker takes anything (else a too-long request would wait forever).
        return cap is None or held == 0 or self.kv_tokens + job.kv_need <= cap

    def _admit(self, job: Job) -> None:
        self.prefill.append(job)
        self.kv_tokens += job.kv_need

    def submit(self, job: Job, now: float) -> bool:
        """Accept a request; False when the worker's queue is full (it answers 503)."""
        self.advance(now)
        job.remaining = job.prefill_work
        if not self.waiting and self._fits(job):
            self._admit(job)
        elif len(self.waiting) < self.max_waiting:
            self.waiting.append(job)
        else:
            return False
        self.version += 1
        return True

    def batch_seen(self, job: Job) -> float:
        """Mean batch size over a finished job's decode time (1 if it never decoded)."""
        if job.finished_at is None or job.finished_at <= job.joined_at:
            return 1.0
        return (self.batch_s - job.joined_batch_s) / (job.finished_at - job.joined_at)

    def fire(self, now: float) -> list[WorkerEvent]:
        """Handle whatever completes at `now`; the engine calls this at `next_event()`."""
        self.advance(now)
        out: list[WorkerEvent] = []
        if self.prefill and self.prefill[0].remaining <= _EPS_TOKENS:
            job = self.prefill.popleft()
            job.first_token_at = now
            out.append(WorkerEvent("first_token", job, now))
            if job.output_tokens <= 1:
                job.finished_at = now
                self.kv_tokens -= job.kv_need
                out.append(WorkerEvent("done", job, now))
            else:
                job.joined_batch_s = self.batch_s
                job.joined_at = now
                self._context_sum += job.mean_context
                heapq.heappush(self.running, (self.v + job.output_tokens - 1, job.rid, job))
        # Decode completions may land together (same finishing step); tolerate float drift.
        while self.running and self.running[0][0] <= self.v + 1e-9 * max(1.0, self.v):
            _, _, job = heapq.heappop(self.running)
            job.finished_at = now
            self._context_sum -= job.mean_context
            self.kv_tokens -= job.kv_need
            out.append(WorkerEvent("done", job, now))
        if not self.running:
            self._context_sum = 0.0  # no float residue
        for ev in out:
            if ev.kind == "done":
                self.tokens_out += ev.job.output_tokens
                self.last_done = now
        while self.waiting and self._fits(self.waiting[0]):
            self._admit(self.waiting.popleft())
        self.version += 1
        return out


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """An external provider's prices and latency (lognormal around the medians)."""

    name: str
    model: str
    input_per_million: float
    output_per_million: float
    ttft_median_s: float
    ttft_sigma: float
    prefill_tokens_per_s: float
    itl_median_s: float
    itl_sigma: float
    # Tokens per minute before it answers 429 (None: unlimited); counted as prompt + max_tokens.
    tpm_limit: int | None = None


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """What one attempt at a provider produced."""

    ok: bool
    ttft_s: float = 0.0
    total_s: float = 0.0
    headroom: Headroom = NO_HEADROOM
    retry_after_s: float | None = None


@dataclass
class SimProvider:
    """An external provider with lognormal latency and an optional token bucket (TPM limit).

    The bucket holds `tpm_limit` tokens and refills at `tpm_limit / 60` per second; a
    request takes prompt + max_tokens from it. Headers report the level and the time
    until the bucket is full again, as OpenAI-style `x-ratelimit-*` headers do.
    """

    spec: ProviderSpec
    _level: float | None = None
    _at: float = 0.0

    def has_room(self, prompt_tokens: int, max_tokens: int, now: float) -> bool:
        """Would `attempt` at `now` be served rather than refused (429)? Changes nothing."""
        limit = self.spec.tpm_limit
        if limit is None:
            return True
        level = limit if self._level is None else self._level + limit / 60.0 * (now - self._at)
        return min(float(limit), level) >= prompt_tokens + max_tokens

    def attempt(
        self,
        prompt_tokens: int,
        max_tokens: int,
        output_tokens: int,
        z: tuple[float, float],
        now: float,
    ) -> ProviderAnswer:
        """Serve (or refuse with 429) a request; `z` are standard-normal draws for its latency."""
        s = self.spec
        headroom = NO_HEADROOM
        limit = s.tpm_limit
        if limit is not None:
            rate = limit / 60.0
            level = limit if self._level is None else self._level
            level = min(float(limit), level + rate * (now - self._at))
            self._at = now
            need = prompt_tokens + max_tokens
            if level < need:
                self._level = level
                return ProviderAnswer(
                    False,
                    headroom=self._headroom(level, now),
                    retry_after_s=(need - level) / rate,
                )
            self._level = level - need
            headroom = self._headroom(self._level, now)
        ttft = (s.ttft_median_s + prompt_tokens / s.prefill_tokens_per_s) * math.exp(
            s.ttft_sigma * z[0]
        )
        itl = s.itl_median_s * math.exp(s.itl_sigma * z[1])
        return ProviderAnswer(True, ttft, ttft + max(output_tokens - 1, 0) * itl, headroom)

    def _headroom(self, level: float, now: float) -> Headroom:
        limit = self.spec.tpm_limit
        assert limit is not None
        return Headroom(
            limit_tokens=limit,
            remaining_tokens=int(level),
            reset_tokens_at=now + (limit - level) / (limit / 60.0),
            observed_at=now,
        )
