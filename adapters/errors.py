"""The one place where aiohttp client exceptions and upstream error statuses become `GatewayError`s.

Messages name the backend but never its URL credentials or API key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp

from adapters import fasthttp
from adapters.dialects import Dialect, dialect_for
from adapters.keymask import KeyMask
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)


def map_client_error(exc: BaseException, backend: str, phase: str) -> GatewayError:
    """Translate a client-side exception raised while talking to `backend` during `phase`."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError | TimeoutError):
        return UpstreamTimeout(f"backend {backend} timed out ({phase})")
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ServerDisconnectedError):
        return UpstreamUnavailable(f"backend {backend} is unreachable ({phase})")
    if isinstance(
        exc,
        aiohttp.ClientPayloadError | aiohttp.ClientResponseError | aiohttp.InvalidURL,
    ):
        return UpstreamProtocolError(f"backend {backend} sent a broken response ({phase})")
    if isinstance(exc, aiohttp.ClientError | ConnectionError | OSError):
        return UpstreamUnavailable(f"backend {backend} connection failed ({phase})")
    return UpstreamProtocolError(f"backend {backend} failed ({phase}): {type(exc).__name__}")


def map_http_error(exc: BaseException, backend: str, phase: str) -> GatewayError:
    """Translate a failure of the hot-path client (`adapters.fasthttp`) as `map_client_error` would."""
    if isinstance(exc, fasthttp.ResponseTimeout):
        return UpstreamTimeout(f"backend {backend} timed out ({phase})")
    if isinstance(exc, fasthttp.ConnectError | fasthttp.ConnectionClosed):
        return UpstreamUnavailable(f"backend {backend} is unreachable ({phase})")
    if isinstance(exc, fasthttp.IncompleteBody | fasthttp.BadResponse):
        return UpstreamProtocolError(f"backend {backend} sent a broken response ({phase})")
    if isinstance(exc, fasthttp.BadRequestHeader):
        return InvalidRequest("a forwarded header cannot be sent over HTTP/1.1")
    return map_client_error(exc, backend, phase)


def status_error(
    backend: str,
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    mask: KeyMask | None = None,
    dialect: Dialect | None = None,
) -> UpstreamStatus:
    """An error status from the upstream, with its retry-after where given.

    `mask` masks the backend's API key: some providers echo the key they were sent in
    their error text, and an upstream 4xx body reaches the client as it is, so every
    copy of the key is masked first. The body is put in OpenAI's error shape by the
    backend's `dialect` (SGLang's and older vLLM's top-level `"object": "error"` body
    keeps its own message), and the dialect reads the 429's wait from its headers.
    """
    d = dialect if dialect is not None else dialect_for("openai_compatible")
    if mask is not None:
        body = mask.mask(body)  # before the cut: no half key at the edge
    body = d.error_body(body[:65536])
    return UpstreamStatus(
        f"backend {backend} answered {status}",
        upstream_status=status,
        upstream_body=body,
        retry_after_s=d.retry_after_s(headers),
    )
