"""The OpenAI-compatible adapter: vLLM, SGLang, Groq, Together, Fireworks, Nebius, OpenAI and the like.

The shared `aiohttp.ClientSession` is passed in, never owned. The base URL and
API key come only from the policy file; nothing the client sends can change them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Final

import aiohttp
from multidict import CIMultiDictProxy

from adapters.base import AttemptTimeouts
from adapters.dialects import Dialect, dialect_for
from adapters.errors import map_client_error, status_error
from adapters.keymask import KeyMask
from gateway.errors import GatewayError, UpstreamProtocolError

_MAX_EVENT_BYTES: Final = 8 * 1024 * 1024
_MAX_BODY_BYTES: Final = 64 * 1024 * 1024


class OpenAIResponse:
    """An upstream answer whose headers have arrived."""

    __slots__ = ("_backend", "_mask", "_resp")

    def __init__(self, backend: str, resp: aiohttp.ClientResponse, mask: KeyMask) -> None:
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
            body = await self._resp.read()
        except Exception as exc:
            self._resp.close()
            raise map_client_error(exc, self._backend, "reading body") from exc
        if len(body) > _MAX_BODY_BYTES:
            raise UpstreamProtocolError(f"backend {self._backend} sent an oversized body")
        return self._mask.mask(body)

    async def events(self) -> AsyncIterator[bytes]:
        """Split the SSE byte stream into event blocks; tolerant of CRLF framing."""
        buf = b""
        content = self._resp.content
        masker = self._mask.stream() if self._mask.active else None
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                if b"\r" in chunk:
                    chunk = chunk.replace(b"\r\n", b"\n")
                buf = buf + chunk if buf else chunk
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
        except GatewayError:
            self._resp.close()
            raise
        except Exception as exc:
            self._resp.close()  # a broken or timed-out stream does not go back to the pool
            raise map_client_error(exc, self._backend, "streaming") from exc
        last = [buf] if buf.strip() else []
        if masker is not None:
            last = [out for block in last for out in masker.feed(block)] + masker.flush()
        for block in last:
            yield block

    def close(self) -> None:
        self._resp.close()


class OpenAICompatBackend:
    """One OpenAI-compatible upstream reached over the shared client session."""

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        api_key: str | None,
        session: aiohttp.ClientSession,
        is_local: bool,
        metrics_url: str | None = None,
        dialect: Dialect | None = None,
    ) -> None:
        self.name = name
        self.is_local = is_local
        self.dialect = dialect or dialect_for("vllm" if is_local else "openai_compatible")
        self._base = base_url.rstrip("/")
        self._session = session
        self._auth = f"Bearer {api_key}" if api_key else None
        self.mask = KeyMask(api_key)  # masked in every byte relayed from this backend
        self._metrics_url = metrics_url

    def close(self) -> None:
        """Nothing of its own to release: the shared session belongs to the app."""

    async def open(
        self,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        timeouts: AttemptTimeouts,
    ) -> OpenAIResponse:
        out = dict(headers)
        out["Content-Type"] = "application/json"
        # Plain bytes: every answer is read for metering and key masking (aiohttp would
        # otherwise ask for gzip; the app's session decodes an upstream that sends it anyway).
        out["Accept-Encoding"] = "identity"
        if self._auth is not None:
            out["Authorization"] = self._auth
        # `total` covers the body too, streamed or not: the Backend contract.
        client_timeout = aiohttp.ClientTimeout(
            total=timeouts.total_s, sock_connect=timeouts.connect_s, sock_read=timeouts.idle_s
        )
        try:
            async with asyncio.timeout(timeouts.first_byte_s):
                resp = await self._session.post(
                    self._base + path, data=body, headers=out, timeout=client_timeout
                )
        except Exception as exc:
            raise map_client_error(exc, self.name, "waiting for first byte") from exc
        if resp.status >= 400:
            try:
                async with asyncio.timeout(timeouts.idle_s):
                    err_body = await resp.read()
            except Exception:
                err_body = b""
            finally:
                resp.release()
            raise status_error(
                self.name, resp.status, err_body, resp.headers, self.mask, self.dialect
            )
        return OpenAIResponse(self.name, resp, self.mask)

    async def fetch_metrics(self) -> str | None:
        if self._metrics_url is None:
            return None
        try:
            async with self._session.get(
                self._metrics_url, timeout=aiohttp.ClientTimeout(total=2.0)
            ) as resp:
                if resp.status != 200:
                    return None
                return await resp.text()
        except Exception as exc:
            raise map_client_error(exc, self.name, "scraping metrics") from exc
