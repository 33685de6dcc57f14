"""Scenario files for `neogate simulate --scenario`: a policy file plus what the simulator needs.

A scenario is YAML with three parts:

    name: bursty-8b
    description: one line saying what it tests
    policy: {...}            # a policy file's backends, models, slo_classes, tenants (the
                             # same schema `neogate serve` reads), or policy_file: PATH
    simulate:
      model: llama-3.1-8b    # the public model the trace asks for
      seed: 1
      trace: {shape: bursty | steady | diurnal | file, ...}
      physics: {<local backend>: {decode: {<context>: {<batch>: tokens/s}},
                                  prefill: {<prompt tokens>: tokens/s}, ...}}
      providers: {<external backend>: {ttft_median_s, itl_median_s, tpm_limit, ...}}
      price_changes: [{at_s, backend, input_per_million, output_per_million}]

The router believes the policy's `gpu` (price, mode, profile); the simulated GPU runs on
`physics` (what was measured), so a wrong belief costs what it would cost in production.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.config import ConfigError, ConfigIssue, GatewayConfig, load_config
from gateway.config.issues import line_of as _line_of
from gateway.profiles import load_profile
from loadtest.simulate.backends import ProviderSpec
from loadtest.simulate.physics import DEFAULT_STEP_TOKEN_BUDGET, GpuPhysics
from loadtest.simulate.scenario import LocalSpec, PriceChange, Scenario, physics_of
from loadtest.simulate.traces import DEFAULT_MIX, Mix, Trace, bursty, diurnal, load_trace, steady
from policies.costmodel import GpuModel
from policies.profile import Profile
from policies.spec import CostPolicySpec
from policies.types import Slo


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShapeSpec(_Spec):
    """Overrides of one class's token-count distributions (lognormal medians and sigmas)."""

    prompt_median: float | None = Field(default=None, gt=0)
    prompt_sigma: float | None = Field(default=None, ge=0)
    prompt_range: tuple[int, int] | None = None
    output_median: float | None = Field(default=None, gt=0)
    output_sigma: float | None = Field(default=None, ge=0)
    output_range: tuple[int, int] | None = None
    max_tokens: int | None = Field(default=None, ge=1)


class TraceSpec(_Spec):
    """Which requests arrive when."""

    shape: Literal["bursty", "steady", "diurnal", "file"]
    duration_s: float | None = Field(default=None, gt=0)
    # steady: the offered concurrency; diurnal: the midday peak (night is `low`).
    concurrency: float = Field(default=16.0, gt=0)
    low: float = Field(default=1.0, gt=0)
    path: str | None = None  # shape: file (JSON lines, relative to the scenario file)
    # Share of requests per SLO class, or per tenant of the policy (its slo_class).
    classes: dict[str, float] = Field(default_factory=lambda: {"interactive": 0.85, "batch": 0.15})
    tenants: dict[str, float] | None = None
    shapes: dict[str, ShapeSpec] = Field(default_factory=dict)


class PhysicsSpec(_Spec):
    """What one local GPU worker really does: a measured profile (a shipped name or a file,
    as `gpu.profile` takes), or its tables inline; plus the serving engine's limits."""

    profile: str | None = None
    decode: dict[int, dict[int, float]] | None = None
    prefill: dict[int, float] | None = None
    max_batch: int | None = Field(default=None, ge=1)
    step_token_budget: int = Field(default=DEFAULT_STEP_TOKEN_BUDGET, ge=2)
    kv_capacity_tokens: int | None = Field(default=None, ge=1)
    source: str = ""


class ProviderSimSpec(_Spec):
    """An external provider's latency (lognormal around the medians) and rate limit."""

    ttft_median_s: float = Field(default=0.35, gt=0)
    ttft_sigma: float = Field(default=0.35, ge=0)
    prefill_tokens_per_s: float = Field(default=20_000.0, gt=0)
    itl_median_s: float = Field(default=0.005, gt=0)
    itl_sigma: float = Field(default=0.2, ge=0)
    tpm_limit: int | None = Field(default=None, ge=1)


class PriceChangeSpec(_Spec):
    at_s: float = Field(ge=0)
    backend: str
    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)


