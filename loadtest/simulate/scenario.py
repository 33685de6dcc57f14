"""The simulated world: local GPU workers, external providers, SLO classes and price changes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from loadtest.simulate.backends import ProviderSpec
from loadtest.simulate.physics import DEFAULT_STEP_TOKEN_BUDGET, GpuPhysics
from policies.costmodel import GpuModel
from policies.profile import Profile
from policies.spec import LLAMA_8B_H100, CostPolicySpec, ThroughputProfileSpec, default_slo_classes
from policies.types import Slo

# What the gateway plans for per class when the client's max_tokens is larger.
DEFAULT_EXPECTED_OUTPUT = MappingProxyType({"interactive": 200, "batch": 400})


@dataclass(frozen=True, slots=True)
class LocalSpec:
    """A simulated local GPU worker: the router's belief about it and what it really does."""

    name: str
    # The router's cost model, built from the config's `gpu` (its belief).
    model: GpuModel
    # The simulated hardware (measured profile), independent of the belief.
    physics: GpuPhysics
    backend_model: str = "meta-llama/Llama-3.1-8B-Instruct"
    max_concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class PriceChange:
    """From `at_s` on, `backend` charges these list prices (USD per million tokens)."""

    at_s: float
    backend: str
    input_per_million: float
    output_per_million: float


@dataclass(frozen=True, slots=True)
class Scenario:
    """The backends, SLO classes and model-error knobs of one simulation."""

    locals: tuple[LocalSpec, ...]
    providers: tuple[ProviderSpec, ...]
    slo_classes: Mapping[str, Slo]
    # Lognormal sigma of per-request prefill speed on local GPUs (prefix caching, kernels,
    # prompt shapes): the router predicts with the nominal speed.
    prefill_noise_sigma: float = 0.25
    # Delay before trying the next backend after a 429 or a refused request.
    failover_delay_s: float = 0.05
    # Weight of each new sample in the gateway's EWMAs (provider latency, model error).
    ewma_alpha: float = 0.1
    name: str = "default"
    public_model: str = "llama-3.1-8b"
    cost_policy: CostPolicySpec = field(default_factory=CostPolicySpec)
    # Output tokens routing plans for, per SLO class (capped by the request's max_tokens).
    expected_output: Mapping[str, int] = field(default_factory=lambda: DEFAULT_EXPECTED_OUTPUT)
    price_changes: tuple[PriceChange, ...] = ()

    def gpu_cost_per_hour(self) -> float:
        """What the local GPUs cost per hour while held (the whole simulated period)."""
        return sum(g.model.price_per_hour for g in self.locals)

    def without_gpus(self) -> Scenario:
        """The same world with no local GPUs at all (the no-GPU fleet)."""
        return Scenario(
            (),
            self.providers,
            self.slo_classes,
            self.prefill_noise_sigma,
            self.failover_delay_s,
            self.ewma_alpha,
            self.name,
            self.public_model,
            self.cost_policy,
            self.expected_output,
            self.price_changes,
        )


def physics_of(profile: ThroughputProfileSpec | Profile, **knobs: int | None) -> GpuPhysics:
    """Physics from a measured profile's figures (its data only, not the router's code).

    `knobs`: `step_token_budget`, `kv_capacity_tokens` (see `GpuPhysics`).
    """
    prof = profile if isinstance(profile, Profile) else Profile.from_spec(profile)
    budget = knobs.get("step_token_budget") or DEFAULT_STEP_TOKEN_BUDGET
    return GpuPhysics.from_tables(
        {c: dict(curve) for c, curve in zip(prof.contexts, prof.curves, strict=True)},
        dict(prof.prefill),
        max_batch=prof.max_batch,
        step_token_budget=max(budget, prof.max_batch + 1),
        kv_capacity_tokens=knobs.get("kv_capacity_tokens"),
        source=prof.name or prof.source,
    )


def default_scenario(
    gpu_price_per_hour: float = 2.95, profile: ThroughputProfileSpec | Profile = LLAMA_8B_H100
) -> Scenario:
    """Two reserved GPUs (default: H100s, Llama-3.1-8B NIM profile) and Groq-like /
    Together-like providers.

    Prices are DESIGN.md's list prices; provider latencies are assumptions in the range
    public benchmarks report for these 8B endpoints (Groq ~0.2 s TTFT, ~750 tokens/s;
    Together ~0.35 s TTFT, ~200 tokens/s).
    """
    gpu = GpuModel.from_profile(profile, gpu_price_per_hour, "reserved")
    physics = physics_of(profile)
    return Scenario(
        locals=(LocalSpec("gpu-a", gpu, physics), LocalSpec("gpu-b", gpu, physics)),
        providers=(
            ProviderSpec(
                "groq", "llama-3.1-8b-instant", 0.05, 0.08, 0.20, 0.35, 40_000.0, 1 / 750, 0.15
            ),
            ProviderSpec(
                "together",
                "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
                0.18,
                0.18,
                0.35,
                0.35,
                20_000.0,
                1 / 200,
                0.20,
            ),
        ),
        slo_classes=MappingProxyType(
            {k: Slo.from_spec(v) for k, v in default_slo_classes().items()}
        ),
    )
