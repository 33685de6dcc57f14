"""The app factory: `create_app(config)` builds every part of a gateway and nothing lives at module level."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    UnsupportedMediaType,
)
from gateway.http import endpoints
from gateway.http.admin import add_admin_routes, add_usage_routes
from gateway.http.edge_head import MAX_FIELD_SIZE, MAX_HEADERS
from gateway.http.edge_site import add_listeners
from gateway.http.exchange import REQUEST_ID, refuse_encoded_body
from gateway.http.refusals import SERVER_ARGS
from gateway.http.server_log import ServerLog
from gateway.process import AppOptions
from gateway.runtime import REQUEST_IDS, RUNTIME, RequestIds, RuntimeRef
from gateway.wiring import running

__all__ = ["AppOptions", "create_app"]

log = logging.getLogger("neogate")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    config: GatewayConfig, options: AppOptions | None = None, *, admin_routes: bool = True
) -> web.Application:
    """Build the gateway app for `config`; I/O resources open in its cleanup context."""
    opts = options or AppOptions()
    cap = max(t.limits.max_body_bytes for t in config.tenants) if config.tenants else 0
    # Request bodies are never decompressed (a gzip bomb inflates on the event loop,
    # in aiohttp's parser, before any handler runs): `_errors_middleware` answers 415.
    handler_args = {
        "max_field_size": MAX_FIELD_SIZE,
        "max_headers": MAX_HEADERS,
        "auto_decompress": False,
        # aiohttp's idle timer (also for a connection that never sends a byte).
        "keepalive_timeout": config.listen.keepalive_s,
        "logger": ServerLog(),  # one line per bad request, never its bytes
    }
    app = web.Application(
        middlewares=[_errors_middleware],
        client_max_size=max(cap, 4 * 1024 * 1024) + 1,
        handler_args=handler_args,
    )
    app[SERVER_ARGS] = {**handler_args, "access_log": None}
    app[REQUEST_IDS] = RequestIds()
    add_listeners(app)
    app.cleanup_ctx.append(_runtime_ctx(config, opts))
    app.router.add_post("/v1/chat/completions", endpoints.handler("chat"))
    app.router.add_post("/v1/completions", endpoints.handler("completions"))
    app.router.add_post("/v1/embeddings", endpoints.handler("embeddings"))
    endpoints.add_routes(app)
    add_usage_routes(app)
    if admin_routes:
        add_admin_routes(app)
    return app


def create_admin_app(ref: RuntimeRef) -> web.Application:
    """The admin API alone, for a separate admin port, sharing the gateway's runtime."""
    handler_args = {
        "auto_decompress": False,
        "keepalive_timeout": ref.current.config.listen.keepalive_s,
        "logger": ServerLog(),
    }
    app = web.Application(middlewares=[_errors_middleware], handler_args=handler_args)
    app[SERVER_ARGS] = {**handler_args, "access_log": None}
    app[RUNTIME] = ref
    app[REQUEST_IDS] = RequestIds()
    add_listeners(app)
    add_admin_routes(app)
    return app


def _runtime_ctx(
    config: GatewayConfig, opts: AppOptions
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with running(config, opts) as ref:
            app[RUNTIME] = ref
            yield

    return ctx


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every request an id and render every error once, as OpenAI JSON."""
    # Always our own id: it keys the ledger, so a client must not be able to choose it
    # (a repeated client id would otherwise make two requests share one row).
    rid = request.app[REQUEST_IDS].next()
    request[REQUEST_ID] = rid
    try:
        refuse_encoded_body(request.headers)
        resp = await handler(request)
    except UnsupportedMediaType as exc:
        resp = _error_response(exc, rid)
        resp.force_close()  # the body is not read: the connection cannot go on
        return resp
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
    return web.Response(
        body=exc.body(), status=exc.http_status(), headers=exc.response_headers(rid)
    )