class SimulateSpec(_Spec):
    model: str
    seed: int = 1
    trace: TraceSpec
    physics: dict[str, PhysicsSpec] = Field(default_factory=dict)
    providers: dict[str, ProviderSimSpec] = Field(default_factory=dict)
    price_changes: list[PriceChangeSpec] = Field(default_factory=list)
    prefill_noise_sigma: float = Field(default=0.25, ge=0)


class ScenarioFile(_Spec):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    policy: GatewayConfig | None = None
    policy_file: str | None = None
    simulate: SimulateSpec


# Latency when a scenario does not describe a provider: Groq-like for kind groq, else
# Together-like (DESIGN.md ranges; the default scenario's assumptions).
_GROQ_LIKE = ProviderSimSpec(
    ttft_median_s=0.20, prefill_tokens_per_s=40_000.0, itl_median_s=1 / 750, itl_sigma=0.15
)
_OTHER = ProviderSimSpec()


class LoadedScenario:
    """A scenario file turned into what the engine runs: the world and the trace."""

    def __init__(self, spec: ScenarioFile, config: GatewayConfig, base: Path) -> None:
        self.spec = spec
        self.config = config
        self.base = base
        self.scenario = _world(spec, config, base)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def seed(self) -> int:
        return self.spec.simulate.seed

    def trace(self, duration_s: float | None = None) -> Trace:
        """The scenario's trace; `duration_s` shortens it (the suite's short mode)."""
        return _trace(self.spec, self.config, self.base, duration_s)


