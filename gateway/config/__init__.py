"""The policy YAML: frozen pydantic models, environment references, and errors that name field and line.

    schema.py      the models, one per section (`GatewayConfig` is the whole file)
    load.py        `load_config` / `parse_config`: the one validator of check-config, serve, reload
    issues.py      `ConfigIssue` (field path and line) and `ConfigError`
    references.py  names one part of the file uses that another must define
    env.py         `env:NAME` secrets: the only module that reads environment variables

Everything public is importable from `gateway.config`.
"""

from gateway.config.env import missing_env, resolve_secret
from gateway.config.issues import ConfigError, ConfigIssue
from gateway.config.load import load_config, parse_config
from gateway.config.schema import (
    LOCAL_KINDS,
    SIMULATED,
    AdminSpec,
    AuthSpec,
    BackendKind,
    BackendSpec,
    BudgetSpec,
    GatewayConfig,
    LedgerSpec,
    ListenSpec,
    Model,
    ModelSpec,
    PriceFeedSpec,
    PriceSpec,
    ProviderLimitSpec,
    RateLimitSpec,
    RedisSpec,
    ReliabilitySpec,
    RequestLimitSpec,
    RoutingSpec,
    TenantSpec,
    Timeouts,
    TokenizerSpec,
    is_loopback,
)

__all__ = [
    "LOCAL_KINDS",
    "SIMULATED",
    "AdminSpec",
    "AuthSpec",
    "BackendKind",
    "BackendSpec",
    "BudgetSpec",
    "ConfigError",
    "ConfigIssue",
    "GatewayConfig",
    "LedgerSpec",
    "ListenSpec",
    "Model",
    "ModelSpec",
    "PriceFeedSpec",
    "PriceSpec",
    "ProviderLimitSpec",
    "RateLimitSpec",
    "RedisSpec",
    "ReliabilitySpec",
    "RequestLimitSpec",
    "RoutingSpec",
    "TenantSpec",
    "Timeouts",
    "TokenizerSpec",
    "is_loopback",
    "load_config",
    "missing_env",
    "parse_config",
    "resolve_secret",
]
