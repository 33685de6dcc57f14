"""Versioned per-token prices and the parsers of the live price feeds.

A `PriceBook` is immutable: every change returns a new book with the version bumped,
so each routing decision can record the exact prices it used. Feed parsers raise
`FeedError` on malformed input; the caller keeps its last good book.

neogate feed format (prices in USD per million tokens; `model` and the cached price
are optional):

    {"prices": [{"backend": "groq", "model": "llama-3.1-8b-instant",
                 "input_per_million": 0.05, "output_per_million": 0.08,
                 "cached_input_per_million": 0.025}]}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# A key is (backend, backend model) for a model-specific price, or the backend alone.
PriceKey = tuple[str, str] | str

# No real model costs more than this per token ($10,000 per million); a larger figure
# in a feed is a unit mistake, not a price.
MAX_PRICE_PER_TOKEN = 0.01


class FeedError(ValueError):
    """A price feed that cannot be trusted; nothing from it should be applied."""


@dataclass(frozen=True, slots=True)
class Price:
    """USD per token for one backend (and model)."""

    input_per_token: float
    output_per_token: float
    cached_input_per_token: float | None = None
    source: str = "config"
    updated_at: float = 0.0

    @classmethod
    def per_million(
        cls,
        input_per_million: float,
        output_per_million: float,
        cached_input_per_million: float | None = None,
        source: str = "config",
        updated_at: float = 0.0,
    ) -> Price:
        """Build from the usual list-price unit, USD per million tokens."""
        cached = None if cached_input_per_million is None else cached_input_per_million / 1e6
        return cls(input_per_million / 1e6, output_per_million / 1e6, cached, source, updated_at)

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """USD for a request; `cached_tokens` are part of `prompt_tokens` (OpenAI usage shape)."""
        cached = min(max(cached_tokens, 0), prompt_tokens)
        cached_rate = (
            self.input_per_token
            if self.cached_input_per_token is None
            else self.cached_input_per_token
        )
        return (
            (prompt_tokens - cached) * self.input_per_token
            + cached * cached_rate
            + completion_tokens * self.output_per_token
        )

    def same_rates(self, other: Price) -> bool:
        """True if both charge the same (source and timestamp aside)."""
        return (
            self.input_per_token == other.input_per_token
            and self.output_per_token == other.output_per_token
            and self.cached_input_per_token == other.cached_input_per_token
        )


@dataclass(frozen=True, slots=True)
class PriceBook:
    """All prices in force, with a version that changes whenever any price does."""

    version: int = 0
    prices: Mapping[PriceKey, Price] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not isinstance(self.prices, MappingProxyType):
            object.__setattr__(self, "prices", MappingProxyType(dict(self.prices)))

    def get(self, backend: str, model: str | None = None) -> Price | None:
        """The model-specific price if set, else the backend-wide price, else None."""
        if model is not None:
            p = self.prices.get((backend, model))
            if p is not None:
                return p
        return self.prices.get(backend)

    def with_price(self, backend: str, price: Price, model: str | None = None) -> PriceBook:
        """A new book with one price set (admin endpoint); the version always moves."""
        key: PriceKey = backend if model is None else (backend, model)
        new = dict(self.prices)
        new[key] = price
        return PriceBook(self.version + 1, MappingProxyType(new))

    def with_prices(self, updates: Mapping[PriceKey, Price]) -> PriceBook:
        """A new book with a feed's prices merged in, one version step; `self` if nothing changed."""
        new = dict(self.prices)
        changed = False
        for key, price in updates.items():
            old = new.get(key)
            if old is None or not old.same_rates(price):
                changed = True
            new[key] = price
        if not changed:
            return self
        return PriceBook(self.version + 1, MappingProxyType(new))


