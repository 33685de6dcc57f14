"""What an operator watches of the sharing through Redis: the limit store's outages (`SharedMetrics`)
and the backend-state updates exchanged with other replicas (`StateMetrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class SharedMetrics:
    """What an operator watches during a Redis outage."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.up = Gauge(
            "neogate_redis_up",
            "1 while shared limits and state go through Redis, 0 during an outage.",
            registry=r,
        )
        self.outages = Counter(
            "neogate_redis_outages_total", "Times Redis stopped answering.", registry=r
        )
        self.local = Counter(
            "neogate_limits_decided_locally_total",
            "Admission operations decided in-process because Redis was down (fail open).",
            ["op"],
            registry=r,
        )
        self.refused = Counter(
            "neogate_limits_refused_redis_down_total",
            "Requests refused with 503 because Redis was down (fail closed).",
            registry=r,
        )
        self.reseeds = Counter(
            "neogate_redis_reseeds_total",
            "Times Redis came back empty and its counters were rebuilt from the ledger.",
            registry=r,
        )
        self.transfers = Counter(
            "neogate_redis_transfers_total",
            "Batches of outage-time deltas added to Redis after an outage, by result.",
            ["result"],
            registry=r,
        )
        self.up.set(1)


class StateMetrics:
    """Updates exchanged with other replicas, by direction and kind (bounded labels)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.updates = Counter(
            "neogate_shared_state_updates_total",
            "Backend-state updates published to or applied from other replicas.",
            ["direction", "kind"],
            registry=r,
        )
        self.errors = Counter(
            "neogate_shared_state_errors_total",
            "Failed exchanges with Redis for shared backend state (retried).",
            registry=r,
        )
