"""One attempt read up to the point where the client may see its first byte.

A stream's first event must arrive in time and be a JSON object; a non-streamed answer
is read whole and parsed, then handed on as a `BufferedAnswer`. Either failure fails
the attempt while the client has seen nothing, so the forwarder can still fail over.
Every limit is the attempt's own, cut to the request's deadline (`timeouts_within`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from adapters.base import AttemptTimeouts, UpstreamResponse
from gateway.errors import UpstreamProtocolError, UpstreamTimeout
from gateway.flow.relay import DONE, is_json_object


class BufferedAnswer:
    """A non-streamed answer already read whole inside its attempt."""

    __slots__ = ("_body", "_inner")

    def __init__(self, inner: UpstreamResponse, body: bytes) -> None:
        self._inner = inner
        self._body = body

    @property
    def status(self) -> int:
        return self._inner.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._inner.headers

    async def read(self) -> bytes:
        return self._body

    def events(self) -> AsyncIterator[bytes]:
        raise TypeError("a buffered answer has no events")

    def close(self) -> None:
        self._inner.close()


async def first_event(events: AsyncIterator[bytes], backend: str, until: float) -> bytes:
    try:
        async with asyncio.timeout_at(until):
            return await anext(events)
    except StopAsyncIteration:
        pass
    except TimeoutError as exc:
        raise UpstreamTimeout(f"backend {backend} sent no stream event in time") from exc
    raise UpstreamProtocolError(f"backend {backend} closed the stream before any event")


def checked_first(event: bytes, backend: str) -> bytes:
    """A first event that is not JSON fails the attempt while the client has seen nothing."""
    data = event.startswith(b"data:") and not event.startswith(DONE)
    if data and not is_json_object(event[5:].lstrip()):
        raise UpstreamProtocolError(
            f"backend {backend} sent a first stream event that is not a JSON object",
            code="upstream_bad_event",
        )
    return event


async def whole_body(response: UpstreamResponse, backend: str) -> tuple[bytes, dict[str, Any]]:
    """Read a non-streamed answer whole, and its JSON; a cut or unparseable body is a
    retryable failure.

    The adapter bounds the read by the attempt's total limit (the Backend contract).
    """
    body = await response.read()
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise UpstreamProtocolError(f"backend {backend} sent a body that is not a JSON object")
    return body, parsed


def timeouts_within(t: AttemptTimeouts, remaining: float) -> AttemptTimeouts:
    remaining = max(remaining, 0.001)
    return AttemptTimeouts(
        connect_s=min(t.connect_s, remaining),
        first_byte_s=min(t.first_byte_s, remaining),
        idle_s=min(t.idle_s, remaining),
        total_s=min(t.total_s, remaining),
    )
