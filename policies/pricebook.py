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
class PriceTier:
    """Rates that replace the base ones for prompts of at least `min_prompt_tokens` (USD per token).

    None keeps the base rate (OpenRouter's `pricing.overrides` name only what changes).
    """

    min_prompt_tokens: int
    input_per_token: float | None = None
    output_per_token: float | None = None
    cached_input_per_token: float | None = None
    cache_write_input_per_token: float | None = None


@dataclass(frozen=True, slots=True)
class Price:
    """USD per token for one backend (and model).

    `cache_write_input_per_token` prices prompt tokens written to the provider's prompt
    cache (None: the input price); `tiers` replace rates above a prompt length.
    """

    input_per_token: float
    output_per_token: float
    cached_input_per_token: float | None = None
    source: str = "config"
    updated_at: float = 0.0
    cache_write_input_per_token: float | None = None
    tiers: tuple[PriceTier, ...] = ()

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

    def at_prompt(self, prompt_tokens: int) -> Price:
        """The flat rates in force for a prompt of `prompt_tokens` (the highest tier it reaches)."""
        tier: PriceTier | None = None
        for t in self.tiers:
            if prompt_tokens >= t.min_prompt_tokens and (
                tier is None or t.min_prompt_tokens > tier.min_prompt_tokens
            ):
                tier = t
        if tier is None:
            return self
        return Price(
            self.input_per_token if tier.input_per_token is None else tier.input_per_token,
            self.output_per_token if tier.output_per_token is None else tier.output_per_token,
            _pick(tier.cached_input_per_token, self.cached_input_per_token),
            self.source,
            self.updated_at,
            _pick(tier.cache_write_input_per_token, self.cache_write_input_per_token),
        )

    def cost(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        cache_write_tokens: int = 0,
    ) -> float:
        """USD for a request; `cached_tokens` and `cache_write_tokens` are part of
        `prompt_tokens` (OpenAI usage shape); tiers apply by the prompt's length."""
        p = self.at_prompt(prompt_tokens) if self.tiers else self
        cached = min(max(cached_tokens, 0), prompt_tokens)
        written = min(max(cache_write_tokens, 0), prompt_tokens - cached)
        cached_rate = (
            p.input_per_token if p.cached_input_per_token is None else p.cached_input_per_token
        )
        write_rate = (
            p.input_per_token
            if p.cache_write_input_per_token is None
            else p.cache_write_input_per_token
        )
        return (
            (prompt_tokens - cached - written) * p.input_per_token
            + cached * cached_rate
            + written * write_rate
            + completion_tokens * p.output_per_token
        )

    def same_rates(self, other: Price) -> bool:
        """True if both charge the same (source and timestamp aside)."""
        return (
            self.input_per_token == other.input_per_token
            and self.output_per_token == other.output_per_token
            and self.cached_input_per_token == other.cached_input_per_token
            and self.cache_write_input_per_token == other.cache_write_input_per_token
            and self.tiers == other.tiers
        )


def _pick(tier_value: float | None, base: float | None) -> float | None:
    return base if tier_value is None else tier_value


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


@dataclass(frozen=True, slots=True)
class SkippedRow:
    """A feed row that could not be priced, and why (the rest of the feed still applies)."""

    index: int
    id: str
    reason: str


@dataclass(frozen=True, slots=True)
class OpenRouterFeed:
    """The usable prices of an OpenRouter listing and the rows that were skipped."""

    prices: Mapping[str, Price]
    skipped: tuple[SkippedRow, ...] = ()


def parse_openrouter_rows(obj: object, *, now: float = 0.0) -> OpenRouterFeed:
    """Prices by model id from an OpenRouter `GET /api/v1/models` body (already JSON-decoded).

    Uses `data[].id`, `data[].pricing.prompt` / `.completion` (USD per token, strings), the
    optional `.input_cache_read` and `.input_cache_write`, and `.overrides` (rates above a
    `min_prompt_tokens`). Entries priced "-1" (variable) are left out. One malformed row is
    skipped and reported, never the whole listing: only a body that is not a listing at all,
    or one with no usable price, raises `FeedError`.
    """
    if not isinstance(obj, Mapping):
        raise FeedError("feed is not a JSON object")
    items = obj.get("data")
    if not isinstance(items, list):
        raise FeedError("feed has no 'data' list")
    out: dict[str, Price] = {}
    skipped: list[SkippedRow] = []
    for i, item in enumerate(items):
        mid = item.get("id") if isinstance(item, Mapping) else None
        try:
            price = _openrouter_row(item, i, now)
        except FeedError as exc:
            skipped.append(SkippedRow(i, mid if isinstance(mid, str) else "", str(exc)))
            continue
        if price is not None and isinstance(mid, str):
            out[mid] = price
    if not out:
        why = f": {skipped[0].reason}" if skipped else ""
        raise FeedError(f"feed lists no usable prices{why}")
    return OpenRouterFeed(MappingProxyType(out), tuple(skipped))


def parse_openrouter_feed(obj: object, *, now: float = 0.0) -> dict[str, Price]:
    """The usable prices of an OpenRouter listing (bad rows skipped; see `parse_openrouter_rows`)."""
    return dict(parse_openrouter_rows(obj, now=now).prices)


def _openrouter_row(item: object, i: int, now: float) -> Price | None:
    if not isinstance(item, Mapping):
        raise FeedError(f"data[{i}] is not an object")
    mid = item.get("id")
    if not isinstance(mid, str) or not mid:
        raise FeedError(f"data[{i}].id is missing")
    pricing = item.get("pricing")
    if not isinstance(pricing, Mapping):
        raise FeedError(f"data[{i}] ({mid}): pricing is missing")
    prompt, completion = pricing.get("prompt"), pricing.get("completion")
    if _is_variable(prompt) or _is_variable(completion):
        return None
    where = f"data[{i}] ({mid}).pricing"
    return Price(
        _per_token(prompt, f"{where}.prompt", 1.0),
        _per_token(completion, f"{where}.completion", 1.0),
        _optional(pricing, "input_cache_read", where),
        source="openrouter",
        updated_at=now,
        cache_write_input_per_token=_optional(pricing, "input_cache_write", where),
        tiers=_tiers(pricing.get("overrides"), where),
    )


def _optional(pricing: Mapping[str, object], key: str, where: str) -> float | None:
    raw = pricing.get(key)
    if raw is None or raw == "" or _is_variable(raw):
        return None
    return _per_token(raw, f"{where}.{key}", 1.0)


def _tiers(raw: object, where: str) -> tuple[PriceTier, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise FeedError(f"{where}.overrides is not a list")
    tiers = []
    for j, o in enumerate(raw):
        at = f"{where}.overrides[{j}]"
        if not isinstance(o, Mapping):
            raise FeedError(f"{at} is not an object")
        floor = o.get("min_prompt_tokens")
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
            raise FeedError(f"{at}.min_prompt_tokens must be a non-negative integer")
        tiers.append(
            PriceTier(
                floor,
                _optional(o, "prompt", at),
                _optional(o, "completion", at),
                _optional(o, "input_cache_read", at),
                _optional(o, "input_cache_write", at),
            )
        )
    return tuple(sorted(tiers, key=lambda t: t.min_prompt_tokens))


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
