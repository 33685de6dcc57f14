"""`AiohttpTransport`: https:// upstreams (every external provider) over the app's shared aiohttp session.

The session is passed in, never owned. It also serves `fetch_text`, the local workers'
`/metrics` scrapes. aiohttp's exceptions become `GatewayError`s here and nowhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Final

import aiohttp
from multidict import CIMultiDictProxy

from adapters.base import AttemptTimeouts
from adapters.errors import map_client_error
from gateway.errors import GatewayError, UpstreamProtocolError

_MAX_BODY_BYTES: Final = 64 * 1024 * 1024


class AiohttpReceived:
    """An aiohttp answer whose head has arrived."""

    __slots__ = ("_content", "_name", "_resp")

    def __init__(self, name: str, resp: aiohttp.ClientResponse) -> None:
        self._name = name
        self._resp = resp
        self._content = resp.content

    @property
    def status(self) -> int:
        return self._resp.status

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._resp.headers

    async def read(self) -> bytes:
        body = await self._resp.read()
        if len(body) > _MAX_BODY_BYTES:
            raise UpstreamProtocolError(f"backend {self._name} sent an oversized body")
        return body

    async def next_chunk(self) -> bytes:
        return await self._content.readany()

    def close(self) -> None:
        self._resp.close()


class AiohttpTransport:
    """One upstream base URL reached over the shared client session."""

    # aiohttp raises its own errors, asyncio's and OSError's, and ValueError for what it
    # refuses to send: every one is mapped (the aiohttp road has always mapped them all).
    errors: Final = (Exception,)

    def __init__(
        self,
        name: str,
        base_url: str,
        session: aiohttp.ClientSession,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.name = name
        self._base = base_url.rstrip("/")
        self._session = session
        self._fixed = tuple(headers)

    async def send(
        self,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        timeouts: AttemptTimeouts,
    ) -> AiohttpReceived:
        # `total` covers the body too, streamed or not: the Backend contract.
        client_timeout = aiohttp.ClientTimeout(
            total=timeouts.total_s, sock_connect=timeouts.connect_s, sock_read=timeouts.idle_s
        )
        async with asyncio.timeout(timeouts.first_byte_s):
            resp = await self._session.post(
                self._base + path,
                data=body,
                headers=[*self._fixed, *headers],
                timeout=client_timeout,
            )
        return AiohttpReceived(self.name, resp)

    def map_error(self, exc: BaseException, phase: str) -> GatewayError:
        return map_client_error(exc, self.name, phase)

    def close(self) -> None:
        """Nothing of its own to release: the shared session belongs to the app."""


async def fetch_text(
    session: aiohttp.ClientSession, url: str, name: str, timeout_s: float = 2.0
) -> str | None:
    """GET `url` as text (a worker's /metrics); None unless it answers 200."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                return None
            return await resp.text()
    except Exception as exc:
        raise map_client_error(exc, name, "scraping metrics") from exc
