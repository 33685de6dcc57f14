"""A simulated vLLM / SGLang GPU worker: OpenAI endpoints over a continuous-batching engine, and /metrics.

Prefix caching: prompts are cached in 16-token blocks once admitted, so repeating a prompt
(or a long shared prefix) yields non-zero `cached_tokens` and a cheaper prefill.
Model ids containing "reasoning" report reasoning tokens. Faults work as on the provider
(see loadtest.sim.faults). All reported durations are wall-clock (simulated x time_scale).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

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
from loadtest.sim.render import Meta, renderer_for
from loadtest.sim.scheduler import Job, Scheduler
from loadtest.sim.serve import Reply, send
from policies.profile import Profile
from policies.spec import ThroughputProfileSpec


def _llama_8b_h100() -> dict[int, float]:
    # NVIDIA NIM 1.8.0, Llama-3.1-8B on one H100: output tokens/s by concurrency (DESIGN.md).
    return {1: 215.0, 5: 1077.0, 25: 4679.0, 50: 8018.0, 100: 12215.0, 200: 13348.0}


@dataclass(frozen=True)
class WorkerOptions:
    """How the simulated worker performs and what it serves."""

    model_ids: tuple[str, ...] = ("meta-llama/Llama-3.1-8B-Instruct",)
    decode_tokens_per_s: dict[int, float] = field(default_factory=_llama_8b_h100)
    prefill_tokens_per_s: float = 20000.0
    max_batch: int = 256
    # ~ H100 80 GB serving Llama-3.1-8B in bf16: ~56 GB of KV at 128 KiB per token.
    kv_capacity_tokens: int = 450_000
    time_scale: float = 1.0
    default_max_tokens: int = 64
    seed: int = 0
    flavor: Literal["vllm", "sglang"] = "vllm"
    max_model_len: int = 131072
    embedding_dims: int = 384
    fault: str | None = None
    # A measured profile (decode by batch x context, prefill by prompt length); when set it
    # replaces `decode_tokens_per_s` and `prefill_tokens_per_s`.
    profile: ThroughputProfileSpec | None = None

    def performance(self) -> Profile:
        """The profile this worker runs: `profile`, or the single curve and prefill speed."""
        if self.profile is not None:
            return Profile.from_spec(self.profile)
        return Profile.from_spec(
            ThroughputProfileSpec.model_validate(
                {
                    "decode_tokens_per_s": self.decode_tokens_per_s,
                    "prefill_tokens_per_s": self.prefill_tokens_per_s,
                    "max_batch": self.max_batch,
                }
            )
        )

    def __post_init__(self) -> None:
        curve = self.decode_tokens_per_s
        if not curve or any(c < 1 or t <= 0 for c, t in curve.items()):
            raise ValueError("decode_tokens_per_s needs points with batch >= 1 and tokens/s > 0")
        positive = ("prefill_tokens_per_s", "max_batch", "kv_capacity_tokens", "time_scale")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.flavor not in ("vllm", "sglang"):
            raise ValueError(f"flavor must be 'vllm' or 'sglang', got {self.flavor!r}")
        check_fault_option(self.fault)


@dataclass
class WorkerState:
    """Everything one worker app owns."""

    opts: WorkerOptions
    scheduler: Scheduler
    text: TextSource
    registry: CollectorRegistry


WORKER = web.AppKey("sim_worker", WorkerState)


def _model_missing(model: str) -> web.Response:
    return error_response(
        404,
        f"The model `{model}` does not exist.",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


async def _generate(request: web.Request, req: GenRequest) -> web.StreamResponse:
    sim = request.app[WORKER]
    opts = sim.opts
    fault = faults.choose_fault(request, req.model_fault)
    faults.record(request, req.endpoint, req.model, fault)
    if req.model not in opts.model_ids:
        return _model_missing(req.model)
    requested = req.prompt_tokens + (req.max_tokens or 0)
    if requested > opts.max_model_len:
        raise RequestError(
            f"This model's maximum context length is {opts.max_model_len} tokens. However, you "
            f"requested {requested} tokens ({req.prompt_tokens} in the messages, "
            f"{req.max_tokens} in the completion). Please reduce the length of the messages or "
            "completion.",
            "messages",
        )
    tool_ids = tuple(new_id("call_") for _ in range(req.n)) if req.tool else ()
    plan = make_plan(req, sim.text, opts.default_max_tokens, tool_ids)
    job = Job(
        sim.scheduler, req.model, req.n, req.prompt_tokens, req.prompt_text,
        plan.tokens_per_choice, plan.finish_reason,
    )  # fmt: skip
    if not sim.scheduler.fits(job):
        raise RequestError(
            f"Request needs {job.kv} KV tokens and {job.n} sequences; the worker has "
            f"{sim.scheduler.kv_capacity} and {sim.scheduler.max_batch}.",
            "n" if job.n > sim.scheduler.max_batch else "max_tokens",
        )
    early = await faults.before_headers(request, fault, req.stream)
    if early is not None:
        return early
    prefix = "chatcmpl-" if req.endpoint == "chat" else "cmpl-"
    meta = Meta(
        new_id(prefix),
        int(time.time()),
        req.model,
        {"x_sim": {"backend": "worker", "flavor": opts.flavor}},
    )

    def usage() -> dict[str, Any]:
        return usage_object(
            req.prompt_tokens,
            plan.tokens_per_choice * req.n,
            job.cached,
            plan.reasoning_per_choice * req.n,
        )

    delay = faults.fault_delay(request) if fault == "slow" else 0.0
    reply = Reply(
        renderer_for(meta, req, plan, sim.text), plan.tokens_per_choice, fault, delay, usage
    )
    return await send(request, reply, job)


def _bad_request(exc: RequestError) -> web.Response:
    return error_response(exc.status, exc.message, "invalid_request_error", exc.code, exc.param)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    try:
        body = load_body(await request.read())
        return await _generate(request, parse_chat(body, request.app[WORKER].text))
    except RequestError as exc:
        return _bad_request(exc)


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions."""
    try:
        return await _generate(request, parse_completion(load_body(await request.read())))
    except RequestError as exc:
        return _bad_request(exc)


