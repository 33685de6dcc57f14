"""Per-backend predictions for one request: cost, TTFT, ITL, total, and whether the SLO holds."""

from __future__ import annotations

from policies.costmodel import GpuModel
from policies.latency import ITL_REL_FLOOR_S, REL_FLOOR_S
from policies.types import BackendSnapshot, Candidate, RouteRequest, Slo
from policies.worker_signals import pressured_load, ttft_with_queue

# A worker whose KV cache is this full admits nothing new until requests finish.
KV_FULL = 0.98
# A population budget never sends a request where it is predicted likelier to miss than not.
POOLED_MAX_P = 0.5
# On a worker whose chunked-prefill step is more than this many times a request's ITL
# target, a prompt's own prefill can stall the requests decoding beside it past what they
# absorb, and the stall is priced (`stall_misses`). Measured 2026-12-06: the 70B pair
# (0.197 s steps, 3.9x the 50 ms target) needs it (admitting long prompts on their own ITL
# alone cost 70b-vs-together its 99%: 98.82%). On the 8B profiles (0.05-0.10 s, 1-2x) it is
# mixed: priced there too, bursty / diurnal / price-cut-8b -1.1 to -1.6%, steady-8b +1.4%
# (past all-local by more than the 1% tie), tpm-limited-8b +3.7%: not priced there.
STALL_STEP_RATIO = 3.0
# Expected misses among the running decodes one admission's prefill may cause without the
# class's miss budget covering them; more, and the request goes elsewhere. Chosen on the
# shipped 70B pair (0.05: 70b-vs-together $0.6808/M; 0.1-0.2: $0.6370-0.6425 at 99.3%;
# 0.35-0.75: 98.8-98.9%), then measured on 90 held-out scenarios (docs/economics.md).
STALL_FREE_MISSES = 0.15


def local_load(s: BackendSnapshot) -> int:
    """Requests already on a local worker: the gateway's own count, or the scrape if fresh and higher.

    The worker may serve other clients too, so a fresh scrape can only add to what the
    gateway knows; a stale one is ignored.
    """
    load = s.inflight
    if s.metrics_fresh:
        worker = s.running + s.queued
        load = max(load, worker)
        if s.gpu is not None and s.kv_usage is not None and s.kv_usage >= KV_FULL:
            # A full KV cache admits nothing: the next request waits like one past max_batch.
            load = max(load, s.gpu.max_batch)
    return load


def stalled_arrivals(request: RouteRequest, s: BackendSnapshot, over_s: float) -> float | None:
    """The protected requests a delay-tolerant request's prefill is expected to push past
    their TTFT bound on local worker `s`, when its predicted TTFT is `over_s` past that bound;
    None when the worker is busy without it.

    A worker prefills in arrival order (chunked prefill gives a running prefill the chunk
    budget before a new prompt), so a request that arrives while this prompt prefills waits
    for it: the arrivals of the first `over_s` seconds miss, at most those of its whole
    prefill time. If the queue ahead of it is already past the bound (`over_s` longer than
    its own prefill), protected traffic needs this worker: it is busy, not stalled by us.
    Every recent arrival counts as a protected one (an upper bound).
    """
    gpu = s.gpu
    if gpu is None:
        return None
    own = gpu.prefill_time_s(request.prompt_tokens)
    if over_s > own:
        return None
    return s.recent_requests_per_s * over_s


def prefill_burst_s(
    request: RouteRequest,
    s: BackendSnapshot,
    gpu: GpuModel,
    itl_target_s: float | None,
    own_s: float | None = None,
) -> float:
    """One prefill burst's length, for the variance of the prefill load `request` sees.

    For a request judged by its own ITL target: the size-biased mean of the prompts the
    worker was sent recently (E[x^2] / E[x], `recent_prompt_sq_tokens_per_s` over
    `recent_prompt_tokens_per_s`) when that is shorter than its own prompt. Its own prompt
    is prefilled before it decodes and says nothing about the prompts that will stall it:
    judged by it the 8B fleets spilled long interactive prompts that ran at a third of
    their ITL target (tpm-limited-8b: predicted 55-62 ms, ran at 8-29 ms). What its own
    prefill does to the requests decoding beside it is `stall_misses`. Guarded work (judged
    by the protected class's target), and any request before a rate is known: its own
    (`own_s` when the caller has its prefill time already).
    """
    sq = s.recent_prompt_sq_tokens_per_s
    if (
        sq > 0.0
        and itl_target_s is not None
        and request.slo.max_itl_s is not None
        and s.recent_prompt_tokens_per_s > 0.0
    ):
        biased = sq / s.recent_prompt_tokens_per_s
        if biased < request.prompt_tokens:
            return gpu.prefill_time_s(biased)
    return gpu.prefill_time_s(request.prompt_tokens) if own_s is None else own_s


