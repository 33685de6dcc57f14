"""The OpenAI-compatible adapter on the hot-path HTTP/1.1 client, for plain-http upstreams.

Same constructor and `Backend` Protocol as `OpenAICompatBackend`. http:// base URLs go
through an own keep-alive pool (`adapters.fasthttp`); https:// ones (and URLs with
credentials or a query) go through the aiohttp adapter over the shared session, as do
the `/metrics` scrapes. The base URL and API key come only from the policy file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Final

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from adapters.base import AttemptTimeouts, UpstreamResponse
from adapters.dialects import Dialect, dialect_for
from adapters.errors import map_http_error, status_error
from adapters.fasthttp import BadRequestHeader, ConnectionPool, HttpClientError, Response
from adapters.keymask import KeyMask
from adapters.openai_compat import OpenAICompatBackend
from gateway.errors import UpstreamProtocolError

_MAX_EVENT_BYTES: Final = 8 * 1024 * 1024
# Headers the adapter writes itself; a caller's copy (any spelling) is dropped.
_OWN_HEADERS: Final = frozenset(
    {
        "host",
        "content-type",
        "content-length",
        "authorization",
        "transfer-encoding",
        "connection",
        "accept-encoding",
    }
)


class FastResponse:
    """An upstream answer whose head has arrived, read from the hot-path client."""

    __slots__ = ("_backend", "_mask", "_resp")

    def __init__(self, backend: str, resp: Response, mask: KeyMask) -> None:
        self._backend = backend
        self._resp = resp
        self._mask = mask  # an upstream that echoes its key must not hand it on

    @property
    def status(self) -> int:
        return self._resp.status

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._resp.headers

    async def read(self) -> bytes:
        try:
            return self._mask.mask(await self._resp.read())
        except HttpClientError as exc:
            raise map_http_error(exc, self._backend, "reading body") from exc
        except BaseException:
            self._resp.close()  # cancelled: closing the socket cancels the upstream request
            raise

    async def events(self) -> AsyncIterator[bytes]:
        """Split the SSE byte stream into event blocks; tolerant of CRLF framing across chunks."""
        resp = self._resp
        buf = b""
        masker = self._mask.stream() if self._mask.active else None
        try:
            while True:
                chunk = await resp.next_chunk()
                if not chunk:
                    break
                buf = buf + chunk if buf else chunk
                if b"\r" in buf:
                    # A CRLF split over two chunks leaves a trailing CR in `buf`; it pairs
                    # with the next chunk's LF on the next round.
                    buf = buf.replace(b"\r\n", b"\n")
                if b"\n\n" not in buf:
                    if len(buf) > _MAX_EVENT_BYTES:
                        raise UpstreamProtocolError(
                            f"backend {self._backend} sent an oversized stream event"
                        )
                    continue
                *complete, buf = buf.split(b"\n\n")
                for block in complete:
                    if not block:
                        continue
                    if masker is None:
                        yield block
                    else:
                        for out in masker.feed(block):
                            yield out
        except HttpClientError as exc:
            resp.close()
            raise map_http_error(exc, self._backend, "streaming") from exc
        except BaseException:
            resp.close()
            raise
        if buf.endswith(b"\r"):
            buf = buf[:-1]
        last = [buf] if buf.strip() else []
        if masker is not None:
            last = [out for block in last for out in masker.feed(block)] + masker.flush()
        for block in last:
            yield block

    def close(self) -> None:
        self._resp.close()


class FastBackend:
    """One OpenAI-compatible upstream reached over an own keep-alive pool (http) or aiohttp."""

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        api_key: str | None,
        session: aiohttp.ClientSession,
        is_local: bool,
        metrics_url: str | None = None,
        max_connections: int = 256,
        keepalive_s: float = 15.0,
        dialect: Dialect | None = None,
    ) -> None:
        self.name = name
        self.is_local = is_local
        self.dialect = dialect or dialect_for("vllm" if is_local else "openai_compatible")
        self._fallback = OpenAICompatBackend(
            name=name,
            base_url=base_url,
            api_key=api_key,
            session=session,
            is_local=is_local,
            metrics_url=metrics_url,
            dialect=self.dialect,
        )
        self.mask = self._fallback.mask  # one masker for both roads to this backend
        self._pool: ConnectionPool | None = None
        self._target = ""
        self._fixed = ""
        url = URL(base_url)
        if (
            url.scheme == "http"
            and url.raw_host
            and not url.raw_user
            and not url.raw_password
            and not url.raw_query_string
            and not url.raw_fragment
        ):
            port = url.port or 80
            self._pool = ConnectionPool(
                url.raw_host, port, limit=max_connections, keepalive_s=keepalive_s
            )
            self._target = "POST " + url.raw_path.rstrip("/")
            fixed = (
                f"Host: {url.raw_authority}\r\nContent-Type: application/json\r\n"
                "Accept-Encoding: identity\r\n"
            )
            if api_key:
                fixed += f"Authorization: Bearer {api_key}\r\n"
            self._fixed = fixed

    @property
    def pool(self) -> ConnectionPool | None:
        """The keep-alive pool (None when requests go through aiohttp)."""
        return self._pool

    async def open(
        self,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        timeouts: AttemptTimeouts,
    ) -> UpstreamResponse:
        pool = self._pool
        if pool is None:
            return await self._fallback.open(path, body, headers, timeouts)
        try:
            data = self._serialize(path, body, headers)
            resp = await pool.request(
                data,
                connect_s=timeouts.connect_s,
                first_byte_s=timeouts.first_byte_s,
                idle_s=timeouts.idle_s,
                total_s=timeouts.total_s,
            )
        except HttpClientError as exc:
            raise map_http_error(exc, self.name, "waiting for first byte") from exc
        coding = resp.headers.get("content-encoding")
        if coding is not None and coding.strip(" \t").lower() != "identity":
            # Asked for identity: compressed bytes could be neither metered nor have the
            # key masked, and must not reach the client without their header.
            resp.close()
            raise UpstreamProtocolError(
                f"backend {self.name} answered with content-encoding {coding!r}, not identity"
            )
        if resp.status >= 400:
            # The error body is read within one idle timeout, then the error is raised.
            resp.shorten(timeouts.idle_s)
            try:
                err_body = await resp.read()
            except HttpClientError:
                err_body = b""
            finally:
                resp.close()
            raise status_error(
                self.name, resp.status, err_body, resp.headers, self.mask, self.dialect
            )
        return FastResponse(self.name, resp, self.mask)

    def _serialize(self, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        extra = [f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() not in _OWN_HEADERS]
        head = (
            f"{self._target}{path} HTTP/1.1\r\n{self._fixed}"
            f"Content-Length: {len(body)}\r\n{''.join(extra)}\r\n"
        )
        # Every line ends in the one CRLF we wrote: a CR or LF inside a name, value or
        # path would let a caller frame a request of its own.
        lines = self._fixed.count("\n") + len(extra) + 3
        if head.count("\n") != lines or head.count("\r") != lines:
            raise BadRequestHeader("a header or path contains a line break")
        return head.encode() + body

    async def fetch_metrics(self) -> str | None:
        return await self._fallback.fetch_metrics()

    def close(self) -> None:
        """Close the pool's idle connections; busy ones close when their answer ends."""
        if self._pool is not None:
            self._pool.close()