def _usd(value: object, where: str) -> float:
    """A non-negative finite USD figure from a JSON string or number."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise FeedError(f"{where}: expected a number, got {type(value).__name__}")
    try:
        f = float(value)
    except ValueError:
        raise FeedError(f"{where}: not a number: {value!r}") from None
    if not math.isfinite(f) or f < 0:
        raise FeedError(f"{where}: not a non-negative finite number: {value!r}")
    return f


def _per_token(value: object, where: str, scale: float) -> float:
    f = _usd(value, where) / scale
    if f > MAX_PRICE_PER_TOKEN:
        raise FeedError(f"{where}: {f} USD per token is implausible")
    return f


def _list_of_objects(obj: object, key: str) -> list[Mapping[str, object]]:
    if not isinstance(obj, Mapping):
        raise FeedError("feed is not a JSON object")
    items = obj.get(key)
    if not isinstance(items, list):
        raise FeedError(f"feed has no {key!r} list")
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise FeedError(f"{key}[{i}] is not an object")
    return items


def _is_variable(value: object) -> bool:
    # OpenRouter marks router-priced entries (e.g. "openrouter/auto") with "-1".
    try:
        return isinstance(value, str | int | float) and float(value) < 0
    except ValueError:
        return False


def parse_openrouter_feed(obj: object, *, now: float = 0.0) -> dict[str, Price]:
    """Prices by model id from an OpenRouter `GET /api/v1/models` body (already JSON-decoded).

    Uses `data[].id`, `data[].pricing.prompt` / `.completion` (USD per token, strings) and the
    optional `.input_cache_read`. Entries priced "-1" (variable) are skipped.
    """
    items = _list_of_objects(obj, "data")
    out: dict[str, Price] = {}
    for i, item in enumerate(items):
        mid = item.get("id")
        if not isinstance(mid, str) or not mid:
            raise FeedError(f"data[{i}].id is missing")
        pricing = item.get("pricing")
        if not isinstance(pricing, Mapping):
            raise FeedError(f"data[{i}] ({mid}): pricing is missing")
        prompt, completion = pricing.get("prompt"), pricing.get("completion")
        if _is_variable(prompt) or _is_variable(completion):
            continue
        where = f"data[{i}] ({mid}).pricing"
        cache_raw = pricing.get("input_cache_read")
        cached = None
        if cache_raw is not None and cache_raw != "" and not _is_variable(cache_raw):
            cached = _per_token(cache_raw, f"{where}.input_cache_read", 1.0)
        out[mid] = Price(
            _per_token(prompt, f"{where}.prompt", 1.0),
            _per_token(completion, f"{where}.completion", 1.0),
            cached,
            source="openrouter",
            updated_at=now,
        )
    if not out:
        raise FeedError("feed lists no usable prices")
    return out


def parse_neogate_feed(obj: object, *, now: float = 0.0) -> dict[PriceKey, Price]:
    """Prices from the neogate feed format (see the module docstring), keyed for `PriceBook`."""
    items = _list_of_objects(obj, "prices")
    out: dict[PriceKey, Price] = {}
    for i, item in enumerate(items):
        backend = item.get("backend")
        if not isinstance(backend, str) or not backend:
            raise FeedError(f"prices[{i}].backend is missing")
        model = item.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise FeedError(f"prices[{i}].model must be a non-empty string")
        where = f"prices[{i}] ({backend})"
        if "input_per_million" not in item or "output_per_million" not in item:
            raise FeedError(f"{where}: input_per_million and output_per_million are required")
        cached_raw = item.get("cached_input_per_million")
        key: PriceKey = backend if model is None else (backend, model)
        if key in out:
            raise FeedError(f"{where}: listed twice")
        out[key] = Price(
            _per_token(item["input_per_million"], f"{where}.input_per_million", 1e6),
            _per_token(item["output_per_million"], f"{where}.output_per_million", 1e6),
            None
            if cached_raw is None
            else _per_token(cached_raw, f"{where}.cached_input_per_million", 1e6),
            source="neogate-feed",
            updated_at=now,
        )
    if not out:
        raise FeedError("feed lists no prices")
    return out
