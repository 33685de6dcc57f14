"""Admission: per-tenant budgets (USD, tokens; day, month, total) and rate limits (RPM, TPM).

Before forwarding, `Admission.reserve` adds the request's estimated tokens and cost
to every budget counter of its tenant and takes its share of the rate limits, in
one atomic step of the `LimitStore`; `settle` later replaces the estimate by the
real usage. Reserved amounts count against the budget until settled, so
concurrent requests can overspend by at most what is in flight.

Rate limits are GCRA (a virtual-scheduling token bucket): one timestamp per key,
burst of one minute's worth, and an exact retry-after. Budgets are counters keyed
by UTC period (``acme:usd:d:2025-06-15``) that expire after their period, so the
store never grows. Money is in integer nano-dollars throughout.

The counters and rates live in a `LimitStore` (`gateway.state.limits`).
"""

from __future__ import annotations

import calendar
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from gateway.metering.ledger.reports import TenantSpend
from gateway.metering.money import NUSD_PER_USD, to_decimal, usd_to_nusd
from gateway.state.limits import (
    MINUTE_S,
    CounterCheck,
    LimitStore,
    MemoryLimitStore,
    RateCheck,
    Refusal,
)

_DAY_S = 86_400.0
# Waiting is only worth telling the client about when the budget resets soon.
RETRY_AFTER_MAX_S = 3600.0


