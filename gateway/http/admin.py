"""Admin API (admin key only) and the usage API (a tenant sees its own; the admin key sees all)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import asdict
from typing import Any

import orjson
from aiohttp import web

from gateway.config import ConfigError, ModelSpec, TenantSpec
from gateway.errors import (
    GatewayError,
    InvalidJSON,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from gateway.flow.estimate import Estimate
from gateway.flow.routing import Router
from gateway.http.auth import Tenant
from gateway.http.inbound import InboundRequest
from gateway.metering.ledger.provisioning import PROVISIONING_WINDOW_S, gpu_terms, provisioning
from gateway.metering.ledger.reports import GROUP_KEYS, pricing_sheet, usage_report
from gateway.runtime import RUNTIME, Runtime
from gateway.wiring import reload_from_file
from policies.pricebook import Price
from policies.worker_signals import under_pressure

# How long a worker of `--workers N` waits for its own reload after asking the supervisor.
_WORKER_RELOAD_WAIT_S = 30.0


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/admin/backends", backends)
    app.router.add_post("/admin/prices", set_price)
    app.router.add_get("/admin/prices", get_prices)
    app.router.add_get("/admin/route", explain_route)
    app.router.add_get("/admin/keys", list_keys)
    app.router.add_post("/admin/keys", create_key)
    app.router.add_delete("/admin/keys/{key_id}", revoke_key)
    app.router.add_get("/admin/ledger", ledger_stats)
    app.router.add_post("/admin/reload", reload_config)


def add_usage_routes(app: web.Application) -> None:
    app.router.add_get("/v1/usage", usage)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj, default=str), status=status, content_type="application/json"
    )


def require_admin(request: web.Request) -> Runtime:
    """The runtime, once the caller proved the admin key; tenant keys get 403."""
    rt = request.app[RUNTIME].current
    if rt.auth.is_admin(request):
        return rt
    if request.headers.get("Authorization") or request.headers.get("api-key"):
        raise PermissionDenied("this endpoint needs the admin key")
    raise Unauthenticated("this endpoint needs the admin key")


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.content.read(65536)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"invalid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidRequest("the body must be a JSON object")
    return obj


async def backends(request: web.Request) -> web.Response:
    """Each backend's live snapshot: price and version, latency, load, batch, health, headroom;
    for local GPUs the provisioning truth over `?window=` seconds (default the last hour)."""
    rt = require_admin(request)
    now = time.time()
    window = _opt_float(request, "window")
    if window is not None and not (0 < window <= 366 * 86400):
        raise InvalidRequest("window must be seconds in (0, 366 days]", param="window")
    truth: dict[str, Any] = {}
    ledger = rt.meter.ledger
    terms = gpu_terms(rt.config)
    if ledger is not None and terms:
        span = window if window is not None else PROVISIONING_WINDOW_S
        rows = await provisioning(ledger.store, terms, since=now - span, until=now, now=now)
        truth = {r.backend: r.as_dict() for r in rows}
    live = rt.router.live
    out = []
    for name, b in live.backends.items():
        breaker = b.breaker.snapshot(now)
        models = {}
        for public in b.spec.models:
            snap = live.snapshot(name, public, now, rt.config.routing.metrics_stale_after_s)
            models[public] = {
                "backend_model": snap.backend_model,
                "price_in_per_million": snap.price_in_per_token * 1e6,
                "price_out_per_million": snap.price_out_per_token * 1e6,
                "ttft_s": snap.ttft_s,
                "ttft_spread_s": snap.ttft_spread_s,
                "itl_s": snap.itl_s,
                "itl_spread_s": snap.itl_spread_s,
            }
        w = b.worker
        out.append(
            {
                "name": name,
                "kind": b.spec.kind,
                "local": b.spec.is_local,
                "price_version": live.prices.book.version,
                "models": models,
                "inflight": b.inflight,
                "starting": b.starting,
                "max_concurrency": b.spec.max_concurrency,
                # False for a local worker whose metrics are missing or stale: it is then
                # judged on the gateway's own in-flight count alone.
                "metrics_fresh": None
                if b.gpu is None
                else w is not None and w.is_fresh(now, rt.config.routing.metrics_stale_after_s),
                "worker": None
                if w is None
                else {
                    "running": w.running,
                    "waiting": w.waiting,
                    "kv_usage": w.kv_usage,
                    "age_s": round(now - w.scraped_at, 3),
                    "fresh": w.is_fresh(now, rt.config.routing.metrics_stale_after_s),
                    # Between the last two scrapes (policies.worker_signals uses them).
                    "queue_mean_s": b.signals.queue_mean_s,
                    "preemptions_per_s": b.signals.preemptions_per_s,
                    "waiting_for_capacity": w.waiting_for_capacity,
                    "prefix_cache_hit_rate": b.signals.prefix_hit_rate,
                    "used_tokens": w.used_tokens,
                    "under_pressure": under_pressure(
                        b.signals.preemptions_per_s, w.waiting_for_capacity
                    ),
                },
                # A provider's reported queue time (Groq) per model, long-run and recent.
                "queue_s": {
                    m: {"long_run": slow, "recent": fast} for m, (slow, fast) in b.queue_s.items()
                },
                "provisioning": truth.get(name),
                "gpu": None
                if b.gpu is None
                else {
                    "price_per_hour": b.gpu.price_per_hour,
                    "mode": b.gpu.mode,
                    "batch_now": rt.router.batch_seen(name) - 1,
                    "cost_per_million_output_at_batch": b.gpu.cost_per_output_token(
                        max(1, rt.router.batch_seen(name) - 1)
                    )
                    * 1e6,
                },
                "health": {**asdict(breaker), "healthy": b.breaker.available(now)},
                # As the backend's dialect read its headers (Groq's request headers are
                # `daily_*`), with our own last-minute traffic filling in what it omits.
                "headroom": {
                    **asdict(b.headroom_now(now)),
                    "cooling_down": b.headroom.cooling_down(now),
                },
            }
        )
    return _json({"now": now, "price_version": live.prices.book.version, "backends": out})


async def get_prices(request: web.Request) -> web.Response:
    rt = require_admin(request)
    book = rt.router.live.prices.book
    rows = []
    for key, p in book.prices.items():
        backend, model = (key, None) if isinstance(key, str) else key
        rows.append(
            {
                "backend": backend,
                "model": model,
                "input_per_million": p.input_per_token * 1e6,
                "output_per_million": p.output_per_token * 1e6,
                "cached_input_per_million": None
                if p.cached_input_per_token is None
                else p.cached_input_per_token * 1e6,
                "cache_write_input_per_million": _per_m(p.cache_write_input_per_token),
                "tiers": [
                    {
                        "min_prompt_tokens": t.min_prompt_tokens,
                        "input_per_million": _per_m(t.input_per_token),
                        "output_per_million": _per_m(t.output_per_token),
                        "cached_input_per_million": _per_m(t.cached_input_per_token),
                        "cache_write_input_per_million": _per_m(t.cache_write_input_per_token),
                    }
                    for t in p.tiers
                ],
                "source": p.source,
            }
        )
    skipped = [
        {"row": s.index, "id": s.id, "reason": s.reason} for s in rt.router.live.prices.feed_skipped
    ]
    return _json({"version": book.version, "prices": rows, "feed_skipped_rows": skipped})


def _per_m(per_token: float | None) -> float | None:
    return None if per_token is None else per_token * 1e6


async def set_price(request: web.Request) -> web.Response:
    """Set one backend's (or backend+model's) price; the book's version moves."""
    rt = require_admin(request)
    body = await _body(request)
    backend = body.get("backend")
    if backend not in rt.backends:
        raise InvalidRequest(f"unknown backend {backend!r}", param="backend")
    model = body.get("model")
    if model is not None and model not in rt.specs[str(backend)].models:
        raise InvalidRequest(f"backend {backend} does not serve {model!r}", param="model")
    try:
        price = Price.per_million(
            _non_negative(body, "input_per_million"),
            _non_negative(body, "output_per_million"),
            None
            if body.get("cached_input_per_million") is None
            else _non_negative(body, "cached_input_per_million"),
            source="admin",
            updated_at=time.time(),
        )
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(str(exc)) from exc
    version = rt.router.live.prices.set(str(backend), price, model)
    return _json({"version": version})


