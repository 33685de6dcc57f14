"""Live routing glue: turns backend state into snapshots, asks the pure policy, and plans attempts."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from aiohttp import web

from adapters.base import AttemptTimeouts, Backend
from gateway.auth import Tenant
from gateway.config import BackendSpec, ModelSpec
from gateway.errors import GatewayError
from gateway.estimate import Estimate
from gateway.forward import AttemptPlan
from gateway.inbound import InboundRequest, upstream_body
from gateway.metrics import GatewayMetrics


class Router:
    """Chooses backends for each request and keeps the live counts routing depends on."""

    def __init__(
        self,
        backends: dict[str, Backend],
        specs: dict[str, BackendSpec],
        metrics: GatewayMetrics,
    ) -> None:
        self._backends = backends
        self._specs = specs
        self._metrics = metrics
        self._inflight: dict[str, int] = defaultdict(int)
        self._timeouts = {
            name: AttemptTimeouts(
                connect_s=s.timeouts.connect_s,
                first_byte_s=s.timeouts.first_byte_s,
                idle_s=s.timeouts.idle_s,
                total_s=s.timeouts.total_s,
            )
            for name, s in specs.items()
        }

    async def plan(
        self,
        inbound: InboundRequest,
        model: ModelSpec,
        tenant: Tenant,
        estimate: Estimate,
        request: web.Request,
    ) -> tuple[list[AttemptPlan], Any]:
        plans = []
        for name in model.backends:
            backend_model = self._specs[name].models[model.name]
            plans.append(
                AttemptPlan(
                    self._backends[name],
                    backend_model,
                    upstream_body(inbound, backend_model),
                    self._timeouts[name],
                )
            )
        return plans, None

    def on_failure(self, backend: str, exc: GatewayError, elapsed: float) -> None:
        self._metrics.upstream_errors.labels(backend, exc.code).inc()

    def may_retry(self) -> bool:
        return True

    def on_start(self, backend: str) -> None:
        self._inflight[backend] += 1

    def on_end(self, backend: str) -> None:
        self._inflight[backend] -= 1

    def batch_seen(self, backend: str) -> int:
        return self._inflight[backend] + 1

    def any_healthy(self, names: list[str]) -> bool:
        return bool(names)
