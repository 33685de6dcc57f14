"""neogate's pure routing core: frozen values in, a ranked `RouteDecision` out; no I/O, no clock.

Public API (values are frozen, slotted dataclasses; times are absolute on the caller's
clock, e.g. time.monotonic(); money in USD; latency in seconds):

policies.types
    Slo(max_ttft_s=None, max_itl_s=None, max_total_s=None, max_queue_wait_s=0.0)
        Slo.from_spec(SloClassSpec) -> Slo                    # once, at config load
    RouteRequest(model, prompt_tokens, max_output_tokens, expected_output_tokens, stream,
                 slo_class, slo: Slo, deadline: float | None = None, tenant: str = "")
    BackendSnapshot(name, backend_model, is_local=False, healthy=True,
                    price_in_per_token=0.0, price_out_per_token=0.0,
                    price_cached_in_per_token=None, price_version=0,
                    ttft_s=0.5, ttft_spread_s=0.0, ttft_per_prompt_token_s=0.0,
                    itl_s=0.02, itl_spread_s=0.0, ttft_rel_spread=0.0, itl_rel_spread=0.0,
                    headroom: Headroom = NO_HEADROOM,
                    running=0, queued=0, kv_usage=None, metrics_fresh=False,
                    inflight=0, pending_prefill_tokens=0, recent_prompt_tokens_per_s=0.0,
                    max_concurrency=None, gpu: GpuModel | None = None)
    Candidate(backend, predicted_cost_usd, predicted_ttft_s, predicted_itl_s,
              predicted_total_s, meets_slo, reason="", predicted_batch=0, slo_batch=0)
    RouteDecision(candidates: tuple[Candidate, ...], reason: str, price_version: int,
                  policy: str, rejected: tuple[tuple[str, str], ...] = (),
                  wait_for_local: float | None = None, alternative: str | None = None,
                  alternative_cost_usd: float | None = None)  .chosen -> Candidate | None

policies.select
    compile_policy(spec: PolicySpec, slo_classes: Mapping[str, SloClassSpec | Slo] | None
                   = None) -> Policy        # CostPolicy | LatencyPolicy | WeightedPolicy |
                                            # PinnedPolicy; once per config, not per request
    select(request, snapshots, policy: PolicySpec | Policy, now, *, rng_value=0.5)
        -> RouteDecision                    # rng_value in [0, 1): the weighted pick
policies.profile
    Profile.from_spec(ThroughputProfileSpec) .decode_tokens_per_s(batch, context=None)
        .prefill_tokens_per_s(prompt) .prefill_time_s(prompt) .reference_context
    parse_profile(yaml_text) -> ThroughputProfileSpec   # reading files: gateway.profiles
policies.costmodel
    GpuModel.from_spec(GpuSpec) / GpuModel.from_profile(profile, price_per_hour, mode)
    .throughput(batch, context=None) .itl_s(batch, context=None)
    .itl_under_load_s(batch, prompt_tokens_per_s, context=None)
    .slo_batch(max_itl_s, prompt_tokens_per_s=0.0, context=None) -> b*
    .marginal_cost(batch_after, slo_batch, displaced_usd)     # routing (docs/economics.md)
    .attributed_cost(prompt, completion, batch_seen, *, cached_tokens=0, context=None)
    .cost_per_output_token(batch, context=None) .prefill_time_s(tokens) .prefill_cost(tokens)
    .amortized_cost(prompt, output, batch, context=None) .most_per_token()
    .predicted_ttft_s(prompt, *, load, queued_prefill_tokens, expected_output_tokens)
    opportunity_share(batch_after, slo_batch) -> 0..1
policies.batch_search                # the search behind GpuModel.slo_batch
    slo_batch(max_itl_s, load, tables, curves, top_batch, mixed_step_s) -> b*
    mixed_itl_cut(max_itl_s, load, mixed_step_s) itl_curve(table, top) itl_curves(profile)
policies.pricebook
    Price(input_per_token, output_per_token, cached_input_per_token=None, source="config",
          updated_at=0.0); Price.per_million(...); .cost(prompt, completion, cached=0)
    PriceBook(version=0, prices={}) .get(backend, model=None)
          .with_price(backend, price, model=None) .with_prices(mapping)
          # keys: backend, or (backend, model); every change bumps the version
    parse_openrouter_feed(obj, *, now=0.0) -> dict[str, Price]
    parse_neogate_feed(obj, *, now=0.0) -> dict[PriceKey, Price]; raise FeedError
policies.latency
    Ewma(mean, var=0.0, count=0) .update(sample, alpha) .spread
    TtftFit() .update(prompt_tokens, ttft_s, alpha) .intercept .slope .spread .at(prompt)
    LatencyEstimate(ttft: Ewma, itl: Ewma, ttft_fit=TtftFit()); .prior(ttft_s, itl_s)
    LatencySample(ttft_s=None, itl_s=None, prompt_tokens=None)
    update(est, sample, alpha=DEFAULT_ALPHA) -> LatencyEstimate
    sample_from_timings(ttft_s, total_s, completion_tokens) -> LatencySample
    sample_from_groq_usage(usage, completion_tokens=None) -> LatencySample | None
    sample_from_server_timings(queue_s, prompt_s, completion_s, completion_tokens)
        -> LatencySample | None   # a provider's own timings (Groq), already parsed
    DecayingRate(tau_s=10.0) .add(amount, now) .value(now)   # prompt tokens/s per worker
    RelativeError() .update(predicted_s, measured_s, now, alpha) .spread(now)
        # a local worker's relative shortfall, halving its variance every TRUST_HALF_LIFE_S
policies.headroom
    parse_reset(text) -> float; parse_retry_after(headers) -> float | None
    Headroom.from_headers(headers, now, previous=None) .cooling_down(now)
    mark_429(headroom, retry_after_s, now) -> Headroom
    near_limit(headroom, request_tokens, now, *, reserve_fraction=0.05) -> bool
policies.queueing
    wait_decision(request, snapshots, now, *, spread_sigmas=2.0, guard=None) -> float | None
"""