class AdmissionRejected(Exception):
    """A request over a tenant budget or rate limit (the edge answers 429).

    `limit` names the limit (e.g. "usd_per_day", "requests_per_minute");
    `retry_after_s` is when waiting helps, None when it does not.
    """

    def __init__(self, limit: str, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.limit = limit
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """One tenant's budgets (nano-USD and tokens) and per-minute rate limits; None: no limit."""

    nusd_per_day: int | None = None
    nusd_per_month: int | None = None
    nusd_total: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    tokens_total: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @classmethod
    def of(
        cls,
        *,
        usd_per_day: Decimal | float | None = None,
        usd_per_month: Decimal | float | None = None,
        usd_total: Decimal | float | None = None,
        tokens_per_day: int | None = None,
        tokens_per_month: int | None = None,
        tokens_total: int | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
    ) -> TenantLimits:
        """Build from USD amounts (as in the YAML)."""

        def nusd(v: Decimal | float | None) -> int | None:
            return None if v is None else usd_to_nusd(to_decimal(v))

        return cls(
            nusd(usd_per_day),
            nusd(usd_per_month),
            nusd(usd_total),
            tokens_per_day,
            tokens_per_month,
            tokens_total,
            requests_per_minute,
            tokens_per_minute,
        )

    @classmethod
    def from_specs(cls, budgets: Any, rate_limits: Any) -> TenantLimits:
        """From the config's BudgetSpec and RateLimitSpec (read by attribute)."""
        return cls.of(
            usd_per_day=budgets.usd_per_day,
            usd_per_month=budgets.usd_per_month,
            usd_total=budgets.usd_total,
            tokens_per_day=budgets.tokens_per_day,
            tokens_per_month=budgets.tokens_per_month,
            tokens_total=budgets.tokens_total,
            requests_per_minute=rate_limits.requests_per_minute,
            tokens_per_minute=rate_limits.tokens_per_minute,
        )

    @property
    def unlimited(self) -> bool:
        return all(getattr(self, f) is None for f in self.__slots__)


# --- admission ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one request holds against its tenant's limits until it is settled."""

    id: int
    tenant: str
    tokens: int
    cost_nusd: int
    counters: tuple[CounterCheck, ...] = ()
    tpm: RateCheck | None = None

    @property
    def cost_usd(self) -> Decimal:
        return Decimal(self.cost_nusd) / NUSD_PER_USD


@dataclass(frozen=True, slots=True)
class _Period:
    name: str  # "day" | "month" | "total"
    key: str
    ends_at: float | None
    ttl_s: float | None


def _periods(now: float) -> tuple[_Period, _Period, _Period]:
    t = time.gmtime(now)
    day_start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
    next_month = (t.tm_year + t.tm_mon // 12, t.tm_mon % 12 + 1)
    month_end = calendar.timegm((*next_month, 1, 0, 0, 0))
    return (
        _Period("day", "d:" + time.strftime("%Y-%m-%d", t), day_start + _DAY_S, 2 * _DAY_S),
        _Period("month", "m:" + time.strftime("%Y-%m", t), month_end, 33 * _DAY_S),
        _Period("total", "t", None, None),
    )


# period -> (TenantLimits field for USD, for tokens, the limit's public name suffix)
_BUDGET_FIELDS = {
    "day": ("nusd_per_day", "tokens_per_day", "per_day"),
    "month": ("nusd_per_month", "tokens_per_month", "per_month"),
    "total": ("nusd_total", "tokens_total", "total"),
}


class Admission:
    """Reserve-then-settle admission over a LimitStore, with an injected clock (unix seconds)."""

    def __init__(
        self,
        limits: Mapping[str, TenantLimits],
        store: LimitStore | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store: LimitStore = store if store is not None else MemoryLimitStore()
        self.clock = clock
        self._ids = itertools.count()
        self._open: set[int] = set()
        self.update_limits(limits)

    def update_limits(self, limits: Mapping[str, TenantLimits]) -> None:
        """New limits (config reload); counters and reservations carry over."""
        self.limits = limits
        # Tenants with any limit; the rest are admitted without touching the store.
        self._limited = {t: lim for t, lim in limits.items() if not lim.unlimited}

    @property
    def outstanding(self) -> int:
        """Reservations not yet settled."""
        return len(self._open)

    async def reserve(
        self,
        tenant: str,
        est_tokens: int,
        est_cost_usd: Decimal | float,
        *,
        budget_tokens: int | None = None,
    ) -> Reservation:
        """Hold `est_tokens` and `est_cost_usd` against `tenant`; raise AdmissionRejected.

        Token budgets hold `budget_tokens` when given (an upper bound that may exceed what
        the tokens-per-minute limit takes, `est_tokens`).
        """
        cost = usd_to_nusd(to_decimal(est_cost_usd))
        held = est_tokens if budget_tokens is None else budget_tokens
        rid = next(self._ids)
        lim = self._limited.get(tenant)
        if lim is None:
            self._open.add(rid)
            return Reservation(rid, tenant, held, cost)
        now = self.clock()
        tpm_limit = lim.tokens_per_minute
        if tpm_limit is not None and est_tokens > tpm_limit:
            raise AdmissionRejected(
                "tokens_per_minute",
                f"request needs ~{est_tokens} tokens, more than the tenant's limit of "
                f"{tpm_limit} tokens per minute",
                None,
            )
        counters = _budget_checks(tenant, lim, held, cost, now)
        rates: list[RateCheck] = []
        if lim.requests_per_minute is not None:
            rates.append(RateCheck(f"{tenant}:rpm", 1, MINUTE_S / lim.requests_per_minute))
        tpm = None
        if tpm_limit is not None:
            tpm = RateCheck(f"{tenant}:tpm", est_tokens, MINUTE_S / tpm_limit)
            rates.append(tpm)
        refusal = await self.store.reserve(counters, rates, now)
        if refusal is not None:
            raise _rejection(tenant, lim, refusal, counters, now)
        self._open.add(rid)
        return Reservation(rid, tenant, held, cost, tuple(counters), tpm)

    async def settle(
        self, reservation: Reservation, real_tokens: int, real_cost_usd: Decimal | float
    ) -> None:
        """Replace the reservation's estimate by the real usage (once; repeats are ignored)."""
        if reservation.id not in self._open:
            return
        self._open.discard(reservation.id)
        d_tokens = real_tokens - reservation.tokens
        d_cost = usd_to_nusd(to_decimal(real_cost_usd)) - reservation.cost_nusd
        deltas = [
            CounterCheck(c.key, d_cost if ":usd:" in c.key else d_tokens, None, c.ttl_s)
            for c in reservation.counters
        ]
        deltas = [c for c in deltas if c.amount]
        rates = []
        tpm = reservation.tpm
        if tpm is not None and real_tokens != tpm.cost:
            rates.append(RateCheck(tpm.key, real_tokens - tpm.cost, tpm.interval_s))
        if deltas or rates:
            await self.store.adjust(deltas, rates, self.clock())

    async def release(self, reservation: Reservation) -> None:
        """Settle a request that consumed nothing (failed before any token was produced)."""
        await self.settle(reservation, 0, 0)

    async def seed(self, spend: Mapping[str, TenantSpend]) -> None:
        """Start counters from what the ledger says each tenant spent this day/month/total."""
        now = self.clock()
        day, month, total = _periods(now)
        checks: list[CounterCheck] = []
        for tenant, s in spend.items():
            for period, nusd, tokens in (
                (day, s.day_nusd, s.day_tokens),
                (month, s.month_nusd, s.month_tokens),
                (total, s.total_nusd, s.total_tokens),
            ):
                checks.append(CounterCheck(f"{tenant}:usd:{period.key}", nusd, None, period.ttl_s))
                checks.append(
                    CounterCheck(f"{tenant}:tok:{period.key}", tokens, None, period.ttl_s)
                )
        await self.store.seed(checks, now)


def _budget_checks(
    tenant: str, lim: TenantLimits, tokens: int, cost: int, now: float
) -> list[CounterCheck]:
    out: list[CounterCheck] = []
    for period in _periods(now):
        usd_field, tok_field, _ = _BUDGET_FIELDS[period.name]
        usd_limit = getattr(lim, usd_field)
        tok_limit = getattr(lim, tok_field)
        if usd_limit is not None:
            out.append(CounterCheck(f"{tenant}:usd:{period.key}", cost, usd_limit, period.ttl_s))
        if tok_limit is not None:
            out.append(CounterCheck(f"{tenant}:tok:{period.key}", tokens, tok_limit, period.ttl_s))
    return out


def _rejection(
    tenant: str,
    lim: TenantLimits,
    refusal: Refusal,
    counters: Sequence[CounterCheck],
    now: float,
) -> AdmissionRejected:
    key = refusal.key
    if key.endswith(":rpm"):
        return AdmissionRejected(
            "requests_per_minute",
            f"tenant {tenant!r} is over its limit of {lim.requests_per_minute} requests per minute",
            refusal.retry_after_s,
        )
    if key.endswith(":tpm"):
        return AdmissionRejected(
            "tokens_per_minute",
            f"tenant {tenant!r} is over its limit of {lim.tokens_per_minute} tokens per minute",
            refusal.retry_after_s,
        )
    is_usd = ":usd:" in key
    period = next(p for p in _periods(now) if key.endswith(":" + p.key))
    usd_field, tok_field, suffix = _BUDGET_FIELDS[period.name]
    limit_name = ("usd_" if is_usd else "tokens_") + suffix
    raw: int = getattr(lim, usd_field if is_usd else tok_field)
    amount = f"{Decimal(raw) / NUSD_PER_USD} USD" if is_usd else f"{raw} tokens"
    check = next(c for c in counters if c.key == key)
    retry: float | None = None
    when = ""
    if period.ends_at is not None:
        when = " until " + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(period.ends_at))
        wait = period.ends_at - now
        # Waiting only helps if the request fits an empty budget and the reset is near.
        if check.amount <= raw and wait < RETRY_AFTER_MAX_S:
            retry = wait
    return AdmissionRejected(
        limit_name,
        f"tenant {tenant!r} has used its {limit_name} budget of {amount}{when}",
        retry,
    )
