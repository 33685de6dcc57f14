"""The `Backend` Protocol every upstream adapter implements, and the values it exchanges."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from adapters.dialects import Dialect


@dataclass(frozen=True, slots=True)
class AttemptTimeouts:
    """Limits of one attempt, in seconds."""

    connect_s: float
    first_byte_s: float
    idle_s: float
    total_s: float


class UpstreamResponse(Protocol):
    """An upstream answer whose status and headers have arrived; the body is read on demand."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    async def read(self) -> bytes:
        """The whole body (non-streamed answers)."""
        ...

    def events(self) -> AsyncIterator[bytes]:
        """Raw SSE event blocks, without the blank-line terminator, as they arrive."""
        ...

    def close(self) -> None:
        """Release the connection; closing early cancels the upstream request."""
        ...


class Backend(Protocol):
    """One upstream that speaks an OpenAI-compatible API."""

    name: str
    is_local: bool
    dialect: Dialect  # how this kind of backend speaks (errors, streams, headers, metrics)

    def close(self) -> None:
        """Release pooled connections when the gateway stops or a reload retires this backend."""
        ...

    async def open(
        self,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        timeouts: AttemptTimeouts,
    ) -> UpstreamResponse:
        """Send a request and return once the response headers arrived (the first byte).

        Raises a `GatewayError` for any failure, including an error status. The adapter
        bounds the whole exchange, `read()` and `events()` included, by
        `timeouts.total_s`, and each wait for more of the body by `timeouts.idle_s`,
        raising `UpstreamTimeout`: callers set no timers of their own around reads.
        """
        ...

    async def fetch_metrics(self) -> str | None:
        """Prometheus text of a local worker's /metrics, or None where there is none."""
        ...
