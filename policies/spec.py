"""Configuration specs of the routing core: policies, SLO classes and GPU cost profiles.

These are pydantic models so the gateway's policy YAML can embed them; they are
frozen and forbid unknown fields. The routing functions take plain values built
from them, never the YAML itself.
"""

from __future__ import annotations

from datetime import date
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


# A profile without context lengths is one curve; it applies at every context length.
DEFAULT_CONTEXT_TOKENS = 1024
# A single prefill speed stands for every prompt length.
DEFAULT_PROMPT_TOKENS = 512


class ThroughputProfileSpec(Spec):
    """Measured performance of one model on one GPU setup: decode by batch x context, prefill.

    `decode_tokens_per_s` maps context length (tokens per sequence) to a curve of batch size
    -> total output tokens/s across the batch; a flat `{batch: tokens/s}` mapping is one
    curve for every context length. `prefill_tokens_per_s` is one speed or a mapping of
    prompt length -> tokens/s. Interpolation between points: see `policies.profile`.
    `name`, `describes`, `source` and `measured` (a date) say what the figures are.
    """

    name: str | None = None
    describes: str | None = None
    source: str | None = None
    measured: str | None = None
    decode_tokens_per_s: dict[int, dict[int, float]]
    prefill_tokens_per_s: dict[int, float] = Field(
        default_factory=lambda: {DEFAULT_PROMPT_TOKENS: 10_000.0}
    )
    max_batch: int = Field(default=256, ge=1)
    # The serving engine's chunked-prefill token budget per step (vLLM's
    # `max_num_batched_tokens`, 2048 by default for online serving): while a prompt is
    # prefilled, each step of the running decodes lasts about this many tokens of prefill.
    step_token_budget: int = Field(default=2048, ge=2)
    # Tokens the KV cache holds across all sequences (None: only max_batch limits the batch):
    # at a context of c tokens per sequence at most kv_capacity_tokens // c run at once.
    kv_capacity_tokens: int | None = Field(default=None, ge=1)

    @field_validator("measured", mode="before")
    @classmethod
    def _date_text(cls, v: object) -> object:
        # YAML reads `measured: 2026-12-01` as a date.
        return v.isoformat() if isinstance(v, date) else v

    @field_validator("decode_tokens_per_s", mode="before")
    @classmethod
    def _one_curve(cls, v: object) -> object:
        if (
            isinstance(v, dict)
            and v
            and all(isinstance(t, int | float) and not isinstance(t, bool) for t in v.values())
        ):
            return {DEFAULT_CONTEXT_TOKENS: v}
        return v

    @field_validator("prefill_tokens_per_s", mode="before")
    @classmethod
    def _one_speed(cls, v: object) -> object:
        if isinstance(v, int | float) and not isinstance(v, bool):
            return {DEFAULT_PROMPT_TOKENS: v}
        return v

    @field_validator("decode_tokens_per_s")
    @classmethod
    def _points_positive(cls, v: dict[int, dict[int, float]]) -> dict[int, dict[int, float]]:
        if not v:
            raise ValueError("needs at least one curve")
        for ctx, curve in v.items():
            if ctx < 0:
                raise ValueError(f"context length {ctx} must not be negative")
            if not curve:
                raise ValueError(f"context {ctx}: needs at least one batch point")
            for c, t in curve.items():
                if c < 1 or t <= 0:
                    raise ValueError(f"context {ctx}: batch {c} -> {t}: both must be positive")
        return v

    @field_validator("prefill_tokens_per_s")
    @classmethod
    def _prefill_positive(cls, v: dict[int, float]) -> dict[int, float]:
        if not v:
            raise ValueError("needs at least one prefill speed")
        for n, t in v.items():
            if n < 1 or t <= 0:
                raise ValueError(f"prompt {n} -> {t} tokens/s: both must be positive")
        return v

    def curve(self, context: int | None = None) -> dict[int, float]:
        """The measured curve at `context` (default: the one nearest 1024 tokens)."""
        ctx = context
        if ctx is None:
            ctx = min(self.decode_tokens_per_s, key=lambda c: (abs(c - 1024), c))
        return self.decode_tokens_per_s[ctx]


# NVIDIA NIM 1.8.0, Llama-3.1-8B on one H100 (DESIGN.md reference figures); the shipped
# file policies/profiles/llama-3.1-8b-h100.yaml holds the same figures with provenance.
LLAMA_8B_H100 = ThroughputProfileSpec(
    name="llama-3.1-8b-h100",
    decode_tokens_per_s={
        DEFAULT_CONTEXT_TOKENS: {1: 215, 5: 1077, 25: 4679, 50: 8018, 100: 12215, 200: 13348}
    },
    prefill_tokens_per_s={DEFAULT_PROMPT_TOKENS: 20_000.0},
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
