"""Admission at the edge: tenant budgets and rate limits, reserved before forwarding and settled after."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.auth import Tenant
from gateway.estimate import Estimate
from gateway.inbound import InboundRequest


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one request holds against its tenant's limits until it is settled."""

    tenant: str
    tokens: int
    cost_usd: float


class Limits:
    """Tenant budgets and rate limits (placeholder: admits everything)."""

    async def reserve(
        self, tenant: Tenant, inbound: InboundRequest, estimate: Estimate
    ) -> Reservation:
        del inbound
        return Reservation(tenant.name, estimate.max_total_tokens, 0.0)
