"""The `Transport` Protocol: how a backend's request bytes reach its upstream and the answer's come back.

In the style of httpx's transports: a transport moves bytes and knows nothing of
OpenAI, SSE, keys or dialects (that is `adapters.backend`). Two implement it:

    PooledTransport    plain http:// over neogate's own keep-alive HTTP/1.1 client
                       (`adapters.fasthttp`), the hot path of local workers
    AiohttpTransport   https:// (and http URLs with credentials or a query) over the
                       app's one shared `aiohttp.ClientSession`

Each bounds an exchange by its `AttemptTimeouts` (connect, first byte, each idle gap,
total) and raises its own library's exceptions, which it names in `errors` and maps
into the `GatewayError` tree in one place, `map_error`; the backend calls that at
each of its boundaries, so no exception of a transport's library leaves the adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from adapters.base import AttemptTimeouts
from gateway.errors import GatewayError


class Received(Protocol):
    """An answer whose status and headers have arrived; its body is read on demand."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    async def read(self) -> bytes:
        """The whole body, as it came (bounded in size by the transport)."""
        ...

    async def next_chunk(self) -> bytes:
        """The next piece of the body as it arrived; b"" at its end."""
        ...

    def close(self) -> None:
        """Done with the answer: an unfinished body closes its connection (cancelling upstream)."""
        ...


class Transport(Protocol):
    """Sends one request to one upstream origin and hands back its answer."""

    @property
    def errors(self) -> tuple[type[Exception], ...]:
        """What `send` and its `Received` may raise besides a `GatewayError`, for `map_error`."""
        ...

    async def send(
        self,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        timeouts: AttemptTimeouts,
    ) -> Received:
        """POST `body` to the base URL + `path` with the transport's headers, then `headers`.

        A transport is built with the headers its backend sends on every request (content
        type, encoding, the key): it may keep them serialised. Returns at the answer's head.
        """
        ...

    def map_error(self, exc: BaseException, phase: str) -> GatewayError:
        """This transport's failure as a `GatewayError` naming the backend, never a secret."""
        ...

    def close(self) -> None:
        """Release idle connections (a reload retired the backend, or the gateway stops)."""
        ...
