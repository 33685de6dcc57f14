"""Idle GPU time: what a local GPU cost while held beyond the GPU time attributed to requests.

A local GPU is paid per hour while it is held (docs/economics.md). Requests are
attributed the GPU time they took (their ledger rows); the rest of the held cost is
idle. `ledger.idle_cost` says who carries it, always as its own line, never folded into
a request's cost:

- `operator` (default): one line per GPU, tenant `(operator)`;
- `pro_rata`: split over the tenants in proportion to their attributed cost on that GPU
  (the operator's line when nothing was attributed).

Hours held is the report's window: neogate does not start or stop GPUs, so a GPU is
taken as held for the whole window (exact for reserved GPUs; an upper bound for
on_demand ones that were not up all along).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from gateway.metering.ledger.rows import LedgerStore
from gateway.metering.money import NUSD_PER_USD, usd_to_nusd

IdlePolicy = Literal["operator", "pro_rata"]
# The tenant of costs the operator carries (as in gateway.flow.meter).
OPERATOR = "(operator)"


@dataclass(frozen=True, slots=True)
class IdleLine:
    """One line of idle GPU cost: a GPU, who carries this share, and the GPU's totals."""

    backend: str
    tenant: str
    hours: float
    held_nusd: int  # the GPU's held cost over the window
    attributed_nusd: int  # what requests on it were attributed, all tenants
    idle_nusd: int  # this line's share of held - attributed (negative: over-attributed)

    def as_dict(self) -> dict[str, Any]:
        usd = NUSD_PER_USD
        return {
            "backend": self.backend,
            "tenant": self.tenant,
            "hours": round(self.hours, 4),
            "held_usd": float(Decimal(self.held_nusd) / usd),
            "attributed_usd": float(Decimal(self.attributed_nusd) / usd),
            "idle_usd": float(Decimal(self.idle_nusd) / usd),
        }


def split_idle(
    backend: str,
    hours: float,
    price_per_hour: float,
    attributed_by_tenant: Mapping[str, int],
    policy: IdlePolicy,
) -> list[IdleLine]:
    """The idle lines of one GPU held `hours` at `price_per_hour` (nano-USD, exact sums)."""
    held = usd_to_nusd(Decimal(repr(price_per_hour)) * Decimal(repr(hours)))
    attributed = sum(attributed_by_tenant.values())
    idle = held - attributed
    base = (backend, hours, held, attributed)
    payers = {t: v for t, v in attributed_by_tenant.items() if v > 0}
    if policy == "operator" or not payers:
        return [IdleLine(base[0], OPERATOR, *base[1:], idle)]
    total = sum(payers.values())
    shares = {t: idle * v // total for t, v in sorted(payers.items())}
    # Integer division leaves a few nano-dollars: the largest payer takes them.
    largest = max(sorted(payers), key=lambda t: payers[t])
    shares[largest] += idle - sum(shares.values())
    return [IdleLine(base[0], t, *base[1:], v) for t, v in shares.items()]


async def idle_report(
    store: LedgerStore,
    gpus: Mapping[str, float],
    since: float,
    until: float,
    policy: IdlePolicy = "operator",
) -> list[IdleLine]:
    """Idle lines of every local GPU in `gpus` (backend -> USD per hour) over [since, until)."""
    rows = await store.fetch(
        "SELECT backend, tenant, SUM(cost_nusd) FROM ledger WHERE is_local AND ts >= ? "
        "AND ts < ? GROUP BY backend, tenant",
        [since, until],
    )
    by_backend: dict[str, dict[str, int]] = {name: {} for name in gpus}
    for backend, tenant, cost in rows:
        if backend in by_backend:
            by_backend[backend][str(tenant)] = int(cost or 0)
    hours = max(until - since, 0.0) / 3600.0
    out: list[IdleLine] = []
    for name, price in sorted(gpus.items()):
        out += split_idle(name, hours, price, by_backend[name], policy)
    return out
