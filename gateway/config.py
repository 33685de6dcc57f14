"""The policy YAML: frozen pydantic models, environment references, and errors that name field and line.

This is the only module that reads environment variables. Secrets are referenced
from YAML as `env:NAME` and resolved here; the YAML never holds them.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.profiles import load_profile
from policies.spec import CostPolicySpec, GpuSpec, PolicySpec, SloClassSpec, default_slo_classes

LOCAL_KINDS = frozenset({"vllm", "sglang"})
BackendKind = Literal[
    "vllm", "sglang", "openai_compatible", "openai", "groq", "together", "fireworks", "nebius"
]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(Model):
    """Per-backend timeouts in seconds."""

    connect_s: float = Field(default=3.0, gt=0)
    first_byte_s: float = Field(default=60.0, gt=0)
    idle_s: float = Field(default=60.0, gt=0)
    total_s: float = Field(default=600.0, gt=0)


class PriceSpec(Model):
    """List price in USD per million tokens."""

    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)
    cached_input_per_million: float | None = Field(default=None, ge=0)


class ProviderLimitSpec(Model):
    """Per-minute limits a provider enforces but does not send (e.g. Groq's requests per minute)."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)


class BackendSpec(Model):
    """One upstream: a local GPU worker or an external provider."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    kind: BackendKind = "openai_compatible"
    base_url: str
    api_key: str | None = None  # `env:NAME`, resolved at load
    models: dict[str, str] = Field(min_length=1)  # public model name -> backend model id
    price: PriceSpec | None = None
    model_prices: dict[str, PriceSpec] = Field(default_factory=dict)  # per public model overrides
    gpu: GpuSpec | None = None
    metrics_url: str | None = None  # default for vllm/sglang: <base without /v1>/metrics
    timeouts: Timeouts = Timeouts()
    max_concurrency: int = Field(default=256, ge=1)
    # Limits the provider does not send in its headers; counted against our own traffic.
    rate_limits: ProviderLimitSpec | None = None
    # Extra client headers this backend may receive (on top of the gateway's allow-list).
    forward_headers: list[str] = Field(default_factory=list)
    # Public model -> the embedding model (one vector space) this backend's embeddings are
    # from, where its backend model id does not say so (providers name one model differently).
    embeddings: dict[str, str] = Field(default_factory=dict)

    @field_validator("gpu", mode="before")
    @classmethod
    def _named_profile(cls, v: Any, info: ValidationInfo) -> Any:
        # `gpu.profile` may name a shipped profile or a file (relative to the policy file).
        if isinstance(v, dict) and isinstance(v.get("profile"), str):
            base = (info.context or {}).get("base_dir")
            v = {**v, "profile": load_profile(v["profile"], base)}
        return v

    @field_validator("base_url", "metrics_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/") if v else v

    @field_validator("api_key")
    @classmethod
    def _env_ref(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("env:"):
            raise ValueError("secrets are referenced as env:NAME, never written into the file")
        return v

    @model_validator(mode="after")
    def _priced(self) -> BackendSpec:
        if self.is_local and self.gpu is None and self.price is None:
            raise ValueError("a local worker needs `gpu` (price per hour and profile) or `price`")
        if not self.is_local and self.price is None:
            missing = set(self.models) - set(self.model_prices)
            if missing:
                raise ValueError(
                    f"an external provider needs `price` (unpriced: {sorted(missing)})"
                )
        unknown = set(self.model_prices) - set(self.models)
        if unknown:
            raise ValueError(
                f"model_prices names models this backend does not map: {sorted(unknown)}"
            )
        stray = set(self.embeddings) - set(self.models)
        if stray:
            raise ValueError(f"embeddings names models this backend does not map: {sorted(stray)}")
        return self

    def embedding_space(self, model: str) -> str:
        """The vector space of this backend's embeddings for `model`: declared, else its id."""
        return self.embeddings.get(model) or self.models[model]

    def price_for(self, model: str) -> PriceSpec | None:
        """The list price of `model` on this backend (model override, then backend price)."""
        return self.model_prices.get(model, self.price)

    @property
    def is_local(self) -> bool:
        return self.kind in LOCAL_KINDS


class ModelSpec(Model):
    """A public model name and the backends that can serve it."""

    name: str = Field(min_length=1, max_length=256)
    backends: list[str] = Field(min_length=1)
    policy: PolicySpec = Field(default_factory=CostPolicySpec)
    expected_output_tokens: int = Field(default=256, ge=1)


class BudgetSpec(Model):
    usd_per_day: float | None = Field(default=None, ge=0)
    usd_per_month: float | None = Field(default=None, ge=0)
    usd_total: float | None = Field(default=None, ge=0)
    tokens_per_day: int | None = Field(default=None, ge=0)
    tokens_per_month: int | None = Field(default=None, ge=0)
    tokens_total: int | None = Field(default=None, ge=0)


class RateLimitSpec(Model):
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)


class RequestLimitSpec(Model):
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_tokens: int = Field(default=32_768, ge=1)
    max_n: int = Field(default=8, ge=1)
    max_messages: int = Field(default=2048, ge=1)