def stall_misses(
    gpu: GpuModel,
    running: int,
    own_s: float,
    itl_s: float,
    target_s: float,
    prompt_tokens_per_s: float,
    burst_s: float,
    exposed_s: float,
    base_p: float,
) -> float:
    """Expected ITL misses a prefill of `own_s` seconds adds among the `running` requests
    decoding on a local worker.

    Its prefill falls inside the decode of every one of them. Each is taken as a typical
    one: decode-only ITL `itl_s`, exposed `exposed_s` seconds, stalled by the prompts
    arriving at `prompt_tokens_per_s` in bursts of `burst_s` (the size-biased mean prompt),
    judged by `target_s` (every one: an upper bound where delay-tolerant work runs beside),
    missing with probability `base_p` without this prefill. With it known to lie in the
    decode (`GpuModel.itl_miss_probability`'s `extra_s`) less `base_p`, times how many run.
    """
    if running <= 0 or own_s <= 0.0:
        return 0.0
    hit = gpu.itl_miss_probability(itl_s, target_s, prompt_tokens_per_s, burst_s, exposed_s, own_s)
    return running * (hit - base_p) if hit > base_p else 0.0


def external_cost(request: RouteRequest, s: BackendSnapshot) -> float:
    """List price x the request's expected tokens on an external backend."""
    return (
        request.prompt_tokens * s.price_in_per_token
        + request.expected_output_tokens * s.price_out_per_token
    )


