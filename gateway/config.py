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


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a policy file, located by field path and (where known) line."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.path or '<root>'}: {self.message}"

    def located(self, source: str) -> str:
        """The issue with the file it is in: `policy.yaml, line 9: models.0.backends.1: ...`."""
        return f"{source}, {self}" if self.line else f"{source}: {self}"


class ConfigError(Exception):
    """A policy file that must not start a server; carries every issue found."""

    def __init__(self, source: str, issues: Sequence[ConfigIssue]) -> None:
        self.source = source
        self.issues = list(issues)
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.issues)} error(s)"]
        lines += [f"  {issue.located(self.source)}" for issue in self.issues]
        return "\n".join(lines)


def load_config(
    path: str | Path, env: Mapping[str, str] | None = None, *, require_env: bool = False
) -> GatewayConfig:
    """Read and validate a policy file; raise ConfigError listing every problem.

    `require_env` (check-config, serve, reload) also refuses `env:` secrets whose
    variable is unset, in the same pass as every other problem.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [ConfigIssue("", None, f"cannot read file: {exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(p), [ConfigIssue("", None, f"not UTF-8 text: {exc}")]) from exc
    return parse_config(text, source=str(p), env=env, require_env=require_env, base_dir=p.parent)


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    require_env: bool = False,
    base_dir: Path | None = None,
) -> GatewayConfig:
    """Validate policy YAML text: schema, cross-references and (with `require_env`) secrets,
    every problem in one pass, each with its field path and line.

    `base_dir` is where relative paths in the file (profile files) are looked up.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [_yaml_issue(exc)]) from exc
    if not isinstance(data, dict):
        raise ConfigError(source, [ConfigIssue("", 1, "the file must be a YAML mapping")])
    issues: list[ConfigIssue] = []
    config: GatewayConfig | None = None
    try:
        config = GatewayConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        issues += [
            ConfigIssue(_path(err["loc"]), _line_of(node, err["loc"]), err["msg"])
            for err in exc.errors()
        ]
    located = [(loc, msg) for loc, msg in _reference_problems(data)]
    if require_env:
        located += _env_problems(data, os.environ if env is None else env)
    issues += [ConfigIssue(_path(loc), _line_of(node, loc), msg) for loc, msg in located]
    if issues or config is None:
        raise ConfigError(source, sorted(issues, key=lambda i: (i.line or 0, i.path)))
    return config


def missing_env(config: GatewayConfig, env: Mapping[str, str] | None = None) -> list[ConfigIssue]:
    """env: references of a validated config whose variable is unset (no lines: no file)."""
    data = config.model_dump(mode="json")
    problems = _env_problems(data, os.environ if env is None else env)
    return [ConfigIssue(_path(loc), None, msg) for loc, msg in problems]


Loc = tuple[int | str, ...]


def _path(loc: Sequence[int | str]) -> str:
    return ".".join(str(p) for p in loc)