async def embeddings(request: web.Request) -> web.StreamResponse:
    """POST /v1/embeddings: prefill time only, outside the decode batch."""
    sim = request.app[WORKER]
    try:
        req = parse_embedding(load_body(await request.read()))
        fault = faults.choose_fault(request, req.model_fault)
    except RequestError as exc:
        return _bad_request(exc)
    faults.record(request, "embeddings", req.model, fault)
    if req.model not in sim.opts.model_ids:
        return _model_missing(req.model)
    early = await faults.before_headers(request, fault, False)
    if early is not None:
        return early
    await asyncio.sleep(
        sim.scheduler.profile.prefill_time_s(req.prompt_tokens) * sim.opts.time_scale
    )
    sim.scheduler.model_stats(req.model).prompt_tokens += req.prompt_tokens
    dims = req.dimensions or sim.opts.embedding_dims
    return json_response(
        embeddings_body(
            req.model, req.inputs, req.prompt_tokens, dims, req.encoding_format, sim.opts.seed
        )
    )


def _model_card(opts: WorkerOptions, model: str) -> dict[str, Any]:
    return {
        "id": model,
        "object": "model",
        "created": int(time.time()),
        "owned_by": opts.flavor,
        "root": model,
        "parent": None,
        "max_model_len": opts.max_model_len,
    }


async def models(request: web.Request) -> web.Response:
    """GET /v1/models in vLLM's format."""
    opts = request.app[WORKER].opts
    return json_response({"object": "list", "data": [_model_card(opts, m) for m in opts.model_ids]})


