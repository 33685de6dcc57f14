"""What one ledger row is, how it is built from a `Usage`, and the contract of a ledger store.

Money is stored as integers of nano-dollars (1e-9 USD): exact to sum, and small
enough that a 10-token request at $0.05/M (0.5 micro-dollars) still has a cost.
Unit prices are nano-dollars per million tokens (0.05 $/M -> 50_000_000).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, NamedTuple, Protocol

import orjson

from gateway.metering.money import UnitPrices, cost_usd, nusd_to_usd, usd_to_nusd
from gateway.metering.usage import Usage

# Outcomes the gateway records; the column is free text so new ones need no migration.
KNOWN_OUTCOMES = (
    "ok",
    "client_disconnect",
    "upstream_cut",
    "upstream_error",
    "upstream_protocol_error",
    "timeout",
)


class LedgerUnavailable(Exception):
    """The database could not take a write (down, locked, unreachable, read-only)."""


_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()


def utc_day(ts: float) -> str:
    """The UTC calendar day of a unix timestamp, as YYYY-MM-DD."""
    # Days since the epoch, floored (as gmtime does): a third cheaper than strftime(gmtime()).
    return datetime.date.fromordinal(_EPOCH_ORDINAL + int(ts // 86_400)).isoformat()


class LedgerRow(NamedTuple):
    """One attempt that consumed tokens; (request_id, attempt) is its idempotent key.

    Immutable, as a frozen dataclass would be, and built once per request: a tuple of 31
    fields is made in ~0.6 us, a frozen dataclass's `__init__` sets them one by one through
    `object.__setattr__` (~3.8 us); the INSERT's values are the tuple with `day` added.
    """

    request_id: str
    attempt: int
    ts: float  # unix seconds when the attempt finished
    tenant: str
    model: str  # public model name the client asked for
    backend: str
    backend_model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    token_source: str  # "reported" | "counted" | "estimated"
    counted_prompt_tokens: int | None
    counted_completion_tokens: int | None
    divergent: bool
    price_in_nusd_per_m: int
    price_out_nusd_per_m: int
    price_cached_nusd_per_m: int | None
    price_version: str
    cost_nusd: int
    ttft_s: float | None
    total_s: float
    stream: bool
    outcome: str
    batch_size: int | None = None  # requests sharing the local worker's batch
    is_local: bool = False
    # The id the client sent (x-client-request-id / x-request-id), for its own reconciliation;
    # never the key: clients may repeat it.
    client_request_id: str | None = None
    # Routing's marginal cost of the attempt (what serving it here cost the operator at the
    # margin; 0 on an idle local GPU) and the counterfactual: the cheapest external candidate
    # that met the SLO at routing time, priced at the attempt's actual tokens. None: unknown
    # (rows written before these columns existed, or no external candidate).
    marginal_cost_nusd: int | None = None
    counterfactual_cost_nusd: int | None = None
    counterfactual_backend: str | None = None

    @property
    def saved_usd(self) -> Decimal | None:
        """Counterfactual - attributed (this row's cost); negative when serving here cost more."""
        if self.counterfactual_cost_nusd is None:
            return None
        return nusd_to_usd(self.counterfactual_cost_nusd - self.cost_nusd)

    @property
    def cost_usd(self) -> Decimal:
        return nusd_to_usd(self.cost_nusd)

    @property
    def day(self) -> str:
        return utc_day(self.ts)

    @classmethod
    def from_usage(
        cls,
        *,
        request_id: str,
        attempt: int,
        ts: float,
        tenant: str,
        model: str,
        backend: str,
        backend_model: str,
        usage: Usage,
        prices: UnitPrices,
        ttft_s: float | None,
        total_s: float,
        stream: bool,
        outcome: str,
        divergent: bool = False,
        batch_size: int | None = None,
        is_local: bool = False,
        client_request_id: str | None = None,
        marginal_cost_usd: float | None = None,
        counterfactual: tuple[str, UnitPrices] | None = None,
    ) -> LedgerRow:
        """Build a row from metered usage and the unit prices in force for the attempt."""
        price_in, price_out, price_cached = prices.nusd
        cost_nusd = usd_to_nusd(cost_usd(usage, prices))
        if counterfactual is None:
            counterfactual_nusd = None
        elif counterfactual[1] is prices:  # the same prices (one cache entry): the same cost
            counterfactual_nusd = cost_nusd
        else:
            counterfactual_nusd = usd_to_nusd(cost_usd(usage, counterfactual[1]))
        # Positional, in field order: a call with 31 keywords costs ~0.7 us more.
        return cls(
            request_id,
            attempt,
            ts,
            tenant,
            model,
            backend,
            backend_model,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            usage.reasoning_tokens,
            usage.source,
            usage.counted_prompt_tokens,
            usage.counted_completion_tokens,
            divergent,
            price_in,
            price_out,
            price_cached,
            prices.version,
            cost_nusd,
            ttft_s,
            total_s,
            stream,
            outcome,
            batch_size,
            is_local,
            client_request_id,
            None if marginal_cost_usd is None else usd_to_nusd(Decimal(repr(marginal_cost_usd))),
            counterfactual_nusd,
            None if counterfactual is None else counterfactual[0],
        )

    def as_tuple(self) -> tuple[Any, ...]:
        """Values in `COLUMNS` order (the derived `day` included) for an INSERT."""
        return (*self[:3], utc_day(self.ts), *self[3:])

    def to_json(self) -> bytes:
        """One JSON object (no newline), the spool's line format."""
        return orjson.dumps(dict(zip(self._fields, self, strict=True)))

    @classmethod
    def from_json(cls, data: bytes | str) -> LedgerRow:
        """Inverse of `to_json`; raises ValueError/TypeError on a malformed line."""
        obj = orjson.loads(data)
        if not isinstance(obj, Mapping):
            raise ValueError("a spool line must be a JSON object")
        return cls(**{name: obj[name] for name in _FIELD_NAMES if name in obj})


_FIELD_NAMES: tuple[str, ...] = LedgerRow._fields

# Column order of the ledger table; `day` is derived from ts (UTC) so reports group
# by an indexed plain column on both SQLite and PostgreSQL.
COLUMNS: tuple[str, ...] = (*_FIELD_NAMES[:3], "day", *_FIELD_NAMES[3:])
# Columns a row may leave empty (NULL), in every store; a ledger made before one of them
# existed gains it in place.
NULLABLE: frozenset[str] = frozenset(
    {
        "counted_prompt_tokens",
        "counted_completion_tokens",
        "price_cached_nusd_per_m",
        "ttft_s",
        "batch_size",
        "client_request_id",
        "marginal_cost_nusd",
        "counterfactual_cost_nusd",
        "counterfactual_backend",
    }
)


class LedgerStore(Protocol):
    """A database that holds ledger rows. Implementations: SQLite, PostgreSQL.

    `write` inserts a batch in ONE transaction with ON CONFLICT DO NOTHING on
    (request_id, attempt) and raises `LedgerUnavailable` when the database cannot
    take it; `fetch` runs one statement written with `?` placeholders: a read query, or
    a single-statement write that commits on its own (`gpu_uptime.py`'s upsert).
    """

    dialect: str

    async def open(self) -> None: ...

    async def write(self, rows: Sequence[LedgerRow]) -> None: ...

    def write_now(self, rows: Sequence[LedgerRow]) -> bool:
        """Commit at once without waiting on anything, or return False (then use `write`)."""
        ...

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    async def close(self) -> None: ...
