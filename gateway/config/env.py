"""`env:NAME` secrets: the only reader of environment variables in the gateway.

Secrets are referenced from the YAML as `env:NAME` and resolved here; the YAML never holds them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from gateway.config.issues import ConfigIssue, Loc, field_path
from gateway.config.references import section_items
from gateway.config.schema import GatewayConfig


def missing_env(config: GatewayConfig, env: Mapping[str, str] | None = None) -> list[ConfigIssue]:
    """env: references of a validated config whose variable is unset (no lines: no file)."""
    data = config.model_dump(mode="json")
    return [ConfigIssue(field_path(loc), None, msg) for loc, msg in env_problems(data, env)]


def env_problems(data: dict[str, Any], env: Mapping[str, str] | None) -> list[tuple[Loc, str]]:
    """`env:` secrets the gateway needs whose variable is unset (in `env`, else the process's)."""
    environ = os.environ if env is None else env
    refs: list[tuple[Loc, Any]] = []
    for i, b in section_items(data, "backends"):
        refs.append((("backends", i, "api_key"), b.get("api_key")))
    for i, t in section_items(data, "tenants"):
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
