"""Backend dialects: what each kind of backend really sends, normalised into neogate's shapes.

One `Dialect` per backend kind (vLLM, SGLang, OpenAI, Groq, Together, Fireworks, Nebius,
generic OpenAI-compatible), one module per concern:

    errors        error bodies and mid-stream error events -> OpenAI's `{"error": {...}}`
    ratelimits    rate-limit headers, each provider's windows and meanings -> `Headroom`
    (metrics labels live with the worker parser: `adapters.worker_metrics`)

A backend adapter holds its dialect (`Backend.dialect`), so the request path asks the
dialect, never `if kind == ...`. Shapes that cannot be mistaken for another provider's
(the legacy error body, Together's `text` mirror of `delta.content`, Groq's `x_groq`
usage) are read for every kind: a generic OpenAI-compatible proxy in front of SGLang or
Together passes those shapes on unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from adapters.dialects.errors import error_fields, openai_error_body, stream_error_payload
from policies.headroom import parse_retry_after

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

    def retry_after_s(self, headers: Mapping[str, str]) -> float | None:
        """Seconds a 429 asks us to wait (`retry-after-ms`, `retry-after`)."""
        return parse_retry_after(headers)

    def error_body(self, body: bytes) -> bytes:
        """An upstream error body in OpenAI's shape where it is an error body at all."""
        return openai_error_body(body) or body


_KINDS = (
    "vllm",
    "sglang",
    "openai_compatible",
    "openai",
    "groq",
    "together",
    "fireworks",
    "nebius",
)


def dialect_for(kind: str) -> Dialect:
    """The dialect of a configured backend kind (unknown kinds speak the generic one)."""
    if kind not in _KINDS:
        kind = "openai_compatible"
    return Dialect(kind=kind, is_local=kind in ("vllm", "sglang"))