def _yaml_issue(exc: yaml.YAMLError) -> ConfigIssue:
    """A YAML syntax error by line and column, without PyYAML's `in "<unicode string>"`."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    what = f"{context}, {problem}" if context else problem
    if mark is None:
        return ConfigIssue("", None, f"not valid YAML: {what}")
    return ConfigIssue("", mark.line + 1, f"not valid YAML: {what} (column {mark.column + 1})")


def _items(data: dict[str, Any], key: str) -> list[tuple[int, dict[str, Any]]]:
    """The mappings of a list section, with their index (other shapes are schema errors)."""
    section = data.get(key)
    if not isinstance(section, list):
        return []
    return [(i, item) for i, item in enumerate(section) if isinstance(item, dict)]


def _names(data: dict[str, Any], key: str) -> list[tuple[int, str]]:
    return [(i, item["name"]) for i, item in _items(data, key) if isinstance(item.get("name"), str)]


def _duplicates(data: dict[str, Any], key: str, what: str) -> list[tuple[Loc, str]]:
    seen: dict[str, int] = {}
    out: list[tuple[Loc, str]] = []
    for i, name in _names(data, key):
        if name in seen:
            out.append(((key, i, "name"), f"{what} {name!r} is defined twice ({key}.{seen[name]})"))
        else:
            seen[name] = i
    return out


def _reference_problems(data: dict[str, Any]) -> list[tuple[Loc, str]]:
    """Names one part of the file uses that another part must define; works on the raw
    data so it reports alongside schema errors instead of after them."""
    out = _duplicates(data, "backends", "backend")
    out += _duplicates(data, "models", "model")
    out += _duplicates(data, "tenants", "tenant")
    backends = {
        name: item
        for i, item in _items(data, "backends")
        if isinstance(name := item.get("name"), str)
    }
    known_backends = ", ".join(sorted(backends)) or "none"
    models = {name for _, name in _names(data, "models")}
    for i, m in _items(data, "models"):
        listed = m.get("backends")
        for j, b in enumerate(listed if isinstance(listed, list) else []):
            if not isinstance(b, str):
                continue
            if b not in backends:
                out.append(
                    (
                        ("models", i, "backends", j),
                        f"unknown backend {b!r} (backends: {known_backends})",
                    )
                )
                continue
            mapped = backends[b].get("models")
            name = m.get("name")
            if isinstance(mapped, dict) and isinstance(name, str) and name not in mapped:
                out.append(
                    (
                        ("models", i, "backends", j),
                        f"backend {b!r} has no mapping for model {name!r} (its models: {', '.join(sorted(map(str, mapped)))})",
                    )
                )
    out += _embedding_problems(data, backends)
    slo = data.get("slo_classes")
    classes = set(slo) if isinstance(slo, dict) else {"interactive", "batch"}
    known_models = ", ".join(sorted(models)) or "none"
    for i, t in _items(data, "tenants"):
        cls = t.get("slo_class")
        if isinstance(cls, str) and cls not in classes:
            out.append(
                (
                    ("tenants", i, "slo_class"),
                    f"unknown slo_class {cls!r} (known: {', '.join(sorted(classes))})",
                )
            )
        allowed = t.get("allowed_models")
        for j, name in enumerate(allowed if isinstance(allowed, list) else []):
            if isinstance(name, str) and name not in models:
                out.append(
                    (
                        ("tenants", i, "allowed_models", j),
                        f"unknown model {name!r} (models: {known_models})",
                    )
                )
    feed = data.get("price_feed")
    feed_map = feed.get("map") if isinstance(feed, dict) else None
    for feed_id, target in feed_map.items() if isinstance(feed_map, dict) else []:
        backend = str(target).partition("/")[0]
        if backend not in backends:
            out.append(
                (
                    ("price_feed", "map", str(feed_id)),
                    f"unknown backend {backend!r} (backends: {known_backends})",
                )
            )
    return out


def _embedding_problems(
    data: dict[str, Any], backends: dict[str, dict[str, Any]]
) -> list[tuple[Loc, str]]:
    """One public model name must be one embedding model: vectors of two are not comparable."""
    out: list[tuple[Loc, str]] = []
    for i, m in _items(data, "models"):
        name, listed = m.get("name"), m.get("backends")
        if not isinstance(name, str) or not isinstance(listed, list):
            continue
        declared: dict[str, Any] = {}
        for b in listed:
            emb = backends.get(b, {}).get("embeddings") if isinstance(b, str) else None
            if isinstance(emb, dict) and name in emb:
                declared[b] = emb[name]
        if len({str(v) for v in declared.values()}) > 1:
            spaces = ", ".join(f"{b} serves {e}" for b, e in declared.items())
            out.append(
                (
                    ("models", i, "backends"),
                    f"model {name!r} mixes embedding models ({spaces}): their vectors are "
                    "not comparable, so one model name must be one embedding model; "
                    "split it into one model per embedding model",
                )
            )
    return out


def _env_problems(data: dict[str, Any], environ: Mapping[str, str]) -> list[tuple[Loc, str]]:
    """`env:` secrets the gateway needs whose variable is unset."""
    refs: list[tuple[Loc, Any]] = []
    for i, b in _items(data, "backends"):
        refs.append((("backends", i, "api_key"), b.get("api_key")))
    for i, t in _items(data, "tenants"):
        keys = t.get("api_keys")
        refs += [
            (("tenants", i, "api_keys", j), k)
            for j, k in enumerate(keys if isinstance(keys, list) else [])
        ]
    ledger = data.get("ledger")
    if isinstance(ledger, dict) and ledger.get("kind") == "postgres":
        refs.append((("ledger", "dsn"), ledger.get("dsn")))
    redis = data.get("redis")
    if isinstance(redis, dict):
        refs.append((("redis", "password"), redis.get("password")))
    return [
        (loc, f"environment variable {ref[4:]} is not set")
        for loc, ref in refs
        if isinstance(ref, str) and ref.startswith("env:") and ref[4:] not in environ
    ]


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
