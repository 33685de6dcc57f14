"""The endpoints' aiohttp handlers: the inference endpoints' entry (served by
`gateway.flow.proxy`), models, health, readiness and Prometheus metrics."""

from __future__ import annotations

import time

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.errors import ModelNotFound
from gateway.flow.proxy import serve_request
from gateway.http.exchange import AiohttpExchange
from gateway.http.inbound import Endpoint
from gateway.runtime import RUNTIME


def handler(endpoint: Endpoint) -> Handler:
    """The aiohttp handler of one inference endpoint."""

    async def handle(request: web.Request) -> web.StreamResponse:
        exchange = AiohttpExchange(request)
        await serve_request(request.app[RUNTIME].current, exchange, endpoint)
        assert exchange.response is not None  # serve_request answers or raises
        return exchange.response

    return handle


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


def _model_object(name: str, created: int) -> dict[str, object]:
    return {"id": name, "object": "model", "created": created, "owned_by": "neogate"}


async def list_models(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME].current
    tenant = rt.auth.tenant_for(request.headers)
    created = int(time.time())
    data = [
        _model_object(name, created)
        for name in rt.models
        if tenant.allowed_models is None or name in tenant.allowed_models
    ]
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )


async def get_model(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME].current
    tenant = rt.auth.tenant_for(request.headers)
    name = request.match_info["model"]
    if name not in rt.models or (
        tenant.allowed_models is not None and name not in tenant.allowed_models
    ):
        raise ModelNotFound(f"The model `{name}` does not exist.", param="model")
    return web.Response(
        body=orjson.dumps(_model_object(name, int(time.time()))), content_type="application/json"
    )


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the runtime is built and every model has a backend in service."""
    ref = request.app.get(RUNTIME)
    if ref is None:
        return web.json_response({"status": "starting"}, status=503)
    rt = ref.current
    unserved = [m for m in rt.models.values() if not rt.router.any_healthy(m.backends)]
    if unserved:
        return web.json_response(
            {"status": "degraded", "models_without_backend": [m.name for m in unserved]},
            status=503,
        )
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME].current
    body = generate_latest(rt.process.metrics.registry)
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp
