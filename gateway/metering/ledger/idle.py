"""Idle GPU time: what a local GPU cost while held beyond the GPU time attributed to requests.

A local GPU is paid per hour while it is held (docs/economics.md). Requests are
attributed the GPU time they took (their ledger rows); the rest of the held cost is
idle. `ledger.idle_cost` says who carries it, always as its own line, never folded into
a request's cost:

- `operator` (default): one line per GPU, tenant `(operator)`;
- `pro_rata`: split over the tenants in proportion to their attributed cost on that GPU
  (the operator's line when nothing was attributed).

Hours held: a reserved GPU's are the report's window; an on_demand GPU's are its
observed uptime in the window (`gateway/metering/uptime.py`). With no uptime observed
for an on_demand GPU its held and idle cost are unknown: one line with `hours` None
that says so (`hours_from`), never 0 and never the window.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from gateway.metering.ledger.gpu_uptime import uptime_spans
from gateway.metering.ledger.rows import LedgerStore
from gateway.metering.money import NUSD_PER_USD, usd_to_nusd
from gateway.metering.uptime import HeldFrom, held

IdlePolicy = Literal["operator", "pro_rata"]
# The tenant of costs the operator carries (as in gateway.flow.meter).
OPERATOR = "(operator)"


@dataclass(frozen=True, slots=True)
class IdleLine:
    """One line of idle GPU cost: a GPU, who carries this share, and the GPU's totals."""

    backend: str
    tenant: str
    hours: float | None  # None: an on_demand GPU with no uptime observed
    held_nusd: int | None  # the GPU's held cost over the window
    attributed_nusd: int  # what requests on it were attributed, all tenants
    idle_nusd: int | None  # this line's share of held - attributed (negative: over-attributed)
    hours_from: HeldFrom = "window"

    def as_dict(self) -> dict[str, Any]:
        def usd(nusd: int | None) -> float | None:
            return None if nusd is None else float(Decimal(nusd) / NUSD_PER_USD)

        return {
            "backend": self.backend,
            "tenant": self.tenant,
            "hours": None if self.hours is None else round(self.hours, 4),
            "hours_from": self.hours_from,
            "held_usd": usd(self.held_nusd),
            "attributed_usd": usd(self.attributed_nusd),
            "idle_usd": usd(self.idle_nusd),
        }


def split_idle(
    backend: str,
    hours: float,
    price_per_hour: float,
    attributed_by_tenant: Mapping[str, int],
    policy: IdlePolicy,
    hours_from: HeldFrom = "window",
) -> list[IdleLine]:
    """The idle lines of one GPU held `hours` at `price_per_hour` (nano-USD, exact sums)."""
    held_nusd = usd_to_nusd(Decimal(repr(price_per_hour)) * Decimal(repr(hours)))
    attributed = sum(attributed_by_tenant.values())
    idle = held_nusd - attributed
    base = (backend, hours, held_nusd, attributed)
    payers = {t: v for t, v in attributed_by_tenant.items() if v > 0}
    if policy == "operator" or not payers:
        return [IdleLine(base[0], OPERATOR, *base[1:], idle, hours_from)]
    total = sum(payers.values())
    shares = {t: idle * v // total for t, v in sorted(payers.items())}
    # Integer division leaves a few nano-dollars: the largest payer takes them.
    largest = max(sorted(payers), key=lambda t: payers[t])
    shares[largest] += idle - sum(shares.values())
    return [IdleLine(base[0], t, *base[1:], v, hours_from) for t, v in shares.items()]


async def idle_report(
    store: LedgerStore,
    gpus: Mapping[str, float],
    since: float,
    until: float,
    policy: IdlePolicy = "operator",
    modes: Mapping[str, str] | None = None,
) -> list[IdleLine]:
    """Idle lines of every local GPU in `gpus` (backend -> USD per hour) over [since, until).

    `modes`: backend -> `reserved` | `on_demand` (a GPU not named is reserved).
    """
    rows = await store.fetch(
        "SELECT backend, tenant, SUM(cost_nusd) FROM ledger WHERE is_local AND ts >= ? "
        "AND ts < ? GROUP BY backend, tenant",
        [since, until],
    )
    by_backend: dict[str, dict[str, int]] = {name: {} for name in gpus}
    for backend, tenant, cost in rows:
        if backend in by_backend:
            by_backend[backend][str(tenant)] = int(cost or 0)
    spans = await uptime_spans(store, since, until)
    out: list[IdleLine] = []
    for name, price in sorted(gpus.items()):
        mode = (modes or {}).get(name, "reserved")
        kept = held(mode, spans.get(name, []), since, until)
        if kept.seconds is None:
            attributed = sum(by_backend[name].values())
            out.append(IdleLine(name, OPERATOR, None, None, attributed, None, kept.held_from))
            continue
        out += split_idle(
            name, kept.seconds / 3600.0, price, by_backend[name], policy, kept.held_from
        )
    return out
