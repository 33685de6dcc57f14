"""The app factory: `create_app(config)` builds every part of a gateway and nothing lives at module level."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from adapters.base import Backend
from adapters.openai_compat import OpenAICompatBackend
from gateway import endpoints
from gateway.admin import add_admin_routes, add_usage_routes
from gateway.admission import Admission, LimitStore, TenantLimits
from gateway.auth import Authenticator
from gateway.background import Background
from gateway.config import BackendSpec, GatewayConfig, resolve_secret
from gateway.errors import GatewayError, InvalidRequest, MethodNotAllowed, NotFound
from gateway.estimate import Estimator
from gateway.keys import KeyBackend, KeyStore, PostgresKeyBackend, SqliteKeyBackend
from gateway.ledger import build_writer
from gateway.ledger.reports import spend_by_tenant
from gateway.live import LiveState
from gateway.metering import Meter
from gateway.metrics import GatewayMetrics
from gateway.proxy import handler
from gateway.routing import Router
from gateway.runtime import REQUEST_ID, RUNTIME, Runtime
from gateway.tokenizer import Tokenizer

log = logging.getLogger("neogate")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class AppOptions:
    """How this app is run, beyond the policy file."""

    anonymous_allowed: bool = False
    admin_key: str | None = None
    server_secret: str | None = None
    ledger: bool = True  # off only for the metering-off comparison benchmark
    limit_store: LimitStore | None = None  # shared (Redis) limits; None: in-process


def create_app(config: GatewayConfig, options: AppOptions | None = None) -> web.Application:
    """Build the gateway app for `config`; I/O resources open in its cleanup context."""
    opts = options or AppOptions()
    cap = max(t.limits.max_body_bytes for t in config.tenants) if config.tenants else 0
    app = web.Application(
        middlewares=[_errors_middleware],
        client_max_size=max(cap, 4 * 1024 * 1024) + 1,
        handler_args={"max_field_size": 16384},
    )
    app.cleanup_ctx.append(_runtime_ctx(config, opts))
    app.router.add_post("/v1/chat/completions", handler("chat"))
    app.router.add_post("/v1/completions", handler("completions"))
    app.router.add_post("/v1/embeddings", handler("embeddings"))
    endpoints.add_routes(app)
    add_usage_routes(app)
    add_admin_routes(app)
    return app


def _runtime_ctx(
    config: GatewayConfig, opts: AppOptions
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            limit=config.max_inflight,
            limit_per_host=0,
            ttl_dns_cache=300,
            keepalive_timeout=30,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        rt: Runtime | None = None
        try:
            rt = build_runtime(config, opts, session)
            await rt.keys.open()
            ledger = rt.meter.ledger
            if ledger is not None:
                await ledger.start()
                spend = await spend_by_tenant(ledger.store, time.time())
                await rt.meter.admission.seed(spend)
            rt.background = Background(rt, session)
            rt.background.start()
            app[RUNTIME] = rt
            yield
        finally:
            if rt is not None:
                await _close_runtime(rt)
            await session.close()

    return ctx


async def _close_runtime(rt: Runtime) -> None:
    """Stop pollers, then flush the ledger: every row reaches the database or the spool."""
    if rt.background is not None:
        await rt.background.stop()
    if rt.meter.ledger is not None:
        await rt.meter.ledger.close()
    await rt.keys.close()


def build_runtime(
    config: GatewayConfig, opts: AppOptions, session: aiohttp.ClientSession
) -> Runtime:
    """Wire every part of the request path for one app."""
    metrics = GatewayMetrics()
    specs = {b.name: b for b in config.backends}
    backends: dict[str, Backend] = {b.name: make_backend(b, session) for b in config.backends}
    tokenizer = Tokenizer.from_source(
        config.tokenizer.source, config.tokenizer.encoding, config.tokenizer.path
    )
    secret = opts.server_secret or resolve_secret(config.auth.server_secret) or ""
    keys = KeyStore(_key_backend(config), secret.encode() or os.urandom(32))
    keys.set_static_keys(
        {t.name: [k for k in (resolve_secret(r) for r in t.api_keys) if k] for t in config.tenants}
    )
    auth = Authenticator(
        config,
        keys,
        anonymous_allowed=opts.anonymous_allowed,
        admin_key=opts.admin_key or resolve_secret(config.admin.api_key),
    )
    live = LiveState(specs, time.time(), alpha=config.routing.ewma_alpha)
    admission = Admission(
        {t.name: TenantLimits.from_specs(t.budgets, t.rate_limits) for t in config.tenants},
        opts.limit_store,
    )
    ledger = None
    if opts.ledger:
        ledger = build_writer(
            config.ledger.kind,
            path=config.ledger.path,
            dsn=resolve_secret(config.ledger.dsn),
            spool_path=config.ledger.spool_path,
            registry=metrics.registry,
            schema=config.ledger.schema_name,
        )
    return Runtime(
        config=config,
        backends=backends,
        specs=specs,
        models={m.name: m for m in config.models},
        metrics=metrics,
        auth=auth,
        estimator=Estimator(tokenizer),
        router=Router(config, backends, live, metrics),
        meter=Meter(
            tokenizer,
            metrics,
            ledger,
            admission,
            live,
            divergence_threshold=config.ledger.divergence_threshold,
        ),
        keys=keys,
    )


def _key_backend(config: GatewayConfig) -> KeyBackend:
    """API keys live beside the ledger: the same SQLite file or PostgreSQL database."""
    if config.ledger.kind == "postgres":
        dsn = resolve_secret(config.ledger.dsn)
        if not dsn:
            raise ValueError("ledger.dsn is not set")
        return PostgresKeyBackend(dsn, schema=config.ledger.schema_name)
    return SqliteKeyBackend(config.ledger.path)


def make_backend(spec: BackendSpec, session: aiohttp.ClientSession) -> Backend:
    """The adapter for one configured backend; every kind speaks the OpenAI protocol."""
    metrics_url = spec.metrics_url
    if metrics_url is None and spec.is_local:
        base = spec.base_url.removesuffix("/v1")
        metrics_url = f"{base}/metrics"
    return OpenAICompatBackend(
        name=spec.name,
        base_url=spec.base_url,
        api_key=resolve_secret(spec.api_key),
        session=session,
        is_local=spec.is_local,
        metrics_url=metrics_url,
    )


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every request an id and render every error once, as OpenAI JSON."""
    rid = request.headers.get("x-request-id") or os.urandom(12).hex()
    if len(rid) > 128 or not rid.isprintable():
        rid = os.urandom(12).hex()
    request[REQUEST_ID] = rid
    try:
        resp = await handler(request)
    except GatewayError as exc:
        return _error_response(exc, rid)
    except web.HTTPRequestEntityTooLarge as exc:
        from gateway.errors import PayloadTooLarge

        return _error_response(PayloadTooLarge(f"request body is too large: {exc.text}"), rid)
    except web.HTTPMethodNotAllowed:
        return _error_response(
            MethodNotAllowed(f"method {request.method} is not allowed on {request.path}"), rid
        )
    except web.HTTPNotFound:
        return _error_response(NotFound(f"unknown path {request.path}", code="unknown_url"), rid)
    except web.HTTPClientError as exc:
        return _error_response(InvalidRequest(exc.reason), rid)
    except Exception:
        # A bug of ours: logged with its traceback, answered as an OpenAI 500, never a crash.
        log.exception("unhandled error in %s %s (request %s)", request.method, request.path, rid)
        return _error_response(GatewayError("internal error in the gateway"), rid)
    if not resp.prepared:
        resp.headers["x-request-id"] = rid
    return resp


def _error_response(exc: GatewayError, rid: str) -> web.Response:
    headers = exc.headers()
    headers["x-request-id"] = rid
    return web.Response(
        body=exc.body(),
        status=exc.http_status(),
        headers=headers,
        content_type="application/json",
    )
