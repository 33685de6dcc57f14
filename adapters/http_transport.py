"""`PooledTransport`: plain http:// upstreams over neogate's own keep-alive client (`adapters.fasthttp`).

The hot path of local workers and simulators: a request is serialised to one byte
string and written at once; the pool's own timers bound the exchange (no timeout
context per read). About 30% less gateway CPU per request than aiohttp's client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from yarl import URL

from adapters.base import AttemptTimeouts
from adapters.errors import map_http_error
from adapters.fasthttp import BadRequestHeader, ConnectionPool, HttpClientError, Response
from gateway.errors import GatewayError, UpstreamProtocolError


def pooled_origin(url: URL) -> bool:
    """Whether the pooled client can reach `url` (plain http, no credentials, query or fragment)."""
    return bool(
        url.scheme == "http"
        and url.raw_host
        and not url.raw_user
        and not url.raw_password
        and not url.raw_query_string
        and not url.raw_fragment
    )


class PooledTransport:
    """One http origin behind a keep-alive `ConnectionPool` of at most `max_connections`."""

    errors: Final = (HttpClientError,)

    def __init__(
        self,
        name: str,
        base_url: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        max_connections: int = 256,
        keepalive_s: float = 15.0,
    ) -> None:
        url = URL(base_url)
        if not pooled_origin(url):
            raise ValueError(f"backend {name}: the pooled client takes plain http:// base URLs")
        assert url.raw_host is not None
        self.name = name
        self.pool = ConnectionPool(
            url.raw_host, url.port or 80, limit=max_connections, keepalive_s=keepalive_s
        )
        self._target = "POST " + url.raw_path.rstrip("/")
        fixed = [("Host", url.raw_authority), *headers]
        self._fixed = "".join([f"{k}: {v}\r\n" for k, v in fixed])
        self._lines = len(fixed) + 3  # request line, Content-Length, the blank line

    async def send(
        self,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        timeouts: AttemptTimeouts,
    ) -> Response:
        resp = await self.pool.request(
            self.serialize(path, headers, body),
            connect_s=timeouts.connect_s,
            first_byte_s=timeouts.first_byte_s,
            idle_s=timeouts.idle_s,
            total_s=timeouts.total_s,
        )
        coding = resp.headers.get("content-encoding")
        if coding is not None and coding.strip(" \t").lower() != "identity":
            # Asked for identity, and this client decodes nothing: compressed bytes could be
            # neither metered nor have the key masked, nor reach the client without their header.
            resp.close()
            raise UpstreamProtocolError(
                f"backend {self.name} answered with content-encoding {coding!r}, not identity"
            )
        return resp

    def serialize(self, path: str, headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
        """The request's bytes: request line, Host, the fixed headers, `headers`, Content-Length, body."""
        extra = [f"{k}: {v}\r\n" for k, v in headers]
        head = (
            f"{self._target}{path} HTTP/1.1\r\n{self._fixed}{''.join(extra)}"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        # Every line ends in the one CRLF we wrote: a CR or LF inside a name, value or
        # path would let a caller frame a request of its own.
        n = self._lines + len(extra)
        if head.count("\n") != n or head.count("\r") != n:
            raise BadRequestHeader("a header or path contains a line break")
        return head.encode() + body

    def map_error(self, exc: BaseException, phase: str) -> GatewayError:
        return map_http_error(exc, self.name, phase)

    def close(self) -> None:
        """Close the pool's idle connections; busy ones close when their answer ends."""
        self.pool.close()
