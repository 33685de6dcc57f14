"""Configuration specs of the routing core: policies, SLO classes and GPU cost profiles.

These are pydantic models so the gateway's policy YAML can embed them; they are
frozen and forbid unknown fields. The routing functions take plain values built
from them, never the YAML itself.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Spec(BaseModel):
    """Base of every config model: frozen, no unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SloClassSpec(Spec):
    """Latency promise of a class of requests; None means no bound."""

    max_ttft_s: float | None = Field(default=None, gt=0)
    max_itl_s: float | None = Field(default=None, gt=0)
    max_total_s: float | None = Field(default=None, gt=0)
    # A class that tolerates delay may wait in the gateway queue for local headroom.
    max_queue_wait_s: float = Field(default=0.0, ge=0)


def default_slo_classes() -> dict[str, SloClassSpec]:
    """The two classes every config has unless it overrides them."""
    return {
        "interactive": SloClassSpec(max_ttft_s=1.0, max_itl_s=0.05),
        "batch": SloClassSpec(max_total_s=600.0, max_queue_wait_s=30.0),
    }


class ThroughputProfileSpec(Spec):
    """Measured decode throughput of one GPU worker by concurrency, plus prefill speed.

    `decode_tokens_per_s` maps concurrency (requests in the batch) to total output
    tokens/s across the batch; values between points are interpolated.
    """

    decode_tokens_per_s: dict[int, float]
    prefill_tokens_per_s: float = Field(default=10_000.0, gt=0)
    max_batch: int = Field(default=256, ge=1)
    # Concurrency past which one more request adds little throughput; derived from the
    # points when None (see policies.costmodel.derive_knee).
    knee: int | None = Field(default=None, ge=1)

    @field_validator("decode_tokens_per_s")
    @classmethod
    def _points_positive(cls, v: dict[int, float]) -> dict[int, float]:
        if not v:
            raise ValueError("needs at least one concurrency point")
        for c, t in v.items():
            if c < 1 or t <= 0:
                raise ValueError(f"concurrency {c} -> {t}: both must be positive")
        return v


# NVIDIA NIM 1.8.0, Llama-3.1-8B on one H100 (DESIGN.md reference figures).
LLAMA_8B_H100 = ThroughputProfileSpec(
    decode_tokens_per_s={1: 215, 5: 1077, 25: 4679, 50: 8018, 100: 12215, 200: 13348},
    prefill_tokens_per_s=20_000.0,
    max_batch=256,
)


class GpuSpec(Spec):
    """A local GPU worker's economics: what it costs per hour and how it performs."""

    price_per_hour: float = Field(gt=0)
    mode: Literal["reserved", "on_demand"] = "reserved"
    profile: ThroughputProfileSpec = LLAMA_8B_H100


class CostPolicySpec(Spec):
    """Cheapest predicted cost among candidates that meet the SLO."""

    kind: Literal["cost"] = "cost"
    # A candidate meets the SLO when prediction + spread_sigmas * spread is within the bound;
    # 2 sigma covers ~98% of a normal prediction error, in line with a 99% SLO target.
    spread_sigmas: float = Field(default=2.0, ge=0)
    # Delay-tolerant requests of other classes use a local worker only while it would still
    # meet this class's SLO; otherwise they wait for headroom, then spill. None: no guard.
    protect_class: str | None = "interactive"


class LatencyPolicySpec(Spec):
    """Fastest predicted total latency."""

    kind: Literal["latency"] = "latency"


class WeightedPolicySpec(Spec):
    """Static weights per backend name."""

    kind: Literal["weighted"] = "weighted"
    weights: dict[str, float]

    @field_validator("weights")
    @classmethod
    def _weights_valid(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        return v


class PinnedPolicySpec(Spec):
    """An ordered list of backends, which is also the fallback order."""

    kind: Literal["pinned"] = "pinned"
    order: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> PinnedPolicySpec:
        if len(set(self.order)) != len(self.order):
            raise ValueError("order lists a backend twice")
        return self


PolicySpec = Annotated[
    CostPolicySpec | LatencyPolicySpec | WeightedPolicySpec | PinnedPolicySpec,
    Field(discriminator="kind"),
]
