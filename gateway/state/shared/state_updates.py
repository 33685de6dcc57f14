"""One update of shared backend state as it travels between replicas: its fields per kind,
the snapshot field it overwrites, and the `x-ratelimit-*` headers that replay a headroom.

Kinds: `eject` (a breaker ejection), `cool` (a 429 cool-down), `room` (rate-limit
headroom), `lat` (a latency estimate), `price` (one price of a new book), `keys` (a
tenant key was created or revoked). Every update carries `k` (its kind) and `t` (when),
and `o` (the replica it came from) once published.
"""

from __future__ import annotations

from typing import Any, Final

from policies.headroom import Headroom
from policies.latency import LatencyEstimate
from policies.pricebook import Price, PriceKey

KINDS: Final = ("eject", "cool", "room", "lat", "price", "keys")

Update = dict[str, Any]


def snapshot_field(u: Update) -> str:
    """The snapshot field of an update: one per kind and subject."""
    kind = u["k"]
    if kind == "lat":
        return f"lat:{u['b']}:{u['m']}"
    if kind == "price":
        key = u["key"]
        return "price:" + (key if isinstance(key, str) else f"{key[0]}:{key[1]}")
    if kind == "keys":
        return "keys"
    return f"{kind}:{u['b']}"


def room_update(name: str, room: Headroom) -> Update:
    return {
        "k": "room",
        "b": name,
        "t": room.observed_at,
        "observed_at": room.observed_at,
        "limit_requests": room.limit_requests,
        "limit_tokens": room.limit_tokens,
        "remaining_requests": room.remaining_requests,
        "remaining_tokens": room.remaining_tokens,
        "reset_requests_at": room.reset_requests_at,
        "reset_tokens_at": room.reset_tokens_at,
    }


def room_headers(u: Update, observed: float) -> dict[str, str]:
    """The `x-ratelimit-*` headers that reproduce another replica's headroom."""
    out: dict[str, str] = {}
    for name, header in (
        ("limit_requests", "x-ratelimit-limit-requests"),
        ("limit_tokens", "x-ratelimit-limit-tokens"),
        ("remaining_requests", "x-ratelimit-remaining-requests"),
        ("remaining_tokens", "x-ratelimit-remaining-tokens"),
    ):
        if u.get(name) is not None:
            out[header] = str(int(u[name]))
    for name, header in (
        ("reset_requests_at", "x-ratelimit-reset-requests"),
        ("reset_tokens_at", "x-ratelimit-reset-tokens"),
    ):
        if u.get(name) is not None:
            out[header] = f"{max(0.0, float(u[name]) - observed):.3f}s"
    return out


def latency_update(name: str, model: str, est: LatencyEstimate, now: float) -> Update:
    return {
        "k": "lat",
        "b": name,
        "m": model,
        "t": now,
        "ttft": est.ttft.mean if est.ttft.count else None,
        "itl": est.itl.mean if est.itl.count else None,
    }


def price_update(key: PriceKey, price: Price, now: float) -> Update:
    return {
        "k": "price",
        "key": key if isinstance(key, str) else list(key),
        "t": now,
        "in": price.input_per_token,
        "out": price.output_per_token,
        "cached": price.cached_input_per_token,
        "source": price.source,
        "updated_at": price.updated_at,
    }
