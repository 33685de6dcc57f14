"""A simulated external provider (Groq-like): OpenAI endpoints, latency, rate limits and faults.

Latency: the first token comes after a sampled delay, uniform in ttft_s_mean +- ttft_s_jitter,
plus prompt_tokens / prefill_tokens_per_s; then tokens follow at tokens_per_s. Every request
gets its own timer (a provider has no shared batch to model). With groq_timings, usage carries
queue_time (the sampled delay), prompt_time, completion_time and total_time
(= prompt_time + completion_time), and streams put `x_groq: {id, usage}` on the final chunk.
Budgets: see loadtest.sim.ratelimit; faults: see loadtest.sim.faults. Durations, budget
windows and reported times are wall-clock (simulated x time_scale).
"""

from __future__ import annotations

import asyncio
import hmac
import math
import random
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from loadtest.sim import faults
from loadtest.sim.common import (
    TextSource,
    base_app,
    embeddings_body,
    error_response,
    json_response,
    new_id,
    usage_object,
)
from loadtest.sim.faults import check_fault_option
from loadtest.sim.parse import (
    GenRequest,
    PrefixCache,
    RequestError,
    load_body,
    make_plan,
    parse_chat,
    parse_completion,
    parse_embedding,
)
from loadtest.sim.ratelimit import RateLimits, format_duration
from loadtest.sim.render import Meta, renderer_for
from loadtest.sim.serve import Reply, send


