"""Money: prices as exact decimals, the ledger's integer nano-dollars, and the cost of a `Usage`.

Prices are USD per million tokens held as `Decimal` (sums of many small costs must not
drift like floats); the ledger keeps integer nano-dollars (`NUSD_PER_USD` to the dollar).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from gateway.metering.usage import Usage

_MILLION = Decimal(1_000_000)
NUSD_PER_USD = 1_000_000_000


def to_decimal(value: Decimal | float | int | str) -> Decimal:
    """Exact decimal of a price: floats go through their shortest repr (0.05 -> 0.05)."""
    if isinstance(value, Decimal):
        return value
    return Decimal(str(value))


@dataclass(frozen=True, slots=True)
class UnitPrices:
    """USD per million tokens in force for one attempt, and the price book version.

    `cached_input_per_m` None means cached input is billed at the input price. For a
    local GPU the caller passes chargeback prices from the batch-aware cost model at
    the batch the request shared.
    """

    input_per_m: Decimal
    output_per_m: Decimal
    cached_input_per_m: Decimal | None = None
    version: str = ""
    # Prompt tokens written to a provider's prompt cache (None: the input price).
    cache_write_input_per_m: Decimal | None = None
    # The same prices in the ledger's integer nano-dollars per million, converted once.
    nusd: tuple[int, int, int | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cached = self.cached_input_per_m
        nusd = (
            usd_to_nusd(self.input_per_m),
            usd_to_nusd(self.output_per_m),
            None if cached is None else usd_to_nusd(cached),
        )
        object.__setattr__(self, "nusd", nusd)

    @classmethod
    def of(
        cls,
        input_per_m: Decimal | float | str,
        output_per_m: Decimal | float | str,
        cached_input_per_m: Decimal | float | str | None = None,
        version: str = "",
        *,
        cache_write_input_per_m: Decimal | float | str | None = None,
    ) -> UnitPrices:
        """Build from plain numbers (floats are taken at their printed value)."""
        return cls(
            to_decimal(input_per_m),
            to_decimal(output_per_m),
            None if cached_input_per_m is None else to_decimal(cached_input_per_m),
            version,
            None if cache_write_input_per_m is None else to_decimal(cache_write_input_per_m),
        )


def cost_usd(usage: Usage, prices: UnitPrices) -> Decimal:
    """Exact cost in USD (Decimal: sums of many small costs must not drift like floats)."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    written = min(usage.cache_write_tokens, usage.prompt_tokens - cached)
    uncached = usage.prompt_tokens - cached - written
    cached_price = (
        prices.input_per_m if prices.cached_input_per_m is None else prices.cached_input_per_m
    )
    write_price = (
        prices.input_per_m
        if prices.cache_write_input_per_m is None
        else prices.cache_write_input_per_m
    )
    total = (
        uncached * prices.input_per_m
        + cached * cached_price
        + written * write_price
        + usage.completion_tokens * prices.output_per_m
    )
    return total / _MILLION


def usd_to_nusd(usd: Decimal) -> int:
    """USD -> integer nano-dollars (the ledger's unit), rounded half-even."""
    # round() of a Decimal is the nearest integer, ties to even, whatever the context's
    # rounding: quantize(Decimal(1), ROUND_HALF_EVEN) then int(), at a third of the cost.
    return round(usd * NUSD_PER_USD)


def nusd_to_usd(nusd: int) -> Decimal:
    """Integer nano-dollars -> USD."""
    return Decimal(nusd) / NUSD_PER_USD