async def retrieve_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}."""
    opts = request.app[WORKER].opts
    name = request.match_info["model"]
    return (
        json_response(_model_card(opts, name)) if name in opts.model_ids else _model_missing(name)
    )


async def health(request: web.Request) -> web.Response:
    """GET /health: 200 with an empty body, like vLLM."""
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics in the Prometheus text format."""
    return web.Response(
        body=generate_latest(request.app[WORKER].registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


async def control(request: web.Request) -> web.Response:
    """GET or POST /sim/control: fault knobs (see loadtest.sim.faults) and the engine's state."""
    try:
        if request.method == "POST":
            rest = await faults.read_control(request)
            if rest:
                raise RequestError(f"unknown control keys for a worker: {sorted(rest)}")
    except RequestError as exc:
        return _bad_request(exc)
    sched = request.app[WORKER].scheduler
    state = faults.control_json(request.app[faults.FAULT_STATE])
    state.update(
        running=len(sched.running), waiting=len(sched.waiting), kv_used_tokens=sched.kv_used
    )
    return json_response(state)


class _Collector:
    """Reads the engine at scrape time and yields vLLM- or SGLang-named metrics."""

    def __init__(self, state: WorkerState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        """Prometheus collector protocol."""
        sched = self._state.scheduler
        sglang = self._state.opts.flavor == "sglang"
        names = (
            ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:")
            if sglang
            else (
                "vllm:num_requests_running",
                "vllm:num_requests_waiting",
                "vllm:kv_cache_usage_perc",
                "vllm:",
            )
        )
        label = ["model_name"]
        running = GaugeMetricFamily(names[0], "Requests in the running batch.", labels=label)
        waiting = GaugeMetricFamily(names[1], "Requests waiting for a batch slot.", labels=label)
        kv = GaugeMetricFamily(names[2], "KV-cache usage, 0..1.", labels=label)
        p = names[3]
        gen = CounterMetricFamily(p + "generation_tokens", "Generated tokens.", labels=label)
        prompt = CounterMetricFamily(p + "prompt_tokens", "Prefilled prompt tokens.", labels=label)
        ttft = HistogramMetricFamily(
            p + "time_to_first_token_seconds", "Time to first token.", labels=label
        )
        itl = HistogramMetricFamily(
            p + "inter_token_latency_seconds", "Inter-token latency.", labels=label
        )
        done = CounterMetricFamily(
            p + "request_success", "Finished requests.", labels=["model_name", "finished_reason"]
        )
        usage = sched.kv_used / sched.kv_capacity
        for model, stats in sched.models.items():
            running.add_metric([model], sum(1 for j in sched.running if j.model == model))
            waiting.add_metric([model], sum(1 for j in sched.waiting if j.model == model))
            kv.add_metric([model], usage)
            gen.add_metric([model], stats.generation_tokens)
            prompt.add_metric([model], stats.prompt_tokens)
            ttft.add_metric([model], stats.ttft.cumulative(), stats.ttft.total)
            itl.add_metric([model], stats.itl.cumulative(), stats.itl.total)
            for reason, count in stats.finished.items():
                done.add_metric([model, reason], count)
        yield from (running, waiting, kv, gen, prompt, ttft, itl, done)


async def _engine(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[WORKER].scheduler.run(), name="sim-worker-engine")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _abort_jobs(app: web.Application) -> None:
    app[WORKER].scheduler.abort_all()


def create_worker_app(opts: WorkerOptions) -> web.Application:
    """The simulated worker; its engine loop starts with the app and stops at cleanup."""
    app = base_app()
    cache = PrefixCache()
    scheduler = Scheduler(
        opts.performance(),
        opts.max_batch,
        opts.kv_capacity_tokens,
        opts.time_scale,
        cache.lookup_and_insert,
    )
    for model in opts.model_ids:
        scheduler.model_stats(model)  # every served model shows up in /metrics from the start
    registry = CollectorRegistry(auto_describe=False)
    state = WorkerState(opts, scheduler, TextSource(opts.seed), registry)
    registry.register(_Collector(state))
    app[WORKER] = state
    faults.install(app, opts.fault, opts.time_scale, opts.seed)
    app.cleanup_ctx.append(_engine)
    app.on_shutdown.append(_abort_jobs)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    app.router.add_route("*", "/sim/control", control)
    return app
