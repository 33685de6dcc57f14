"""Discrete-event simulation of the gateway routing a trace over modelled backends.

Simulated time only: events (arrivals, worker prefill/decode completions, provider
answers, queue expiries, failover retries) are taken from a heap in time order.
The simulated gateway keeps what the real one keeps — in-flight counts, prompt
tokens awaiting a first token, EWMA latency per provider, rate-limit headroom, the
local TTFT prediction error — builds `BackendSnapshot`s from it and asks the policy.
Deterministic for a (trace, seed): all noise is drawn up front per request.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import math
import random
import time
from types import MappingProxyType
from typing import Any, Self

from loadtest.simulate.backends import Job, SimGpu, SimProvider
from loadtest.simulate.results import PolicyResult, SimRequest, meets_slo, summarize
from loadtest.simulate.routers import SimPolicy
from loadtest.simulate.scenario import Scenario, default_scenario
from loadtest.simulate.traces import Trace, TraceRequest
from policies.budget import MissBudget
from policies.headroom import Headroom, mark_429
from policies.latency import (
    ITL_REL_FLOOR_S,
    DecayingRate,
    LatencyEstimate,
    LatencySample,
    RelativeError,
    update,
)
from policies.pricebook import Price
from policies.types import NO_HEADROOM, BackendSnapshot, RouteRequest

MIN_FIT_SAMPLES = 20


def request_noise(
    n: int, seed: int, prefill_sigma: float
) -> list[tuple[tuple[float, float], float]]:
    """Per request: standard-normal draws for provider latency, and the local prefill speed
    factor (lognormal, median 1). Drawn up front so every policy sees the same noise."""
    rng = random.Random(seed * 1_000_003 + 17)
    out = []
    for _ in range(n):
        z = (rng.gauss(0, 1), rng.gauss(0, 1))
        out.append((z, math.exp(prefill_sigma * rng.gauss(0, 1))))
    return out


class Engine:
    """One run of one policy over one trace."""

    def __init__(
        self, scenario: Scenario, trace: Trace, policy: SimPolicy, seed: int, *, processes: int = 1
    ) -> None:
        self.sc = scenario
        self.trace = trace
        self.policy = policy
        self.gpus = {g.name: SimGpu(g.name, g.physics) for g in scenario.locals}
        self.local_specs = {g.name: g for g in scenario.locals}
        self.providers = {p.name: SimProvider(p) for p in scenario.providers}
        self.prices = {
            p.name: Price.per_million(p.input_per_million, p.output_per_million)
            for p in scenario.providers
        }
        self.latency = {
            p.name: LatencyEstimate.prior(p.ttft_median_s, p.itl_median_s)
            for p in scenario.providers
        }
        self.price_version = 0
        self.headroom: dict[str, Headroom] = {p.name: NO_HEADROOM for p in scenario.providers}
        self.inflight = dict.fromkeys([*self.gpus, *self.providers], 0)
        self.pending_prefill = dict.fromkeys(self.gpus, 0)
        # The gateway's own learning (gateway/state/live.py): the cost model's relative error,
        # fading while a worker gets no traffic.
        self.ttft_error = {n: RelativeError() for n in self.gpus}
        self.itl_error = {n: RelativeError() for n in self.gpus}
        self.prompt_rate = {n: DecayingRate() for n in self.gpus}
        self.request_rate = {n: DecayingRate() for n in self.gpus}
        self.prompt_sq_rate = {n: DecayingRate() for n in self.gpus}
        # The gateway's population SLO budget per class (policies.budget); one per process
        # of `serve --workers N` (`processes`), each request on one of them at random (as
        # the kernel spreads connections over the workers' SO_REUSEPORT sockets).
        self.shards = [{c: MissBudget() for c in scenario.slo_classes} for _ in range(processes)]
        spread = random.Random(seed * 7_919 + processes)
        self.shard_of = [spread.randrange(processes) for _ in trace.requests]
        self.queue: list[SimRequest] = []
        self.queued_total = 0
        self.refusals = 0
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.handled = 0  # events handled so far: the run's work
        self.reqs = [
            self._make_req(i, tr, z, noise)
            for i, (tr, (z, noise)) in enumerate(
                zip(
                    trace.requests,
                    request_noise(len(trace.requests), seed, scenario.prefill_noise_sigma),
                    strict=True,
                )
            )
        ]
        # A request is copied on arrival from its record here, which stays as it was: so the
        # requests yet to arrive, like those settled (never changed again), are shared by a
        # run and its forks, and a fork copies only those in between (`fork`).
        self._live: set[int] = set()
        # (arrival time, request) in arrival order (`start`), and how many have arrived.
        self._arrivals = tuple(sorted((tr.t, i) for i, tr in enumerate(trace.requests)))
        self.arrived = 0

    def _make_req(
        self, i: int, tr: TraceRequest, z: tuple[float, float], prefill_noise: float
    ) -> SimRequest:
        sc = self.sc
        slo = sc.slo_classes[tr.slo_class]
        # The gateway does not know the real output length: it plans for a typical one.
        expected = min(tr.max_tokens, sc.expected_output.get(tr.slo_class, 256))
        rr = RouteRequest(
            sc.public_model, tr.prompt_tokens, tr.max_tokens, expected, True, tr.slo_class, slo
        )
        return SimRequest(i, tr, rr, z, prefill_noise)

    # -- event plumbing -------------------------------------------------------------

    def _push(self, t: float, kind: str, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def _schedule_gpu(self, name: str) -> None:
        gpu = self.gpus[name]
        t = gpu.next_event()
        if t is not None:
            self._push(t, "gpu", (name, gpu.version))

    # -- what the gateway knows -----------------------------------------------------

    def snapshots(self, now: float) -> list[BackendSnapshot]:
        """The routing inputs right now."""
        out: list[BackendSnapshot] = []
        for name, spec in self.local_specs.items():
            # As the gateway builds it: the margin is the relative error of the cost
            # model's predictions (shortfalls only), scaled by each request's prediction.
            out.append(
                BackendSnapshot(
                    name,
                    spec.backend_model,
                    is_local=True,
                    ttft_spread_s=0.0,
                    itl_spread_s=0.0,
                    ttft_rel_spread=self.ttft_error[name].spread(now),
                    itl_rel_spread=self.itl_error[name].spread(now),
                    inflight=self.inflight[name],
                    pending_prefill_tokens=self.pending_prefill[name],
                    recent_prompt_tokens_per_s=self.prompt_rate[name].value(now),
                    recent_requests_per_s=self.request_rate[name].value(now),
                    recent_prompt_sq_tokens_per_s=self.prompt_sq_rate[name].value(now),
                    max_concurrency=spec.max_concurrency,
                    gpu=spec.model,
                )
            )
        for p in self.sc.providers:
            est = self.latency[p.name]
            price = self.prices[p.name]
            fit = est.ttft_fit
            # The prompt-aware fit once it has seen enough answers; the plain EWMA before.
            use_fit = fit.count >= MIN_FIT_SAMPLES
            out.append(
                BackendSnapshot(
                    p.name,
                    p.model,
                    price_in_per_token=price.input_per_token,
                    price_out_per_token=price.output_per_token,
                    price_version=self.price_version,
                    ttft_s=fit.intercept if use_fit else est.ttft.mean,
                    ttft_spread_s=fit.spread if use_fit else est.ttft.spread,
                    ttft_per_prompt_token_s=fit.slope if use_fit else 0.0,
                    itl_s=est.itl.mean,
                    itl_spread_s=est.itl.spread,
                    headroom=self.headroom[p.name],
                    inflight=self.inflight[p.name],
                )
            )
        return out

    # -- the population SLO budget ---------------------------------------------------

    @property
    def budgets(self) -> dict[str, MissBudget]:
        """The (first) process's budgets: all of them with one process."""
        return self.shards[0]

    def _budgets(self, r: SimRequest) -> dict[str, MissBudget]:
        """The budgets of the process that serves `r`."""
        return self.shards[self.shard_of[r.i]]

    def _request(self, r: SimRequest, now: float) -> RouteRequest:
        """The request as routing sees it now: with what each class's budget has left."""
        left = MappingProxyType({c: b.left(now) for c, b in self._budgets(r).items()})
        return dataclasses.replace(r.rr, miss_budgets=left)

    def _judged_by(self, r: SimRequest) -> str:
        """The class whose ITL target a local worker is judged by for this request."""
        protect = self.sc.cost_policy.protect_class
        if r.rr.slo.max_itl_s is None and protect is not None and protect in self.sc.slo_classes:
            return protect
        return r.tr.slo_class

    def _settle(self, r: SimRequest, now: float) -> None:
        """A request ended: its class counts a measured miss or not; its charge is lifted;
        a local request of the class judged by its own target is the calibration's evidence.
        Nothing changes the request after this."""
        self._live.discard(r.i)
        own = r.tr.slo_class
        judged = self._judged_by(r)
        missed = not meets_slo(r, self.sc.slo_classes[own])
        budgets = self._budgets(r)
        if r.backend in self.gpus and judged == own:
            budgets[own] = budgets[own].settle(now, r.miss_charge, missed, r.miss_p)
            return
        if r.miss_charge > 0.0:
            budgets[judged] = budgets[judged].settle(now, r.miss_charge, False)
        budgets[own] = budgets[own].settle(now, 0.0, missed)

    # -- the request path -----------------------------------------------------------

    def _route(self, r: SimRequest, now: float, *, may_wait: bool) -> None:
        choice = self.policy.choose(self._request(r, now), self.snapshots(now), now)
        top_local = bool(choice.order) and choice.order[0] in self.gpus
        if may_wait and choice.wait_for_local is not None and not top_local:
            if r.queued_until is None:
                r.queued_until = now + choice.wait_for_local
                self.queued_total += 1
                self._push(r.queued_until, "expire", r)
            self.queue.append(r)
            return
        r.order = choice.order
        r.predicted_ttft_s, r.predicted_itl_s = choice.predicted_ttft_s, choice.predicted_itl_s
        r.miss_p = choice.miss_probability
        self._attempt(r, 0, now)

    def _attempt(self, r: SimRequest, k: int, now: float) -> None:
        tr = r.tr
        while k < len(r.order):
            name = r.order[k]
            gpu = self.gpus.get(name)
            if gpu is not None:
                job = Job(
                    r.i, tr.prompt_tokens, tr.output_tokens, tr.prompt_tokens * r.prefill_noise
                )
                if gpu.submit(job, now):
                    r.backend, r.dispatched_at = name, now
                    if k:
                        r.predicted_ttft_s = r.predicted_itl_s = None
                        r.miss_p = 0.0
                    elif r.miss_p > 0.0:
                        cls, budgets = self._judged_by(r), self._budgets(r)
                        r.miss_charge = budgets[cls].charge(r.miss_p)
                        budgets[cls] = budgets[cls].admit(r.miss_charge)
                    self.inflight[name] += 1
                    self.pending_prefill[name] += tr.prompt_tokens
                    self.prompt_rate[name] = self.prompt_rate[name].add(tr.prompt_tokens, now)
                    self.request_rate[name] = self.request_rate[name].add(1, now)
                    self.prompt_sq_rate[name] = self.prompt_sq_rate[name].add(
                        float(tr.prompt_tokens) ** 2, now
                    )
                    self._schedule_gpu(name)
                    return
            else:
                prov = self.providers[name]
                ans = prov.attempt(tr.prompt_tokens, tr.max_tokens, tr.output_tokens, r.z, now)
                if ans.ok:
                    r.miss_p = 0.0
                    if ans.headroom is not NO_HEADROOM and ans.headroom.observed_at is not None:
                        self.headroom[name] = ans.headroom
                    r.backend, r.dispatched_at = name, now
                    r.first_token_at = now + ans.ttft_s
                    r.done_at = now + ans.total_s
                    r.cost_usd = self.prices[name].cost(tr.prompt_tokens, tr.output_tokens)
                    self.inflight[name] += 1
                    self._push(r.done_at, "ext_done", r)
                    return
                self.headroom[name] = mark_429(ans.headroom, ans.retry_after_s, now)
            # Refused (worker queue full / 429): the next backend, after a short delay.
            self.refusals += 1
            self._push(now + self.sc.failover_delay_s, "retry", (r, k + 1))
            return
        r.failed = True
        r.miss_p = 0.0
        self._settle(r, now)

    def _drain_queue(self, now: float) -> None:
        """Local capacity freed: let queued requests that can now go local go (FIFO)."""
        while self.queue:
            r = self.queue[0]
            choice = self.policy.choose(self._request(r, now), self.snapshots(now), now)
            if not choice.order or choice.order[0] not in self.gpus:
                return
            self.queue.pop(0)
            r.order = choice.order
            r.predicted_ttft_s, r.predicted_itl_s = choice.predicted_ttft_s, choice.predicted_itl_s
            r.miss_p = choice.miss_probability
            self._attempt(r, 0, now)

    def _on_gpu(self, name: str, now: float) -> None:
        gpu = self.gpus[name]
        freed = False
        for ev in gpu.fire(now):
            r = self.reqs[ev.job.rid]
            if ev.kind == "first_token":
                r.first_token_at = now
                self.pending_prefill[name] -= r.tr.prompt_tokens
                if r.predicted_ttft_s is not None:
                    self.ttft_error[name] = self.ttft_error[name].update(
                        r.predicted_ttft_s, now - r.dispatched_at, now, self.sc.ewma_alpha
                    )
            else:
                r.done_at = now
                self.inflight[name] -= 1
                n = r.tr.output_tokens
                if r.predicted_itl_s is not None and n > 1 and r.first_token_at is not None:
                    self.itl_error[name] = self.itl_error[name].update(
                        r.predicted_itl_s,
                        (now - r.first_token_at) / (n - 1),
                        now,
                        self.sc.ewma_alpha,
                        ITL_REL_FLOOR_S,
                    )
                r.chargeback_usd = self.local_specs[name].model.attributed_cost(
                    r.tr.prompt_tokens,
                    r.tr.output_tokens,
                    gpu.batch_seen(ev.job),
                    context=r.tr.prompt_tokens + r.tr.output_tokens / 2,
                )
                self._settle(r, now)
                freed = True
        self._schedule_gpu(name)
        if freed and self.queue:
            self._drain_queue(now)

    def _on_ext_done(self, r: SimRequest) -> None:
        assert r.backend is not None and r.first_token_at is not None and r.done_at is not None
        self._settle(r, r.done_at)
        self.inflight[r.backend] -= 1
        ttft = r.first_token_at - r.dispatched_at
        n = r.tr.output_tokens
        itl = (r.done_at - r.first_token_at) / (n - 1) if n > 1 else None
        self.latency[r.backend] = update(
            self.latency[r.backend],
            LatencySample(ttft, itl, r.tr.prompt_tokens),
            self.sc.ewma_alpha,
        )

    def start(self) -> None:
        """Put the price changes on the event heap (once); the arrivals are the trace itself.

        The arrivals are not on the heap but read off the time-ordered trace, each before any
        heap event at the same time (as when they were pushed first, with the lowest sequence
        numbers, which they keep): the same order, and a heap that holds only what is under
        way, so `fork` copies little."""
        self.seq += len(self.reqs)
        for ch in self.sc.price_changes:
            if ch.backend in self.prices:
                self._push(ch.at_s, "price", ch)

    def advance(self, until: float = math.inf) -> None:
        """Handle, in time order, every event before `until` (all of them by default).

        Stopped there, the run stands between two events: nothing that happens at or after
        `until` has been decided yet, so `fork` can copy it and a copy can go on differently
        (the hindsight schedule resumes its trials so, `simulate.schedule`)."""
        arrivals, events = self._arrivals, self.events
        while True:
            a = self.arrived
            t_arrive = arrivals[a][0] if a < len(arrivals) else math.inf
            if events and events[0][0] < t_arrive:
                if events[0][0] >= until:
                    return
                now, _, kind, payload = heapq.heappop(events)
            elif t_arrive < until:
                now, kind, payload = t_arrive, "arrive", self.reqs[arrivals[a][1]]
                self.arrived += 1
            else:
                return
            self.handled += 1
            if kind == "arrive":
                r = self.reqs[payload.i] = payload.copy()
                self._live.add(r.i)
                cls, budgets = r.tr.slo_class, self._budgets(r)
                budgets[cls] = budgets[cls].count(now)
                self._route(r, now, may_wait=True)
            elif kind == "gpu":
                name, version = payload
                if self.gpus[name].version == version:
                    self._on_gpu(name, now)
            elif kind == "price":
                self.prices[payload.backend] = Price.per_million(
                    payload.input_per_million, payload.output_per_million
                )
                self.price_version += 1
            elif kind == "ext_done":
                self._on_ext_done(payload)
            elif kind == "retry":
                r, k = payload
                self._attempt(r, k, now)
            elif kind == "expire":
                r = payload
                if r in self.queue:
                    self.queue.remove(r)
                    self._route(r, now, may_wait=False)

    def fork(self) -> Self:
        """An independent copy of this run as it stands (between two events, see `advance`).

        The inputs (scenario, trace, noise, which process serves whom) are shared, and so are
        the requests yet to arrive and those settled (neither changes: a request is copied on
        arrival and not touched once settled); everything else a run changes is copied: the
        requests under way, the workers and their jobs, the providers' token buckets, what the
        gateway has learned, the budgets, the queue and the event heap (its payloads pointing
        at the copied requests, its order unchanged, so the copy handles the same events in
        the same order as the original would). The learned state and budgets are immutable
        values: copying their dicts copies them. The policy is deep-copied (a planned run's is
        stateless). Measured halfway through 70b-vs-groq / tpm-limited-8b (2,013 / 15,780
        requests): a fork takes 0.04 / 0.14 ms, `copy.deepcopy` of the engine (the inputs
        memoized: unmemoized it fails on the scenario's mappingproxy) 56 / 480 ms, a whole
        planned run 89 / 752 ms."""
        new = copy.copy(self)
        reqs = list(self.reqs)
        for i in self._live:
            reqs[i] = reqs[i].copy()
        new.reqs = reqs
        new._live = set(self._live)
        new.policy = copy.deepcopy(self.policy)
        new.gpus = {n: g.fork() for n, g in self.gpus.items()}
        new.providers = {n: copy.copy(p) for n, p in self.providers.items()}
        new.prices = dict(self.prices)
        new.latency = dict(self.latency)
        new.headroom = dict(self.headroom)
        new.inflight = dict(self.inflight)
        new.pending_prefill = dict(self.pending_prefill)
        new.ttft_error = dict(self.ttft_error)
        new.itl_error = dict(self.itl_error)
        new.prompt_rate = dict(self.prompt_rate)
        new.request_rate = dict(self.request_rate)
        new.prompt_sq_rate = dict(self.prompt_sq_rate)
        new.shards = [dict(s) for s in self.shards]
        new.queue = [reqs[r.i] for r in self.queue]
        new.events = [(t, seq, kind, _moved(p, reqs)) for t, seq, kind, p in self.events]
        return new

    def finish(self) -> PolicyResult:
        """The summary of a run advanced to its end."""
        return summarize(self)

    def run(self) -> PolicyResult:
        """Simulate the whole trace and summarize."""
        started = time.perf_counter()
        self.start()
        self.advance()
        result = self.finish()
        result.wall_s = time.perf_counter() - started
        return result


def _moved(payload: Any, reqs: list[SimRequest]) -> Any:
    """An event's payload pointing at `reqs` (a fork's requests) instead of the original's."""
    if isinstance(payload, SimRequest):
        return reqs[payload.i]
    if isinstance(payload, tuple) and payload and isinstance(payload[0], SimRequest):
        return (reqs[payload[0].i], *payload[1:])
    return payload  # a worker's (name, version) or a price change: values


def simulate(
    trace: Trace, policies: list[SimPolicy], seed: int, scenario: Scenario | None = None
) -> list[PolicyResult]:
    """Run every policy over the same trace and noise."""
    sc = scenario if scenario is not None else default_scenario()
    return [Engine(sc, trace, p, seed).run() for p in policies]
