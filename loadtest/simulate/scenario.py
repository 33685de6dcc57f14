"""The simulated world: local GPU workers, external providers and SLO classes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from loadtest.simulate.backends import ProviderSpec
from policies.costmodel import GpuModel
from policies.spec import LLAMA_8B_H100, ThroughputProfileSpec, default_slo_classes
from policies.types import Slo


@dataclass(frozen=True, slots=True)
class LocalSpec:
    """A simulated local GPU worker."""

    name: str
    model: GpuModel
    backend_model: str = "meta-llama/Llama-3.1-8B-Instruct"


@dataclass(frozen=True, slots=True)
class Scenario:
    """The backends, SLO classes and model-error knobs of one simulation."""

    locals: tuple[LocalSpec, ...]
    providers: tuple[ProviderSpec, ...]
    slo_classes: Mapping[str, Slo]
    # Lognormal sigma of per-request prefill speed on local GPUs (prefix caching, kernels,
    # prompt shapes): the router predicts with the nominal speed.
    prefill_noise_sigma: float = 0.25
    # Share of a local GPU a running prefill takes from decoding (chunked prefill).
    prefill_share: float = 0.9
    # Delay before trying the next backend after a 429 or a refused request.
    failover_delay_s: float = 0.05
    # Weight of each new sample in the gateway's EWMAs (provider latency, model error).
    ewma_alpha: float = 0.1

    def gpu_cost_per_hour(self) -> float:
        """What the reserved local GPUs cost per hour, busy or idle."""
        return sum(g.model.price_per_hour for g in self.locals)


def default_scenario(
    gpu_price_per_hour: float = 2.95, profile: ThroughputProfileSpec = LLAMA_8B_H100
) -> Scenario:
    """Two reserved GPUs (default: H100s, Llama-3.1-8B NIM profile) and Groq-like /
    Together-like providers.

    Prices are DESIGN.md's list prices; provider latencies are assumptions in the range
    public benchmarks report for these 8B endpoints (Groq ~0.2 s TTFT, ~750 tokens/s;
    Together ~0.35 s TTFT, ~200 tokens/s).
    """
    gpu = GpuModel.from_profile(profile, gpu_price_per_hour, "reserved")
    return Scenario(
        locals=(LocalSpec("gpu-a", gpu), LocalSpec("gpu-b", gpu)),
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
