"""Ledger aggregations: usage by day/model/backend/tenant, the per-backend pricing sheet, spend.

Every query is portable SQL over a `LedgerStore` (SQLite and PostgreSQL), with
``?`` placeholders. Money stays integer nano-dollars until it is shown.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from gateway.metering.ledger.rows import LedgerStore
from gateway.metering.money import NUSD_PER_USD

GROUP_KEYS = ("day", "model", "backend", "tenant", "backend_model", "outcome", "token_source")
BATCH_BUCKETS = ((1, "1"), (4, "2-4"), (8, "5-8"), (16, "9-16"), (32, "17-32"), (64, "33-64"))
NO_BATCH = "-"  # external backends: the batch is the provider's business


@dataclass(frozen=True, slots=True)
class TenantSpend:
    """What a tenant has spent so far (from the ledger) in the current day, month, total."""

    day_nusd: int = 0
    day_tokens: int = 0
    month_nusd: int = 0
    month_tokens: int = 0
    total_nusd: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group of the usage report."""

    group: tuple[tuple[str, str], ...]  # (key, value) in the order asked for
    requests: int
    attempts: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    cost_nusd: int
    divergent: int

    @property
    def cost_usd(self) -> Decimal:
        return Decimal(self.cost_nusd) / NUSD_PER_USD

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: group keys, counts, cost_usd (float, for display) and exact cost_nusd."""
        return {
            **dict(self.group),
            "requests": self.requests,
            "attempts": self.attempts,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cost_usd": float(self.cost_usd),
            "cost_nusd": self.cost_nusd,
            "divergent": self.divergent,
        }


@dataclass(frozen=True, slots=True)
class PricingRow:
    """What a backend was paid per million tokens at one observed batch-size bucket."""

    backend: str
    is_local: bool
    batch: str  # "1", "2-4", ..., "65+", or "-" when no batch size was seen
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_nusd: int
    charged_in_usd_per_m: float | None  # token-weighted unit prices actually charged
    charged_out_usd_per_m: float | None
    list_in_usd_per_m: float | None  # the backend's most recent unit prices
    list_out_usd_per_m: float | None
    price_version: str

    @property
    def cost_usd(self) -> Decimal:
        return Decimal(self.cost_nusd) / NUSD_PER_USD

    @property
    def effective_usd_per_m(self) -> float | None:
        """Cost per million tokens, input and output together."""
        tokens = self.prompt_tokens + self.completion_tokens
        return None if tokens == 0 else float(self.cost_usd) * 1e6 / tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "is_local": self.is_local,
            "batch": self.batch,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": float(self.cost_usd),
            "effective_usd_per_m": self.effective_usd_per_m,
            "charged_in_usd_per_m": self.charged_in_usd_per_m,
            "charged_out_usd_per_m": self.charged_out_usd_per_m,
            "list_in_usd_per_m": self.list_in_usd_per_m,
            "list_out_usd_per_m": self.list_out_usd_per_m,
            "price_version": self.price_version,
        }


def _where(since: float | None, until: float | None, tenant: str | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if since is not None:
        clauses.append("ts >= ?")
        params.append(since)
    if until is not None:
        clauses.append("ts < ?")
        params.append(until)
    if tenant is not None:
        clauses.append("tenant = ?")
        params.append(tenant)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


async def usage_report(
    store: LedgerStore,
    by: Sequence[str] = ("day", "model"),
    *,
    since: float | None = None,
    until: float | None = None,
    tenant: str | None = None,
) -> list[UsageRow]:
    """Tokens, cost and requests grouped by `by` (a subset of GROUP_KEYS), in [since, until)."""
    keys = list(dict.fromkeys(by))
    bad = [k for k in keys if k not in GROUP_KEYS]
    if bad:
        raise ValueError(f"cannot group by {bad}: choose from {', '.join(GROUP_KEYS)}")
    where, params = _where(since, until, tenant)
    select_keys = "".join(f"{k}, " for k in keys)
    group = f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}" if keys else ""
    sql = (
        f"SELECT {select_keys}COUNT(DISTINCT request_id), COUNT(*), SUM(prompt_tokens), "
        "SUM(completion_tokens), SUM(cached_tokens), SUM(reasoning_tokens), SUM(cost_nusd), "
        f"SUM(CASE WHEN divergent THEN 1 ELSE 0 END) FROM ledger{where}{group}"
    )
    out: list[UsageRow] = []
    for rec in await store.fetch(sql, params):
        n = len(keys)
        counts = [int(v or 0) for v in rec[n:]]
        if counts[1] == 0:
            continue  # no rows at all: the ungrouped aggregate still returns one line
        out.append(UsageRow(tuple(zip(keys, (str(v) for v in rec[:n]), strict=True)), *counts))
    return out


def _bucket_sql() -> str:
    whens = " ".join(f"WHEN batch_size <= {hi} THEN '{label}'" for hi, label in BATCH_BUCKETS)
    return f"CASE WHEN batch_size IS NULL THEN '{NO_BATCH}' {whens} ELSE '65+' END"


def _per_m(nusd_per_m: Any) -> float | None:
    return None if nusd_per_m is None else float(nusd_per_m) / NUSD_PER_USD


async def pricing_sheet(
    store: LedgerStore,
    *,
    since: float | None = None,
    until: float | None = None,
    tenant: str | None = None,
) -> list[PricingRow]:
    """Per backend and batch-size bucket: tokens, cost, $/M charged, beside the list price."""
    where, params = _where(since, until, tenant)
    bucket = _bucket_sql()
    dbl = "DOUBLE PRECISION"  # REAL affinity in SQLite, float8 in PostgreSQL
    sql = (
        f"SELECT backend, MAX(CASE WHEN is_local THEN 1 ELSE 0 END), {bucket} AS bucket, "
        "COUNT(DISTINCT request_id), SUM(prompt_tokens), SUM(completion_tokens), "
        f"SUM(cost_nusd), SUM(CAST(prompt_tokens AS {dbl}) * price_in_nusd_per_m), "
        f"SUM(CAST(completion_tokens AS {dbl}) * price_out_nusd_per_m) "
        f"FROM ledger{where} GROUP BY backend, {bucket} ORDER BY backend, MIN(batch_size)"
    )
    latest_sql = (
        "SELECT l.backend, l.price_in_nusd_per_m, l.price_out_nusd_per_m, l.price_version "
        f"FROM ledger l JOIN (SELECT backend, MAX(ts) AS ts FROM ledger{where} GROUP BY backend) m "
        "ON l.backend = m.backend AND l.ts = m.ts"
    )
    latest: dict[str, tuple[Any, Any, str]] = {}
    for backend, p_in, p_out, version in await store.fetch(latest_sql, params):
        latest.setdefault(backend, (p_in, p_out, version))
    out: list[PricingRow] = []
    for rec in await store.fetch(sql, params):
        backend, local, label, reqs, p_tok, c_tok, cost, w_in, w_out = rec
        p_tok, c_tok = int(p_tok or 0), int(c_tok or 0)
        list_in, list_out, version = latest.get(backend, (None, None, ""))
        out.append(
            PricingRow(
                backend=backend,
                is_local=bool(local),
                batch=label,
                requests=int(reqs),
                prompt_tokens=p_tok,
                completion_tokens=c_tok,
                cost_nusd=int(cost or 0),
                charged_in_usd_per_m=_per_m(w_in / p_tok) if p_tok else None,
                charged_out_usd_per_m=_per_m(w_out / c_tok) if c_tok else None,
                list_in_usd_per_m=_per_m(list_in),
                list_out_usd_per_m=_per_m(list_out),
                price_version=version,
            )
        )
    return out


def period_starts(now: float) -> tuple[float, float]:
    """Unix times of the start of the current UTC day and month."""
    t = time.gmtime(now)
    day = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
    month = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    return float(day), float(month)


async def spend_by_tenant(
    store: LedgerStore, now: float, *, before: float | None = None
) -> dict[str, TenantSpend]:
    """Each tenant's spend (nano-USD, prompt+completion tokens) this day, this month, ever.

    Seeds `Admission.seed` at start so budgets survive restarts. `before` counts only
    attempts that finished before that time (a Redis rebuild's cut-off: later ones are
    in the replicas' own deltas).
    """
    day, month = period_starts(now)
    tok = "(prompt_tokens + completion_tokens)"
    sql = (
        "SELECT tenant, "
        "SUM(CASE WHEN ts >= ? THEN cost_nusd ELSE 0 END), "
        f"SUM(CASE WHEN ts >= ? THEN {tok} ELSE 0 END), "
        "SUM(CASE WHEN ts >= ? THEN cost_nusd ELSE 0 END), "
        f"SUM(CASE WHEN ts >= ? THEN {tok} ELSE 0 END), "
        f"SUM(cost_nusd), SUM{tok} FROM ledger"
        + (" WHERE ts < ?" if before is not None else "")
        + " GROUP BY tenant"
    )
    params: list[object] = [day, day, month, month]
    if before is not None:
        params.append(before)
    rows = await store.fetch(sql, params)
    return {r[0]: TenantSpend(*(int(v or 0) for v in r[1:])) for r in rows}
