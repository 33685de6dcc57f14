"""Who is asking: tenant API keys (hashed), anonymous access on loopback, and the admin key."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from gateway.config import (
    BudgetSpec,
    GatewayConfig,
    RateLimitSpec,
    RequestLimitSpec,
    TenantSpec,
)
from gateway.errors import Unauthenticated
from policies.spec import PolicySpec


@dataclass(frozen=True, slots=True)
class Tenant:
    """A tenant as the request path sees it."""

    name: str
    slo_class: str
    allowed_models: frozenset[str] | None
    policy: PolicySpec | None
    budgets: BudgetSpec
    rate_limits: RateLimitSpec
    limits: RequestLimitSpec

    @classmethod
    def from_spec(cls, spec: TenantSpec) -> Tenant:
        return cls(
            name=spec.name,
            slo_class=spec.slo_class,
            allowed_models=frozenset(spec.allowed_models)
            if spec.allowed_models is not None
            else None,
            policy=spec.policy,
            budgets=spec.budgets,
            rate_limits=spec.rate_limits,
            limits=spec.limits,
        )


class KeyLookup(Protocol):
    """Maps a presented key to its tenant name, comparing hashes in constant time."""

    def authenticate(self, presented: str) -> str | None: ...


def bearer(headers: Mapping[str, str]) -> str | None:
    """The key from `Authorization: Bearer <key>` (or `api-key`), or None."""
    header = headers.get("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return headers.get("api-key")


class Authenticator:
    """Resolves every request to a tenant, or refuses it with 401."""

    def __init__(
        self,
        config: GatewayConfig,
        keys: KeyLookup,
        *,
        anonymous_allowed: bool,
        admin_key: str | None,
    ) -> None:
        self._tenants = {t.name: Tenant.from_spec(t) for t in config.tenants}
        self._keys = keys
        self._anonymous: Tenant | None = None
        if anonymous_allowed:
            name = config.auth.anonymous_tenant
            spec = next((t for t in config.tenants if t.name == name), TenantSpec(name=name))
            self._anonymous = Tenant.from_spec(spec)
        self._admin_key = admin_key.encode() if admin_key else None

    def tenant_for(self, headers: Mapping[str, str]) -> Tenant:
        presented = bearer(headers)
        if presented is None:
            if self._anonymous is not None:
                return self._anonymous
            raise Unauthenticated(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            )
        name = self._keys.authenticate(presented)
        if name is None:
            if self._anonymous is None:
                raise Unauthenticated("Incorrect API key provided.")
            # Keyless mode: SDKs insist on sending some key, so the anonymous tenant's name
            # stands for "no key". Any other key is a mistake (a mistyped tenant key would
            # otherwise be served, and billed, anonymously).
            if presented == self._anonymous.name:
                return self._anonymous
            raise Unauthenticated(
                "Incorrect API key provided. This gateway serves loopback clients without "
                f"a key: send no key, or the key {self._anonymous.name!r}; any other key "
                "must be a tenant key (`neogate keys create`)."
            )
        tenant = self._tenants.get(name)
        if tenant is None:
            tenant = Tenant.from_spec(TenantSpec(name=name))
            self._tenants[name] = tenant
        return tenant

    def tenant_named(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    def is_admin(self, request: web.Request) -> bool:
        presented = bearer(request.headers)
        if presented is None or self._admin_key is None:
            return False
        return hmac.compare_digest(presented.encode(), self._admin_key)