def predict(
    request: RouteRequest,
    s: BackendSnapshot,
    now: float,
    sigmas: float,
    guard: Slo | None = None,
    displaced_usd: float | None = None,
    budget: float = 0.0,
) -> Candidate:
    """What sending `request` to `s` is predicted to cost and take, judged against its SLO.

    With a `guard`, a local worker must also be within the guard's TTFT and ITL bounds:
    delay-tolerant work keeps out of a worker that protected traffic needs. A local
    worker's cost is its marginal cost (`GpuModel.marginal_cost`): `displaced_usd` is the
    price of the work it may displace (the cheapest external candidate for this request's
    expected tokens); None (no external candidate) prices it at the GPU's own cost of these
    tokens at b*.

    A local worker's ITL is judged at the TAIL_Z quantile of the prefill load the request
    sees (a miss probability of at most TAIL_P); with a population `budget` (SLO misses
    the ITL target's class can still afford, `policies.budget`) a request whose predicted
    miss probability is within the budget is admitted too (docs/economics.md). On a worker
    whose chunked-prefill step is long against the target (STALL_STEP_RATIO), a request
    whose own prefill is expected to cost the decodes running there more than
    STALL_FREE_MISSES misses, and more than the budget, is not admitted (`stall_misses`).
    """
    out = request.expected_output_tokens
    gpu = s.gpu
    batch = 0
    b_star = 0
    p_miss = 0.0
    decode_stall = 0.0
    own = 0.0
    pooled = False
    if gpu is not None:
        fresh = s.metrics_fresh
        # The request's mean context while it decodes stands for the batch's.
        context = request.prompt_tokens + out / 2
        mean_rate = rate = s.recent_prompt_tokens_per_s
        # Its own prefill time and the load already there, each worked out once.
        own = gpu.prefill_time_s(request.prompt_tokens)
        there = local_load(s)
        burst = exposed = 0.0
        # The batch it joins and its decode-only and mean-load ITL there (`itl_under_load_s`),
        # kept for the ITL below when that is at the same batch (most of the time).
        exposed_at = min(there + 1, gpu.max_batch)
        itl_at = mean_itl_at = 0.0
        if rate > 0:
            # The prompts prefilled while this request decodes stall it (`prefill_burst_s`
            # says how long one is); its mean decode time at the mean load says how long it
            # is exposed.
            itl_at = gpu.itl_s(exposed_at, context)
            mean_itl_at = gpu.mixed_itl(itl_at, gpu.prefill_load(rate))
            exposed = max(out - 1, 1) * mean_itl_at
            burst = prefill_burst_s(request, s, gpu, request.slo.max_itl_s, own)
            rate = gpu.tail_prompt_rate(rate, burst, exposed)
        target = request.slo.max_itl_s
        if target is None and guard is not None:
            target = guard.max_itl_s
        # The KV cache may hold fewer sequences of this size than max_batch.
        slots = gpu.batch_cap(request.prompt_tokens + out)
        b_star = min(gpu.slo_batch(target, rate, context), slots)
        # A worker that preempts (or queues for KV room) is at the batch its memory holds.
        load = pressured_load(there, b_star, fresh and s.preempting)
        queued_prefill = s.pending_prefill_tokens
        if s.metrics_fresh and s.queued:
            # Prompts of requests queued by other clients are unknown; ours stands in for them.
            queued_prefill = max(queued_prefill, s.queued * request.prompt_tokens)
        ttft = gpu.predicted_ttft_s(
            request.prompt_tokens,
            load=load,
            queued_prefill_tokens=queued_prefill,
            expected_output_tokens=out,
            slots=slots,
            own_prefill_s=own,
        )
        if fresh:
            ttft = ttft_with_queue(ttft, s.queue_wait_s, s.queued, own)
        batch = load + 1
        running = batch if batch <= slots else slots
        # Decode-only ITL at this batch, then under the tail prefill load (`itl_under_load_s`).
        same = mean_rate > 0 and running == exposed_at
        itl0 = itl_at if same else gpu.itl_s(running, context)
        itl = gpu.mixed_itl(itl0, gpu.prefill_load(rate)) if rate > 0 else itl0
        if target is not None:
            # The margin of the mean-load ITL comes off the target; the rest is the
            # prefill share's spread (`GpuModel.itl_miss_probability`).
            if same:
                mean_itl = mean_itl_at
            elif mean_rate > 0:
                mean_itl = gpu.mixed_itl(itl0, gpu.prefill_load(mean_rate))
            else:
                mean_itl = itl0
            margin = sigmas * (s.itl_spread_s + s.itl_rel_spread * (mean_itl + ITL_REL_FLOOR_S))
            p_miss = gpu.itl_miss_probability(itl0, target - margin, mean_rate, burst, exposed)
            long_step = gpu.mixed_step_s > STALL_STEP_RATIO * target
            running = min(there, gpu.max_batch) if long_step and mean_rate > 0 else 0
            if running:
                # What its own prefill does to the decodes already there (`stall_misses`):
                # judged like this request, by the prompts the worker is sent. A burst other
                # than its own prefill is that size-biased prompt's already (`prefill_burst_s`).
                sq = s.recent_prompt_sq_tokens_per_s
                others = burst
                if burst == own:
                    others = gpu.prefill_time_s(sq / mean_rate) if sq > 0.0 else own
                base = p_miss
                if others != burst:
                    base = gpu.itl_miss_probability(
                        itl0, target - margin, mean_rate, others, exposed
                    )
                decode_stall = stall_misses(
                    gpu, running, own, itl0, target - margin, mean_rate, others, exposed, base
                )
            pooled = p_miss <= budget and p_miss < POOLED_MAX_P
            if pooled and batch > b_star:
                # Admitted on the budget: the batch the SLO allows is the mean load's.
                b_star = min(gpu.slo_batch(target, mean_rate, context), slots)
        if displaced_usd is None:
            displaced_usd = gpu.amortized_cost(request.prompt_tokens, out, max(b_star, 1), context)
        cost = gpu.marginal_cost(batch, b_star, displaced_usd)
    else:
        ttft = s.ttft_s + s.ttft_per_prompt_token_s * request.prompt_tokens
        itl = s.itl_s
        cost = external_cost(request, s)
    decode = out - 1 if out > 1 else 0
    total = ttft + decode * itl

    slo = request.slo
    reason = ""
    ttft_margin = sigmas * s.ttft_spread_s
    itl_margin = sigmas * s.itl_spread_s
    if s.ttft_rel_spread:
        ttft_margin += sigmas * s.ttft_rel_spread * (ttft + REL_FLOOR_S)
    if s.itl_rel_spread:
        itl_margin += sigmas * s.itl_rel_spread * (itl + ITL_REL_FLOOR_S)
    if slo.max_ttft_s is not None and ttft + ttft_margin > slo.max_ttft_s:
        reason = f"ttft {ttft:.2f}+{ttft_margin:.2f}s > {slo.max_ttft_s:g}s"
    elif slo.max_itl_s is not None and itl + itl_margin > slo.max_itl_s and not pooled:
        reason = f"itl {itl * 1000:.1f}+{itl_margin * 1000:.1f}ms > {slo.max_itl_s * 1000:g}ms"
    elif decode_stall > STALL_FREE_MISSES and decode_stall > budget and gpu is not None:
        reason = (
            f"stall: its {own:.2f}s prefill costs the"
            f" decodes running {decode_stall:.2f} misses > budget {budget:.2f}"
        )
    elif (
        slo.max_total_s is not None and total + ttft_margin + decode * itl_margin > slo.max_total_s
    ):
        reason = f"total {total:.1f}s > {slo.max_total_s:g}s"
    elif request.deadline is not None and now + total > request.deadline:
        reason = f"misses deadline by {now + total - request.deadline:.1f}s"
    elif guard is not None and gpu is not None:
        if guard.max_ttft_s is not None and ttft + ttft_margin > guard.max_ttft_s:
            stall = stalled_arrivals(request, s, ttft + ttft_margin - guard.max_ttft_s)
            if stall is None or p_miss + stall > budget:
                reason = (
                    f"busy: ttft {ttft:.2f}+{ttft_margin:.2f}s > {guard.max_ttft_s:g}s (protected)"
                )
            else:
                # Admitted on the protected class's budget, charged the arrivals it holds up.
                p_miss += stall
        if (
            not reason
            and guard.max_itl_s is not None
            and itl + itl_margin > guard.max_itl_s
            and not (pooled and p_miss <= budget and slo.max_itl_s is None)
        ):
            reason = (
                f"busy: itl {itl * 1000:.1f}+{itl_margin * 1000:.1f}ms"
                f" > {guard.max_itl_s * 1000:g}ms (protected)"
            )
    return Candidate(s.name, cost, ttft, itl, total, not reason, reason, batch, b_star, p_miss)
