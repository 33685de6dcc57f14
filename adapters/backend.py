"""The OpenAI-compatible backend: vLLM, SGLang, Groq, Together, Fireworks, Nebius, OpenAI and the like.

All the protocol logic lives here once, over a `Transport` that only moves bytes:
the request's headers (ours win over a caller's copy, in any spelling), an error
status put in OpenAI's shape by the backend's `Dialect`, the SSE stream split into
events (`adapters.sse`), and the backend's API key masked in every byte handed on
(`adapters.keymask`). The transport is chosen by the base URL: plain http:// goes
through neogate's own keep-alive pool, anything else through the shared aiohttp
session. The base URL and API key come only from the policy file; nothing a client
sends can change them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Final, Literal

import aiohttp
from yarl import URL

from adapters.aiohttp_transport import AiohttpTransport, fetch_text
from adapters.base import AttemptTimeouts
from adapters.dialects import Dialect, dialect_for
from adapters.errors import status_error
from adapters.http_transport import PooledTransport, pooled_origin
from adapters.keymask import KeyMask
from adapters.sse import EventSplitter, EventTooLarge
from adapters.transport import Received, Transport
from gateway.errors import GatewayError, UpstreamProtocolError

# Headers the backend writes itself; a caller's copy (any spelling) is dropped.
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


def caller_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """A caller's headers but those the backend writes itself (in any spelling)."""
    return [(k, v) for k, v in headers.items() if k.lower() not in _OWN_HEADERS]


Road = Literal["auto", "pooled", "aiohttp"]


def transport_for(
    name: str,
    base_url: str,
    session: aiohttp.ClientSession,
    headers: Sequence[tuple[str, str]],
    *,
    road: Road = "auto",
    max_connections: int = 256,
    keepalive_s: float = 15.0,
) -> Transport:
    """The own pool for a plain http:// origin, the shared aiohttp session for any other URL.

    `road` forces one (tests and benchmarks reach the https road over plain http this way).
    """
    if road == "pooled" or (road == "auto" and pooled_origin(URL(base_url))):
        return PooledTransport(
            name, base_url, headers, max_connections=max_connections, keepalive_s=keepalive_s
        )
    return AiohttpTransport(name, base_url, session, headers)


class BackendResponse:
    """An upstream answer whose head has arrived, read through the backend's transport."""

    __slots__ = ("_mask", "_name", "_received", "_transport")

    def __init__(self, name: str, transport: Transport, received: Received, mask: KeyMask) -> None:
        self._name = name
        self._transport = transport
        self._received = received
        self._mask = mask  # an upstream that echoes its key must not hand it on

    @property
    def status(self) -> int:
        return self._received.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._received.headers

    async def read(self) -> bytes:
        received = self._received
        try:
            body = await received.read()
        except GatewayError:
            received.close()
            raise
        except self._transport.errors as exc:
            received.close()  # a broken or timed-out body does not go back to the pool
            raise self._transport.map_error(exc, "reading body") from exc
        except BaseException:
            received.close()  # cancelled: closing the socket cancels the upstream request
            raise
        return self._mask.mask(body)

    async def events(self) -> AsyncIterator[bytes]:
        """The SSE stream's event blocks as they complete (see `adapters.sse`), key masked."""
        received = self._received
        splitter = EventSplitter()
        split, next_chunk = splitter.feed, received.next_chunk
        masker = self._mask.stream() if self._mask.active else None
        try:
            while True:
                chunk = await next_chunk()
                if not chunk:
                    break
                for block in split(chunk):
                    if masker is None:
                        yield block
                    else:
                        for out in masker.feed(block):
                            yield out
        except EventTooLarge as exc:
            received.close()
            raise UpstreamProtocolError(
                f"backend {self._name} sent an oversized stream event"
            ) from exc
        except GatewayError:
            received.close()
            raise
        except self._transport.errors as exc:
            received.close()
            raise self._transport.map_error(exc, "streaming") from exc
        except BaseException:
            received.close()
            raise
        last = splitter.finish()
        tail = [] if last is None else [last]
        if masker is not None:
            tail = [out for block in tail for out in masker.feed(block)] + masker.flush()
        for block in tail:
            yield block

    def close(self) -> None:
        self._received.close()


class OpenAICompatBackend:
    """One OpenAI-compatible upstream, over the transport its base URL calls for."""

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
        road: Road = "auto",
    ) -> None:
        self.name = name
        self.is_local = is_local
        self.dialect = dialect or dialect_for("vllm" if is_local else "openai_compatible")
        self.mask = KeyMask(api_key)  # masked in every byte relayed from this backend
        # Plain bytes (identity): every answer is read for metering and key masking.
        own = [("Content-Type", "application/json"), ("Accept-Encoding", "identity")]
        if api_key:
            own.append(("Authorization", f"Bearer {api_key}"))
        self.transport: Transport = transport_for(
            name,
            base_url,
            session,
            own,
            road=road,
            max_connections=max_connections,
            keepalive_s=keepalive_s,
        )
        self._session = session  # for /metrics scrapes only
        self._metrics_url = metrics_url

    def close(self) -> None:
        """Release pooled connections (the shared aiohttp session belongs to the app)."""
        self.transport.close()

    async def open(
        self,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        timeouts: AttemptTimeouts,
    ) -> BackendResponse:
        transport = self.transport
        try:
            received = await transport.send(path, caller_headers(headers), body, timeouts)
        except GatewayError:
            raise
        except transport.errors as exc:
            raise transport.map_error(exc, "waiting for first byte") from exc
        if received.status >= 400:
            raise await self._status_error(received, timeouts)
        return BackendResponse(self.name, transport, received, self.mask)

    async def _status_error(self, received: Received, timeouts: AttemptTimeouts) -> GatewayError:
        """The error status as a `GatewayError`, its body read within one idle timeout."""
        err_body = b""
        try:
            async with asyncio.timeout(timeouts.idle_s):
                err_body = await received.read()
        except (GatewayError, TimeoutError):
            pass  # the status alone still says what happened
        except self.transport.errors:
            pass
        finally:
            received.close()
        return status_error(
            self.name, received.status, err_body, received.headers, self.mask, self.dialect
        )

    async def fetch_metrics(self) -> str | None:
        if self._metrics_url is None:
            return None
        return await fetch_text(self._session, self._metrics_url, self.name)
