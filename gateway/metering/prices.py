"""Prices in force: what a token costs on a backend now, for reservations, routing's records and rows.

Providers are priced from the live price book (the tier a prompt reaches); local GPUs at their
attributed cost from the cost model (docs/economics.md). Both are cached per price-book
version, so a request's lookup is a dict hit.
"""

from __future__ import annotations

from decimal import Decimal

from gateway.config import ModelSpec
from gateway.metering.money import UnitPrices
from gateway.state.live import LiveState

_MILLION = 1_000_000


class PricesInForce:
    """Unit prices per backend and model at the live price book and cost model."""

    __slots__ = ("_live", "_price_cache", "_worst_cache")

    def __init__(self, live: LiveState) -> None:
        self._live = live
        self._price_cache: dict[tuple[str, str, int, int, int], UnitPrices] = {}
        # (model, book version) -> each backend's most without a tier; whether any has tiers
        self._worst_cache: dict[tuple[str, int], tuple[tuple[UnitPrices, ...], bool]] = {}

    def unit_prices(
        self, backend: str, model: str, batch: int, prompt_tokens: int = 0, context: int = 0
    ) -> UnitPrices:
        """Prices in force now: the price book for providers (the tier `prompt_tokens` reaches),
        the cost model for GPUs.

        A local GPU's prices are its attributed cost (docs/economics.md): prefill at the
        speed of a prompt of `context` tokens, output at T(batch, context), prefix-cache hits
        free. `context` is rounded up to a power of two (0: the profile's reference context).
        """
        book = self._live.prices.book
        live = self._live.backends[backend]
        if live.gpu is not None:
            bucket = 0 if context <= 0 else 1 << (context - 1).bit_length()
            key = (backend, model, batch, book.version, bucket)
        else:
            tier = 0
            if prompt_tokens:
                price = book.get(backend, model)
                if price is not None and price.tiers:
                    tier = max(
                        (
                            t.min_prompt_tokens
                            for t in price.tiers
                            if prompt_tokens >= t.min_prompt_tokens
                        ),
                        default=0,
                    )
            key = (backend, model, 0, book.version, tier)
        cached = self._price_cache.get(key)
        if cached is None:
            if len(self._price_cache) > 4096:
                self._price_cache.clear()  # versions move on; old entries are dead weight
            cached = self._price_cache[key] = self._unit_prices(backend, model, batch, key[4])
        return cached

    def _unit_prices(self, backend: str, model: str, batch: int, at: int = 0) -> UnitPrices:
        """`at`: the price tier (providers) or the context bucket (GPUs)."""
        live = self._live.backends[backend]
        book = self._live.prices.book
        version = str(book.version)
        if live.gpu is not None:
            gpu = live.gpu
            per_s = gpu.price_per_hour / 3600.0
            context = at
            if context > 0:
                prefill_s = gpu.prefill_time_s(context) / context
                where = f"b{batch}c{context}"
            else:
                prefill_s = 1.0 / gpu.prefill_tokens_per_s
                where = f"b{batch}"
            return UnitPrices.of(
                round(prefill_s * per_s * _MILLION, 9),
                round(gpu.cost_per_output_token(batch, context or None) * _MILLION, 9),
                0,  # a prefix-cache hit takes no prefill time
                version=f"{version}/gpu@{where}",
            )
        price = book.get(backend, model)
        if price is None:
            return UnitPrices.of(0, 0, None, version)
        price = price.at_prompt(at)
        cached = price.cached_input_per_token
        written = price.cache_write_input_per_token
        return UnitPrices.of(
            round(price.input_per_token * _MILLION, 9),
            round(price.output_per_token * _MILLION, 9),
            None if cached is None else round(cached * _MILLION, 9),
            version,
            cache_write_input_per_m=None if written is None else round(written * _MILLION, 9),
        )

    def most_usd(self, model: ModelSpec, prompt_tokens: int, output_tokens: int) -> Decimal:
        """The most this request can cost on any of the model's backends (reservations): on
        each, its price at the tier a prompt of `prompt_tokens` reaches there (a GPU: its upper
        bound), for these tokens; the dearest of them, whichever backend then serves."""
        book = self._live.prices.book
        key = (model.name, book.version)
        cached = self._worst_cache.get(key)
        if cached is None:
            if len(self._worst_cache) > 1024:
                self._worst_cache.clear()
            tiered = any(
                (price := book.get(b, model.name)) is not None and bool(price.tiers)
                for b in model.backends
            )
            cached = self._worst_cache[key] = (self._all_most(model, 0), tiered)
        each, tiered = cached
        if tiered and prompt_tokens:
            each = self._all_most(model, prompt_tokens)  # the tier depends on this prompt
        return (
            max(prompt_tokens * p.input_per_m + output_tokens * p.output_per_m for p in each)
            / _MILLION
        )

    def _all_most(self, model: ModelSpec, prompt_tokens: int) -> tuple[UnitPrices, ...]:
        return tuple(self._most(b, model.name, prompt_tokens) for b in model.backends)

    def _most(self, backend: str, model: str, prompt_tokens: int) -> UnitPrices:
        """The most a token can be attributed on `backend`: list price at the tier a prompt
        of `prompt_tokens` reaches, or a GPU's upper bound."""
        gpu = self._live.backends[backend].gpu
        if gpu is None:
            return self.unit_prices(backend, model, 0, prompt_tokens)
        prompt, output = gpu.most_per_token()
        return UnitPrices.of(round(prompt * _MILLION, 9), round(output * _MILLION, 9), 0)