def _non_negative(body: dict[str, Any], key: str) -> float:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidRequest(f"{key} must be a non-negative number", param=key)
    return float(value)


async def explain_route(request: web.Request) -> web.Response:
    """What the router would pick now, and why (`neogate route` calls this too)."""
    rt = require_admin(request)
    q = request.query
    model = rt.models.get(q.get("model", ""))
    if model is None:
        raise ModelNotFound(f"unknown model {q.get('model')!r}", param="model")
    try:
        prompt = int(q.get("prompt_tokens", "256"))
        max_tokens = int(q.get("max_tokens", str(model.expected_output_tokens)))
    except ValueError as exc:
        raise InvalidRequest("prompt_tokens and max_tokens must be integers") from exc
    tenant = rt.auth.tenant_named(q.get("tenant", "")) if q.get("tenant") else None
    slo_class = q.get("slo_class") or (tenant.slo_class if tenant else "interactive")
    return _json(route_explanation(rt.router, model, prompt, max_tokens, slo_class, tenant))


def route_explanation(
    router: Router,
    model: ModelSpec,
    prompt: int,
    max_tokens: int,
    slo_class: str,
    tenant: Tenant | None = None,
) -> dict[str, Any]:
    """A decision as JSON: the ranked candidates with predicted cost and latency, and rejections."""
    t = tenant or Tenant.from_spec(TenantSpec(name="explain"))
    inbound = InboundRequest("chat", {}, model.name, False, False, max_tokens, 1)
    expected = min(max_tokens, model.expected_output_tokens)
    est = Estimate(prompt, max_tokens, expected, True)
    req = router.route_request(inbound, t, est, {"x-neogate-slo-class": slo_class})
    decision = router.decide(req, model, tenant)
    return {
        "model": model.name,
        "slo_class": req.slo_class,
        "policy": decision.policy,
        "reason": decision.reason,
        "price_version": decision.price_version,
        "wait_for_local_s": decision.wait_for_local,
        "candidates": [asdict(c) for c in decision.candidates],
        "rejected": [{"backend": b, "why": why} for b, why in decision.rejected],
    }


