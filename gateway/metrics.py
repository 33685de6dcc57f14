"""Prometheus metrics of one gateway app, in a registry of its own (no global registry)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_ITL_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True, slots=True)
class RouteChildren:
    """The labelled children of one (backend, model) pair, looked up once instead of per request."""

    ttft: Any
    itl: Any
    duration: Any
    prompt: Any
    completion: Any
    cached: Any
    reasoning: Any
    cost: Any


@dataclass(frozen=True, slots=True)
class BackendChildren:
    """The labelled children of the per-backend gauges."""

    healthy: Any
    inflight: Any


PROVISIONING_GAUGES = {
    "hours_held": "Hours the local GPU was held in the provisioning window (the window).",
    "tokens": "Prompt + completion tokens the local GPU served in the provisioning window.",
    "mean_batch": "Token-weighted batch size its requests saw in the provisioning window.",
    "utilisation_ratio": "Time-averaged requests in flight over b* (its SLO-feasible batch).",
    "attributed_usd_per_million": "Attributed (ledger) cost per million tokens it served.",
    "held_usd_per_million": "GPU cost of the hours held per million tokens it served.",
    "counterfactual_usd": "What the cheapest SLO-meeting external would have charged instead.",
    "net_saving_usd": "Counterfactual minus the GPU cost held; negative: the GPU does not pay.",
    "break_even_tokens_per_second": "Tokens/s above which the GPU beats the external price.",
}


class GatewayMetrics:
    """Every metric the gateway exports; labels are bounded (backend, model, outcome, kind)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        # Label sets are bounded by the config (backends x models x outcomes), so these stay small.
        self._routes: dict[tuple[str, str], RouteChildren] = {}
        self._outcomes: dict[tuple[str, str, str], Any] = {}
        self._backends: dict[str, BackendChildren] = {}
        self.requests = Counter(
            "neogate_requests_total",
            "Client requests by serving backend, public model and outcome.",
            ["backend", "model", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "neogate_tokens_total",
            "Tokens metered, by kind (prompt, completion, cached, reasoning).",
            ["backend", "model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "neogate_cost_usd_total", "Cost charged, in USD.", ["backend", "model"], registry=r
        )
        self.ttft = Histogram(
            "neogate_time_to_first_token_seconds",
            "Time from request arrival to the first byte of the answer.",
            ["backend", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "neogate_inter_token_latency_seconds",
            "Mean gap between streamed events of one request.",
            ["backend", "model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "neogate_request_duration_seconds",
            "Total time of a request at the gateway.",
            ["backend", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "neogate_upstream_errors_total",
            "Failed upstream attempts by backend and error code.",
            ["backend", "code"],
            registry=r,
        )
        self.rejections = Counter(
            "neogate_rejections_total",
            "Requests refused at the edge, by reason (budget, rate limit, overload, auth, invalid).",
            ["reason"],
            registry=r,
        )
        self.inflight = Gauge(
            "neogate_backend_inflight_requests",
            "Requests the gateway has in flight per backend.",
            ["backend"],
            registry=r,
        )
        self.divergence = Counter(
            "neogate_usage_divergence_total",
            "Requests whose upstream-reported and gateway-counted tokens diverged past the threshold.",
            ["backend"],
            registry=r,
        )
        self.price_feed_failures = Counter(
            "neogate_price_feed_failures_total",
            "Price-feed polls that failed; the last good prices stay in force.",
            registry=r,
        )
        self.price_feed_skipped_rows = Gauge(
            "neogate_price_feed_skipped_rows",
            "Rows of the last price feed that could not be priced and were skipped.",
            registry=r,
        )
        self.scrape_failures = Counter(
            "neogate_worker_scrape_failures_total",
            "Failed /metrics scrapes of local workers.",
            ["backend"],
            registry=r,
        )
        self.backend_healthy = Gauge(
            "neogate_backend_healthy",
            "1 while a backend is in service, 0 while ejected by the circuit breaker.",
            ["backend"],
            registry=r,
        )
        self.retries = Counter(
            "neogate_retries_total",
            "Attempts after the first for one request (failover).",
            ["backend"],
            registry=r,
        )
        # Provisioning truth per local GPU over the last PROVISIONING_WINDOW_S (see
        # gateway.metering.ledger.provisioning), refreshed in the background from the ledger.
        self.gpu_provisioning = {
            suffix: Gauge(f"neogate_gpu_{suffix}", text, ["backend"], registry=r)
            for suffix, text in PROVISIONING_GAUGES.items()
        }

    def route(self, backend: str, model: str) -> RouteChildren:
        """Children of every per-(backend, model) metric."""
        key = (backend, model)
        found = self._routes.get(key)
        if found is None:
            found = RouteChildren(
                ttft=self.ttft.labels(backend, model),
                itl=self.itl.labels(backend, model),
                duration=self.duration.labels(backend, model),
                prompt=self.tokens.labels(backend, model, "prompt"),
                completion=self.tokens.labels(backend, model, "completion"),
                cached=self.tokens.labels(backend, model, "cached"),
                reasoning=self.tokens.labels(backend, model, "reasoning"),
                cost=self.cost.labels(backend, model),
            )
            self._routes[key] = found
        return found

    def outcome(self, backend: str, model: str, outcome: str) -> Any:
        """The requests counter child for one outcome."""
        key = (backend, model, outcome)
        found = self._outcomes.get(key)
        if found is None:
            found = self._outcomes[key] = self.requests.labels(backend, model, outcome)
        return found

    def backend(self, backend: str) -> BackendChildren:
        """Children of the per-backend gauges."""
        found = self._backends.get(backend)
        if found is None:
            found = self._backends[backend] = BackendChildren(
                healthy=self.backend_healthy.labels(backend),
                inflight=self.inflight.labels(backend),
            )
        return found