class TenantSpec(Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    api_keys: list[str] = Field(default_factory=list)  # env:NAME references
    slo_class: str = "interactive"
    allowed_models: list[str] | None = None  # None: every model
    policy: PolicySpec | None = None  # overrides the model's policy for this tenant
    budgets: BudgetSpec = BudgetSpec()
    rate_limits: RateLimitSpec = RateLimitSpec()
    limits: RequestLimitSpec = RequestLimitSpec()

    @field_validator("api_keys")
    @classmethod
    def _env_refs(cls, v: list[str]) -> list[str]:
        for ref in v:
            if not ref.startswith("env:"):
                raise ValueError("keys are referenced as env:NAME, never written into the file")
        return v


class ListenSpec(Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Inference requests are read by neogate's own HTTP/1.1 edge (gateway.edge);
    # false leaves every connection to aiohttp (slower, for comparison or a suspected edge bug).
    fast_edge: bool = True
    # Per-connection time limits (gateway.conn_deadlines), on both roads: a request head
    # must be whole within head_timeout_s of its first byte, its body within body_timeout_s
    # of the head; a connection without a request in progress closes after keepalive_s.
    head_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    body_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    keepalive_s: float = Field(default=75.0, gt=0, le=3600)


class AdminSpec(Model):
    api_key: str | None = "env:NEOGATE_ADMIN_KEY"
    port: int | None = Field(default=None, ge=0, le=65535)  # separate admin listener
    host: str = "127.0.0.1"  # the separate admin listener's address


class AuthSpec(Model):
    # The embedded default serves without keys, but only while bound to loopback.
    allow_anonymous_on_loopback: bool = False
    anonymous_tenant: str = "anonymous"
    server_secret: str | None = "env:NEOGATE_SECRET"  # HMAC key for stored API key hashes


class LedgerSpec(Model):
    # "none" exists for the metering-off benchmark comparison; never run production without a ledger.
    kind: Literal["sqlite", "postgres", "none"] = "sqlite"
    path: str = "neogate-data/ledger.db"
    dsn: str | None = None  # env:NAME or a postgres:// URL without a password
    spool_path: str = "neogate-data/ledger.spool"
    schema_name: str = Field(default="neogate", pattern=r"^[a-z_][a-z0-9_]{0,62}$")  # PostgreSQL
    divergence_threshold: float = Field(default=0.1, ge=0)
    # Who carries a local GPU's idle time (held cost - attributed): docs/economics.md.
    idle_cost: Literal["operator", "pro_rata"] = "operator"


class TokenizerSpec(Model):
    source: Literal["auto", "tiktoken", "bpe-openai", "file", "estimate"] = "auto"
    encoding: str = "cl100k_base"
    path: str | None = None


class PriceFeedSpec(Model):
    url: str
    format: Literal["openrouter", "neogate"] = "neogate"
    interval_s: float = Field(default=60.0, gt=0)
    # feed model id -> (backend, public model) it prices, for OpenRouter-style ids
    map: dict[str, str] = Field(default_factory=dict)


class RoutingSpec(Model):
    scrape_interval_s: float = Field(default=2.0, gt=0)
    metrics_stale_after_s: float = Field(default=10.0, gt=0)
    ewma_alpha: float = Field(default=0.2, gt=0, le=1)
    queue_max: int = Field(default=1024, ge=0)


class RedisSpec(Model):
    """Shared state across processes and replicas."""

    url: str  # redis://host:port/db (a password, if any, as env:NAME in password)
    password: str | None = None  # env:NAME
    on_outage: Literal["open", "closed"] = "open"  # open: local limits, flagged; closed: reject
    key_prefix: str = "neogate"


class ReliabilitySpec(Model):
    """Failover, circuit breaking, back-pressure and hedging."""

    max_attempts: int = Field(default=3, ge=1, le=10)
    retry_budget_ratio: float = Field(default=0.2, ge=0, le=1)
    # Retries per 10-s window allowed whatever the traffic (Finagle's floor: 10 per second).
    # With 10 per window, a backend hanging on 30% of its requests at a few dozen req/s
    # ran the budget dry and its timeouts reached clients (the soak's "hang" phase).
    retry_budget_min: int = Field(default=100, ge=0)
    breaker_consecutive_failures: int = Field(default=5, ge=1)
    # Not above retry_budget_ratio: a backend failing more often than retries can cover
    # would otherwise turn its failures into client errors without ever being ejected.
    breaker_failure_rate: float = Field(default=0.2, gt=0, le=1)
    breaker_base_ejection_s: float = Field(default=5.0, gt=0)
    breaker_max_ejection_s: float = Field(default=300.0, gt=0)
    max_queue: int = Field(default=512, ge=0)
    queue_wait_s: float = Field(default=2.0, ge=0)
    hedge: bool = False
    hedge_delay_s: float | None = Field(default=None, gt=0)
    drain_timeout_s: float = Field(default=30.0, gt=0)
    write_buffer_bytes: int = Field(default=256 * 1024, ge=4096)


class GatewayConfig(Model):
    """The whole policy file."""

    listen: ListenSpec = ListenSpec()
    admin: AdminSpec = AdminSpec()
    auth: AuthSpec = AuthSpec()
    backends: list[BackendSpec] = Field(min_length=1)
    models: list[ModelSpec] = Field(min_length=1)
    tenants: list[TenantSpec] = Field(default_factory=list)
    slo_classes: dict[str, SloClassSpec] = Field(default_factory=default_slo_classes)
    ledger: LedgerSpec = LedgerSpec()
    tokenizer: TokenizerSpec = TokenizerSpec()
    price_feed: PriceFeedSpec | None = None
    routing: RoutingSpec = RoutingSpec()
    reliability: ReliabilitySpec = ReliabilitySpec()
    redis: RedisSpec | None = None
    max_inflight: int = Field(default=4096, ge=1)

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique: {names}")
        by_name = {b.name: b for b in self.backends}
        public = [m.name for m in self.models]
        if len(set(public)) != len(public):
            raise ValueError(f"model names must be unique: {public}")
        for m in self.models:
            for b in m.backends:
                if b not in by_name:
                    raise ValueError(f"model {m.name!r} names unknown backend {b!r}")
                if m.name not in by_name[b].models:
                    raise ValueError(f"backend {b!r} has no mapping for model {m.name!r}")
            declared = {b: by_name[b].embeddings[m.name] for b in m.backends
                        if m.name in by_name[b].embeddings}  # fmt: skip
            if len(set(declared.values())) > 1:
                spaces = ", ".join(f"{b} serves {e}" for b, e in declared.items())
                raise ValueError(
                    f"model {m.name!r} mixes embedding models ({spaces}): their vectors are "
                    "not comparable, so one model name must be one embedding model; "
                    "split it into one model per embedding model"
                )
        tenants = [t.name for t in self.tenants]
        if len(set(tenants)) != len(tenants):
            raise ValueError(f"tenant names must be unique: {tenants}")
        for t in self.tenants:
            if t.slo_class not in self.slo_classes:
                raise ValueError(f"tenant {t.name!r} uses unknown slo_class {t.slo_class!r}")
        return self

    def backend(self, name: str) -> BackendSpec:
        return next(b for b in self.backends if b.name == name)


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a policy file, located by field path and (where known) line."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.path or '<root>'}: {self.message}"


class ConfigError(Exception):
    """A policy file that must not start a server; carries every issue found."""

    def __init__(self, source: str, issues: Sequence[ConfigIssue]) -> None:
        self.source = source
        self.issues = list(issues)
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.issues)} error(s)"]
        lines += [f"  {issue}" for issue in self.issues]
        return "\n".join(lines)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate a policy file; raise ConfigError listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [ConfigIssue("", None, f"cannot read file: {exc}")]) from exc
    return parse_config(text, source=str(p), env=env, base_dir=p.parent)


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> GatewayConfig:
    """Validate policy YAML text; `env` defaults to the process environment for env: checks.

    `base_dir` is where relative paths in the file (profile files) are looked up.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(source, [ConfigIssue("", line, f"not valid YAML: {exc}")]) from exc
    if not isinstance(data, dict):
        raise ConfigError(source, [ConfigIssue("", 1, "the file must be a YAML mapping")])
    try:
        config = GatewayConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        issues = [
            ConfigIssue(
                ".".join(str(p) for p in err["loc"]),
                _line_of(node, err["loc"]),
                err["msg"],
            )
            for err in exc.errors()
        ]
        raise ConfigError(source, issues) from exc
    return config


def missing_env(config: GatewayConfig, env: Mapping[str, str] | None = None) -> list[ConfigIssue]:
    """env: references whose variable is unset (a warning for check-config, an error for serve)."""
    environ = os.environ if env is None else env
    out: list[ConfigIssue] = []
    refs: list[tuple[str, str | None]] = [
        (f"backends.{i}.api_key", b.api_key) for i, b in enumerate(config.backends)
    ]
    for i, t in enumerate(config.tenants):
        refs += [(f"tenants.{i}.api_keys.{j}", k) for j, k in enumerate(t.api_keys)]
    for where, ref in refs:
        if ref and ref.startswith("env:") and ref[4:] not in environ:
            out.append(ConfigIssue(where, None, f"environment variable {ref[4:]} is not set"))
    return out


def resolve_secret(ref: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """Turn `env:NAME` into its value (None when unset); other values are returned as they are."""
    if ref is None:
        return None
    environ = os.environ if env is None else env
    if ref.startswith("env:"):
        return environ.get(ref[4:])
    return ref


def is_loopback(host: str) -> bool:
    """True for addresses that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _line_of(node: yaml.Node | None, loc: Sequence[int | str]) -> int | None:
    """Follow a pydantic error location through the YAML node tree to a line number."""
    current = node
    line = current.start_mark.line + 1 if current is not None else None
    for part in loc:
        nxt: Any = None
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                if key.value == str(part):
                    nxt = value
                    line = key.start_mark.line + 1
                    break
        elif (
            isinstance(current, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(current.value)
        ):
            nxt = current.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            break
        current = nxt
    return line