async def list_keys(request: web.Request) -> web.Response:
    rt = require_admin(request)
    records = await rt.process.keys.list(request.query.get("tenant"))
    return _json({"keys": [asdict(r) for r in records]})


async def create_key(request: web.Request) -> web.Response:
    """A new key for a tenant; the plaintext is in this answer only."""
    rt = require_admin(request)
    body = await _body(request)
    tenant = body.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        raise InvalidRequest("tenant must be a non-empty string", param="tenant")
    label = body.get("label", "")
    if not isinstance(label, str):
        raise InvalidRequest("label must be a string", param="label")
    key_id, key = await rt.process.keys.create(tenant, label)
    rt.process.keys_changed()
    return _json({"key_id": key_id, "tenant": tenant, "key": key}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    rt = require_admin(request)
    key_id = request.match_info["key_id"]
    if not await rt.process.keys.revoke(key_id):
        raise NotFound(f"no active key {key_id!r}", code="key_not_found")
    rt.process.keys_changed()
    return _json({"key_id": key_id, "revoked": True})


async def ledger_stats(request: web.Request) -> web.Response:
    rt = require_admin(request)
    ledger = rt.meter.ledger
    return _json({"enabled": ledger is not None, **(asdict(ledger.stats()) if ledger else {})})


async def usage(request: web.Request) -> web.Response:
    """Aggregated usage from the ledger: `?by=day,model,backend,tenant&since=&until=&report=pricing`."""
    rt = request.app[RUNTIME].current
    if rt.auth.is_admin(request):
        tenant: str | None = request.query.get("tenant")
    else:
        tenant = rt.auth.tenant_for(request.headers).name
    ledger = rt.meter.ledger
    if ledger is None:
        raise NotFound("this gateway runs without a ledger", code="ledger_disabled")
    since = _opt_float(request, "since")
    until = _opt_float(request, "until")
    if request.query.get("report") == "pricing":
        rows = await pricing_sheet(ledger.store, since=since, until=until, tenant=tenant)
        return _json({"object": "pricing_sheet", "data": [r.as_dict() for r in rows]})
    by = [k for k in request.query.get("by", "day,model,backend,tenant").split(",") if k]
    bad = [k for k in by if k not in GROUP_KEYS]
    if bad:
        raise InvalidRequest(
            f"cannot group by {bad}: choose from {', '.join(GROUP_KEYS)}", param="by"
        )
    rows_u = await usage_report(ledger.store, by, since=since, until=until, tenant=tenant)
    return _json({"object": "usage", "tenant": tenant, "data": [r.as_dict() for r in rows_u]})


def _opt_float(request: web.Request, key: str) -> float | None:
    value = request.query.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError as exc:
        raise InvalidRequest(f"{key} must be a unix timestamp", param=key) from exc


async def reload_config(request: web.Request) -> web.Response:
    """Apply the policy file again, atomically; an invalid file is refused with the reasons."""
    require_admin(request)
    ref = request.app[RUNTIME]
    try:
        if ref.process.options.worker_index is None:
            new = await reload_from_file(ref)
        else:
            # One of `--workers N`: the supervisor passes SIGHUP to every worker, this one
            # included, which answers with the outcome of its own reload (once, not twice).
            outcome = ref.next_reload()
            os.kill(os.getppid(), signal.SIGHUP)
            try:
                new = await asyncio.wait_for(outcome, _WORKER_RELOAD_WAIT_S)
            except TimeoutError as exc:
                raise GatewayError(
                    "the supervisor did not pass the reload on in time", code="reload_timeout"
                ) from exc
    except ConfigError as exc:
        return _json(
            {
                "error": {
                    "message": exc.render(),
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_config",
                },
                "issues": [str(i) for i in exc.issues],
            },
            status=400,
        )
    return _json({"reloaded": True, "backends": list(new.specs), "models": list(new.models)})