def load_scenario(path: Path) -> LoadedScenario:
    """Read and check a scenario file; raises ConfigError naming the field and line."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(source, [ConfigIssue("", None, str(e))]) from e
    if not isinstance(data, dict):
        raise ConfigError(source, [ConfigIssue("", 1, "the file must be a YAML mapping")])
    try:
        spec = ScenarioFile.model_validate(data, context={"base_dir": path.parent})
    except ValidationError as e:
        raise ConfigError(
            source,
            [
                ConfigIssue(
                    ".".join(str(p) for p in err["loc"]), _line_of(node, err["loc"]), err["msg"]
                )
                for err in e.errors()
            ],
        ) from e
    if (spec.policy is None) == (spec.policy_file is None):
        raise ConfigError(source, [ConfigIssue("policy", None, "give policy or policy_file")])
    config = spec.policy
    if config is None:
        assert spec.policy_file is not None
        config = load_config(path.parent / spec.policy_file, env={})
    try:
        return LoadedScenario(spec, config, path.parent)
    except ValueError as e:
        raise ConfigError(source, [ConfigIssue("simulate", None, str(e))]) from e


def _world(spec: ScenarioFile, config: GatewayConfig, base: Path) -> Scenario:
    sim = spec.simulate
    model = next((m for m in config.models if m.name == sim.model), None)
    if model is None:
        raise ValueError(f"simulate.model {sim.model!r} is not a model of the policy")
    locals_: list[LocalSpec] = []
    providers: list[ProviderSpec] = []
    for name in model.backends:
        b = config.backend(name)
        if b.is_local:
            if b.gpu is None:
                raise ValueError(f"local backend {name!r} has no gpu: the simulator needs one")
            belief = GpuModel.from_spec(b.gpu)
            ph = sim.physics.get(name)
            truth = physics_of(b.gpu.profile) if ph is None else _physics(ph, base)
            locals_.append(LocalSpec(name, belief, truth, b.models[sim.model], b.max_concurrency))
            continue
        price = b.price_for(sim.model)
        assert price is not None  # the config validator requires it
        lat = sim.providers.get(name) or (_GROQ_LIKE if b.kind == "groq" else _OTHER)
        providers.append(
            ProviderSpec(
                name,
                b.models[sim.model],
                price.input_per_million,
                price.output_per_million,
                lat.ttft_median_s,
                lat.ttft_sigma,
                lat.prefill_tokens_per_s,
                lat.itl_median_s,
                lat.itl_sigma,
                lat.tpm_limit,
            )
        )
    unknown = (set(sim.physics) - {g.name for g in locals_}) | (
        set(sim.providers) - {p.name for p in providers}
    )
    if unknown:
        raise ValueError(f"simulate names backends the model does not use: {sorted(unknown)}")
    changes = tuple(
        PriceChange(c.at_s, c.backend, c.input_per_million, c.output_per_million)
        for c in sim.price_changes
    )
    bad = {c.backend for c in changes} - {p.name for p in providers}
    if bad:
        raise ValueError(f"price_changes name backends that are not providers: {sorted(bad)}")
    cost = model.policy if isinstance(model.policy, CostPolicySpec) else CostPolicySpec()
    classes = MappingProxyType({k: Slo.from_spec(v) for k, v in config.slo_classes.items()})
    return Scenario(
        tuple(locals_),
        tuple(providers),
        classes,
        prefill_noise_sigma=sim.prefill_noise_sigma,
        name=spec.name,
        public_model=sim.model,
        cost_policy=cost,
        expected_output=MappingProxyType(dict.fromkeys(classes, model.expected_output_tokens)),
        price_changes=changes,
    )


def _physics(p: PhysicsSpec, base: Path) -> GpuPhysics:
    if p.profile is not None:
        if p.decode is not None or p.prefill is not None:
            raise ValueError("physics: give a profile or decode/prefill tables, not both")
        prof = Profile.from_spec(load_profile(p.profile, base))
        if p.max_batch is not None:
            prof = dataclasses.replace(prof, max_batch=p.max_batch)
        return physics_of(
            prof, step_token_budget=p.step_token_budget, kv_capacity_tokens=p.kv_capacity_tokens
        )
    if p.decode is None or p.prefill is None:
        raise ValueError("physics: needs a profile, or both decode and prefill tables")
    return GpuPhysics.from_tables(
        p.decode,
        p.prefill,
        max_batch=p.max_batch or 256,
        step_token_budget=p.step_token_budget,
        kv_capacity_tokens=p.kv_capacity_tokens,
        source=p.source,
    )


def _mix(spec: TraceSpec, config: GatewayConfig) -> tuple[Mix, ...]:
    base = {m.slo_class: m for m in DEFAULT_MIX}
    if spec.tenants is not None:
        tenants = {t.name: t.slo_class for t in config.tenants}
        missing = set(spec.tenants) - set(tenants)
        if missing:
            raise ValueError(f"trace.tenants names tenants the policy lacks: {sorted(missing)}")
        parts = [(share, tenants[name], name) for name, share in spec.tenants.items()]
    else:
        parts = [(share, cls, "") for cls, share in spec.classes.items()]
    out = []
    for share, cls, tenant in parts:
        if cls not in config.slo_classes:
            raise ValueError(f"trace uses SLO class {cls!r}, which the policy does not define")
        m = base.get(cls, base["interactive"])
        o = spec.shapes.get(cls)
        if o is not None:
            m = Mix(
                m.share,
                o.prompt_median or m.prompt_median,
                m.prompt_sigma if o.prompt_sigma is None else o.prompt_sigma,
                o.prompt_range or m.prompt_range,
                o.output_median or m.output_median,
                m.output_sigma if o.output_sigma is None else o.output_sigma,
                o.output_range or m.output_range,
                o.max_tokens or m.max_tokens,
            )
        out.append(
            Mix(
                share,
                m.prompt_median,
                m.prompt_sigma,
                m.prompt_range,
                m.output_median,
                m.output_sigma,
                m.output_range,
                m.max_tokens,
                cls,
                tenant,
            )
        )
    return tuple(out)


def _trace(
    spec: ScenarioFile, config: GatewayConfig, base: Path, duration_s: float | None
) -> Trace:
    t = spec.simulate.trace
    seed = spec.simulate.seed
    mix = _mix(t, config)
    full = t.duration_s
    if t.shape == "file":
        if t.path is None:
            raise ValueError("trace.shape file needs trace.path")
        trace = load_trace(base / t.path)
        if duration_s is not None:
            trace = Trace(
                trace.name, duration_s, tuple(r for r in trace.requests if r.t < duration_s)
            )
        return trace
    d = duration_s or full
    if t.shape == "bursty":
        trace = bursty(seed, d or 1200.0, mix)
    elif t.shape == "steady":
        trace = steady(seed, d or 600.0, mix, t.concurrency, spec.name)
    else:
        trace = diurnal(seed, d or 3600.0, mix, t.low, t.concurrency)
    return Trace(spec.name, trace.duration_s, trace.requests)