@dataclass(frozen=True)
class ProviderOptions:
    """How the simulated provider behaves."""

    model_ids: tuple[str, ...] = ("llama-3.1-8b-instant", "llama-3.3-70b-versatile")
    ttft_s_mean: float = 0.2
    ttft_s_jitter: float = 0.05
    tokens_per_s: float = 500.0
    prefill_tokens_per_s: float = 50000.0
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    # Requests per day (Groq reports this one in its x-ratelimit-*-requests headers).
    rpd_limit: int | None = None
    groq_timings: bool = True
    fault: str | None = None
    time_scale: float = 1.0
    seed: int = 0
    api_key: str | None = None
    default_max_tokens: int = 64
    prompt_cache: bool = False  # prefix caching as on the worker (cached_tokens > 0 on repeats)
    context_window: int = 131072
    embedding_dims: int = 768

    def __post_init__(self) -> None:
        for name in ("tokens_per_s", "prefill_tokens_per_s", "time_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.ttft_s_mean < 0 or self.ttft_s_jitter < 0:
            raise ValueError("ttft_s_mean and ttft_s_jitter must be >= 0")
        for name in ("rpm_limit", "tpm_limit", "rpd_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None")
        check_fault_option(self.fault)


@dataclass
class ProviderState:
    """Everything one provider app owns."""

    opts: ProviderOptions
    text: TextSource
    limits: RateLimits
    rng: random.Random
    cache: PrefixCache | None


PROVIDER = web.AppKey("sim_provider", ProviderState)


class Paced:
    """A Generation on a timer: first token after `first_s`, then one every `itl_s` seconds."""

    def __init__(self, first_s: float, itl_s: float, total: int) -> None:
        self._first = first_s
        self._itl = itl_s
        self._total = total
        self._t0 = 0.0

    def start(self) -> None:
        """Start the clock."""
        self._t0 = time.monotonic() + self._first

    async def wait_past(self, sent: int) -> int:
        """Sleep until token `sent` is due; return every token due by then."""
        due = self._t0 + sent * self._itl
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
            now = max(time.monotonic(), due)
        produced = 1 + int((now - self._t0) / self._itl) if self._itl > 0 else self._total
        return min(self._total, max(produced, sent + 1))

    def close(self) -> None:
        """Nothing to release."""


def _seconds(value: float) -> float:
    """Six significant digits, like a provider's report (no float noise)."""
    return float(f"{value:.6g}")


def _bad_request(exc: RequestError) -> web.Response:
    return error_response(exc.status, exc.message, "invalid_request_error", exc.code, exc.param)


def _rate_limited(
    model: str, which: str, wait: float, limits: RateLimits, tokens: int
) -> web.Response:
    bucket = limits.bucket(which)
    kind = "tokens" if which == "tokens" else "requests"  # the error type, per day or minute
    assert bucket is not None
    unit = {
        "requests": "requests per minute (RPM)",
        "requests_per_day": "requests per day (RPD)",
    }.get(which, "tokens per minute (TPM)")
    if math.isinf(wait):
        return error_response(
            413,
            f"Request too large for model `{model}` on {unit}: Limit {bucket.limit}, "
            f"Requested {tokens}. Please reduce your message size and try again.",
            kind,
            "rate_limit_exceeded",
        )
    headers = {
        "retry-after": str(max(1, math.ceil(wait))),
        "retry-after-ms": str(math.ceil(wait * 1000)),
    }
    requested = tokens if which == "tokens" else 1
    return error_response(
        429,
        f"Rate limit reached for model `{model}` in organization `org_sim` on {unit}: "
        f"Limit {bucket.limit}, Requested {requested}. Please try again in {format_duration(wait)}.",
        kind,
        "rate_limit_exceeded",
        headers=headers,
    )


def _model_missing(model: str) -> web.Response:
    return error_response(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    )


async def _generate(request: web.Request, req: GenRequest) -> web.StreamResponse:
    sim = request.app[PROVIDER]
    opts = sim.opts
    fault = faults.choose_fault(request, req.model_fault)
    faults.record(request, req.endpoint, req.model, fault)
    if req.model not in opts.model_ids:
        return _model_missing(req.model)
    tool_ids = tuple(new_id("call_") for _ in range(req.n)) if req.tool else ()
    plan = make_plan(req, sim.text, opts.default_max_tokens, tool_ids)
    completion = plan.tokens_per_choice * req.n
    limited = sim.limits.check(req.prompt_tokens + completion)
    if limited is not None:
        return _rate_limited(req.model, *limited, sim.limits, req.prompt_tokens + completion)
    early = await faults.before_headers(request, fault, req.stream)
    if early is not None:
        return early
    scale = opts.time_scale
    queue_s = max(0.0, opts.ttft_s_mean + opts.ttft_s_jitter * (2 * sim.rng.random() - 1)) * scale
    cached = sim.cache.lookup_and_insert(req.prompt_text, req.prompt_tokens) if sim.cache else 0
    prompt_s = (req.prompt_tokens - cached) / opts.prefill_tokens_per_s * scale
    itl_s = scale / opts.tokens_per_s
    completion_s = plan.tokens_per_choice * itl_s
    groq_id = new_id("req_")
    timings = None
    extra: dict[str, Any] = {"x_sim": {"backend": "provider"}}
    if opts.groq_timings:
        timings = {
            "queue_time": _seconds(queue_s),
            "prompt_time": _seconds(prompt_s),
            "completion_time": _seconds(completion_s),
            "total_time": _seconds(prompt_s + completion_s),
        }
        extra["x_groq"] = {"id": groq_id}

    def usage() -> dict[str, Any]:
        return usage_object(
            req.prompt_tokens, completion, cached, plan.reasoning_per_choice * req.n, timings
        )

    def last_chunk_extra(final: dict[str, Any]) -> dict[str, Any] | None:
        return {"x_groq": {"id": groq_id, "usage": final}} if opts.groq_timings else None

    prefix = "chatcmpl-" if req.endpoint == "chat" else "cmpl-"
    meta = Meta(new_id(prefix), int(time.time()), req.model, extra)
    delay = faults.fault_delay(request) if fault == "slow" else 0.0
    reply = Reply(
        renderer_for(meta, req, plan, sim.text),
        plan.tokens_per_choice,
        fault,
        delay,
        usage,
        last_chunk_extra,
    )
    return await send(request, reply, Paced(queue_s + prompt_s, itl_s, plan.tokens_per_choice))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    try:
        body = load_body(await request.read())
        return await _generate(request, parse_chat(body, request.app[PROVIDER].text))
    except RequestError as exc:
        return _bad_request(exc)


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions."""
    try:
        return await _generate(request, parse_completion(load_body(await request.read())))
    except RequestError as exc:
        return _bad_request(exc)


async def embeddings(request: web.Request) -> web.StreamResponse:
    """POST /v1/embeddings."""
    sim = request.app[PROVIDER]
    try:
        req = parse_embedding(load_body(await request.read()))
        fault = faults.choose_fault(request, req.model_fault)
    except RequestError as exc:
        return _bad_request(exc)
    faults.record(request, "embeddings", req.model, fault)
    if req.model not in sim.opts.model_ids:
        return _model_missing(req.model)
    limited = sim.limits.check(req.prompt_tokens)
    if limited is not None:
        return _rate_limited(req.model, *limited, sim.limits, req.prompt_tokens)
    early = await faults.before_headers(request, fault, False)
    if early is not None:
        return early
    scale = sim.opts.time_scale
    await asyncio.sleep(
        (sim.opts.ttft_s_mean + req.prompt_tokens / sim.opts.prefill_tokens_per_s) * scale
    )
    dims = req.dimensions or sim.opts.embedding_dims
    return json_response(
        embeddings_body(
            req.model, req.inputs, req.prompt_tokens, dims, req.encoding_format, sim.opts.seed
        )
    )


def _model_card(opts: ProviderOptions, model: str) -> dict[str, Any]:
    return {
        "id": model,
        "object": "model",
        "created": 1693721698,
        "owned_by": "Meta",
        "active": True,
        "context_window": opts.context_window,
        "public_apps": None,
        "max_completion_tokens": opts.context_window,
    }


async def models(request: web.Request) -> web.Response:
    """GET /v1/models in Groq's format."""
    opts = request.app[PROVIDER].opts
    return json_response({"object": "list", "data": [_model_card(opts, m) for m in opts.model_ids]})


async def retrieve_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}."""
    opts = request.app[PROVIDER].opts
    name = request.match_info["model"]
    return (
        json_response(_model_card(opts, name)) if name in opts.model_ids else _model_missing(name)
    )


def _optional_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise RequestError(f"'{key}' must be a non-negative integer or null", key)
    return value


async def control(request: web.Request) -> web.Response:
    """GET or POST /sim/control: faults, delays and budgets.

    Provider keys besides the common ones: rpm_limit, tpm_limit (int or null: reconfigure),
    remaining_requests, remaining_tokens (force what is left in the current budget).
    """
    limits = request.app[PROVIDER].limits
    try:
        if request.method == "POST":
            rest = await faults.read_control(request)
            if "rpm_limit" in rest or "tpm_limit" in rest:
                rpm = (
                    _optional_int(rest, "rpm_limit")
                    if "rpm_limit" in rest
                    else _limit(limits.requests)
                )
                tpm = (
                    _optional_int(rest, "tpm_limit")
                    if "tpm_limit" in rest
                    else _limit(limits.tokens)
                )
                limits.set_limits(rpm, tpm)
            for key, bucket in (
                ("remaining_requests", limits.requests),
                ("remaining_tokens", limits.tokens),
            ):
                if key in rest:
                    value = _optional_int(rest, key)
                    if bucket is None or value is None:
                        raise RequestError(f"'{key}' needs a configured limit and a value", key)
                    bucket.set_remaining(value, limits.clock())
            unknown = set(rest) - {
                "rpm_limit",
                "tpm_limit",
                "remaining_requests",
                "remaining_tokens",
            }
            if unknown:
                raise RequestError(f"unknown control keys for a provider: {sorted(unknown)}")
    except RequestError as exc:
        return _bad_request(exc)
    state = faults.control_json(request.app[faults.FAULT_STATE])
    state.update(rpm_limit=_limit(limits.requests), tpm_limit=_limit(limits.tokens))
    state.update(limits.headers())
    return json_response(state)


def _limit(bucket: Any) -> int | None:
    return None if bucket is None else int(bucket.limit)


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    key = request.app[PROVIDER].opts.api_key
    if key is not None and request.path.startswith("/v1/"):
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return error_response(
                401, "Invalid API Key", "invalid_request_error", "invalid_api_key"
            )
    return await handler(request)  # type: ignore[no-any-return]


async def _limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(request.app[PROVIDER].limits.headers())


def create_provider_app(opts: ProviderOptions) -> web.Application:
    """The simulated provider."""
    app = base_app()
    # Groq-like (groq_timings) answers carry Groq's rate-limit headers too.
    limits = RateLimits(time.monotonic, 60.0 * opts.time_scale, groq_headers=opts.groq_timings)
    limits.set_limits(opts.rpm_limit, opts.tpm_limit)
    limits.set_daily(opts.rpd_limit)
    cache = PrefixCache() if opts.prompt_cache else None
    app[PROVIDER] = ProviderState(
        opts, TextSource(opts.seed), limits, random.Random(opts.seed), cache
    )
    faults.install(app, opts.fault, opts.time_scale, opts.seed)
    app.middlewares.append(_auth)
    app.on_response_prepare.append(_limit_headers)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
    app.router.add_route("*", "/sim/control", control)
    return app
