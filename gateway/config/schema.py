"""The policy YAML's schema: frozen pydantic models (`extra="forbid"`), one per section."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from gateway.profiles import load_profile
from policies.spec import CostPolicySpec, GpuSpec, PolicySpec, SloClassSpec, default_slo_classes

LOCAL_KINDS = frozenset({"vllm", "sglang"})
# `base_url: sim:worker` / `sim:provider`: a simulated backend that `neogate serve` starts
# in its own process (loopback, random port) and puts in the file's place; see SIMULATED.
SIMULATED = {
    "sim:worker": "a simulated local GPU worker (vLLM wire format, Llama-3.1-8B on H100)",
    "sim:provider": "a simulated external provider (Groq wire format, rate-limit headers)",
}
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

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        if v in SIMULATED:
            return v
        if not v.startswith(("http://", "https://")):
            raise ValueError(
                "must be an http:// or https:// URL, or sim:worker / sim:provider "
                "(a simulated backend that neogate serve starts in-process)"
            )
        return v.rstrip("/")

    @field_validator("metrics_url")
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

    @property
    def simulated(self) -> str | None:
        """`worker` or `provider` for a `sim:` backend not yet started, else None."""
        return self.base_url[4:] if self.base_url in SIMULATED else None


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
    # Inference requests are read by neogate's own HTTP/1.1 edge (gateway.http.edge);
    # false leaves every connection to aiohttp (slower, for comparison or a suspected edge bug).
    fast_edge: bool = True
    # Per-connection time limits (gateway.http.conn_deadlines), on both roads: a request head
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

    def backend(self, name: str) -> BackendSpec:
        return next(b for b in self.backends if b.name == name)

    def with_backend_urls(self, urls: Mapping[str, str]) -> GatewayConfig:
        """The same policy with the named backends' base URLs replaced (started simulations)."""
        backends = [
            b.model_copy(update={"base_url": urls[b.name]}) if b.name in urls else b
            for b in self.backends
        ]
        return self.model_copy(update={"backends": backends})


def is_loopback(host: str) -> bool:
    """True for addresses that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
