"""Backend dialects: what each kind of backend really sends, normalised into neogate's shapes.

One `Dialect` per backend kind (vLLM, SGLang, OpenAI, Groq, Together, Fireworks, Nebius,
generic OpenAI-compatible), one module per concern:

    errors        error bodies and mid-stream error events -> OpenAI's `{"error": {...}}`
    ratelimits    rate-limit headers, each provider's windows and meanings -> `Headroom`;
                  a 429's wait (Together: `x-ratelimit-reset`, no retry-after)
    (metrics labels live with the worker parser: `adapters.worker_metrics`)

A backend adapter holds its dialect (`Backend.dialect`), so the request path asks the
dialect, never `if kind == ...`. Shapes that cannot be mistaken for another provider's
(the legacy error body, Together's `text` mirror of `delta.content`, Groq's `x_groq`
usage) are read for every kind: a generic OpenAI-compatible proxy in front of SGLang or
Together passes those shapes on unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from adapters.dialects.errors import error_fields, openai_error_body, stream_error_payload
from adapters.dialects.ratelimits import (
    HeadroomReader,
    fireworks_headroom,
    groq_headroom,
    no_headroom,
    openai_headroom,
    together_headroom,
    together_retry_after,
)
from policies.headroom import Headroom, parse_retry_after

__all__ = [
    "Dialect",
    "dialect_for",
    "error_fields",
    "openai_error_body",
    "stream_error_payload",
]


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one kind of backend speaks; every field is a plain value or a pure function."""

    kind: str
    is_local: bool = False
    read_headroom: HeadroomReader = openai_headroom
    read_retry_after: Callable[[Mapping[str, str]], float | None] = parse_retry_after
    # Lower-cased header names that carry rate-limit news (skip the parse without them).
    rate_headers: frozenset[str] = frozenset(
        {"x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens"}
    )

    def retry_after_s(self, headers: Mapping[str, str]) -> float | None:
        """Seconds a 429 asks us to wait."""
        return self.read_retry_after(headers)

    def headroom(self, headers: Mapping[str, str], now: float, previous: Headroom) -> Headroom:
        """The provider's rate-limit headers folded into what we knew (`previous`)."""
        wanted = self.rate_headers
        if not wanted or not any(k.lower() in wanted for k in headers):
            return previous  # most answers of most backends carry none: skip the parse
        return self.read_headroom(headers, now, previous)

    def error_body(self, body: bytes) -> bytes:
        """An upstream error body in OpenAI's shape where it is an error body at all."""
        return openai_error_body(body) or body


_GENERIC = Dialect("openai_compatible")
_DIALECTS: Mapping[str, Dialect] = MappingProxyType(
    {
        "openai_compatible": _GENERIC,
        "openai": Dialect("openai"),
        "nebius": Dialect("nebius"),
        "groq": Dialect(
            "groq",
            read_headroom=groq_headroom,
            rate_headers=frozenset(
                {"x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens"}
            ),
        ),
        "together": Dialect(
            "together",
            read_headroom=together_headroom,
            read_retry_after=together_retry_after,
            rate_headers=frozenset(
                {"x-ratelimit-remaining", "x-tokenlimit-remaining", "x-ratelimit-reset"}
            ),
        ),
        "fireworks": Dialect(
            "fireworks",
            read_headroom=fireworks_headroom,
            rate_headers=frozenset(
                {"x-ratelimit-limit-tokens-prompt", "x-ratelimit-limit-tokens-generated"}
            ),
        ),
        "vllm": Dialect("vllm", is_local=True, read_headroom=no_headroom, rate_headers=frozenset()),
        "sglang": Dialect(
            "sglang", is_local=True, read_headroom=no_headroom, rate_headers=frozenset()
        ),
    }
)


def dialect_for(kind: str) -> Dialect:
    """The dialect of a configured backend kind (unknown kinds speak the generic one)."""
    return _DIALECTS.get(kind, _GENERIC)
