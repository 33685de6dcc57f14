"""Response timing shared by the load generator's HTTP clients, and the aiohttp client.

The load generator must cost little per request (it pushes a gateway past 3,000 req/s on a
2-core machine), so responses are not decoded: a stream is split into SSE events and only the
time of the first and last content event, their count and the one usage event are kept; a
buffered body is parsed once, with orjson, for its usage. The fast client is in `rawhttp`; the
aiohttp client here is the fallback for TLS and the reference to check the raw one against.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from loadtest.results import RequestRecord

_perf = time.perf_counter


class ResponseReader:
    """Timing and usage of one response, written into its RequestRecord when it finishes."""

    __slots__ = (
        "_body",
        "_done",
        "_error_event",
        "_first",
        "_last",
        "_n",
        "_stream_error",
        "_tail",
        "_usage",
        "origin",
        "rec",
        "scheduled",
        "sse",
    )

    def __init__(self, rec: RequestRecord, scheduled: float, origin: float) -> None:
        self.rec = rec
        self.scheduled = scheduled  # absolute perf_counter time the request was due
        self.origin = origin  # absolute perf_counter time of the run's start
        self.sse = False
        self._body: list[bytes] = []
        self._tail = b""
        self._first = 0.0
        self._last = 0.0
        self._n = 0
        self._done = False
        self._stream_error = False
        self._error_event = b""
        self._usage: bytes | None = None

    def headers(self, status: int, content_type: bytes, backend: str | None) -> None:
        """Status line and the headers we care about arrived."""
        self.rec.status = status
        self.rec.backend = backend
        self.sse = 200 <= status < 300 and b"event-stream" in content_type

    def body(self, data: bytes, now: float) -> None:
        """A piece of the (de-chunked) body arrived at `now`."""
        if not self.sse:
            self._body.append(data)
            return
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        buf = self._tail + data if self._tail else data
        pos = 0
        while True:
            end = buf.find(b"\n\n", pos)
            if end < 0:
                break
            self._event(buf[pos:end], now)
            pos = end + 2
        self._tail = buf[pos:]

    def _event(self, ev: bytes, now: float) -> None:
        j = ev.find(b"data:")
        if j < 0:
            return  # comment, keep-alive or a field we do not time
        payload = ev[j + 5 :].lstrip()
        if payload.startswith(b"[DONE]"):
            self._done = True
            return
        if b'"choices"' not in payload:
            if b'"error"' in payload:
                self._stream_error = True
                self._error_event = payload
            elif b'"usage"' in payload:
                self._usage = payload
            return
        if b'"usage":{' in payload or b'"usage": {' in payload:
            self._usage = payload
        if b'"choices":[]' in payload or b'"choices": []' in payload:
            return  # the usage-only chunk carries no content
        if self._n == 0:
            self._first = now
        self._last = now
        self._n += 1

    def fail(self, error: str, now: float) -> None:
        """The exchange ended without a complete response."""
        self.rec.error = error
        self.rec.end = now - self.origin
        if self._n:
            self._finish_stream()

    def finish(self, now: float) -> None:
        """The whole response arrived at `now`."""
        rec = self.rec
        rec.end = now - self.origin
        if self.sse:
            self._finish_stream()
            if self._stream_error:
                rec.error = "stream_error"
                rec.detail = _error_message(self._error_event)
            elif not self._done:
                rec.error = "stream_incomplete"
            return
        raw = b"".join(self._body)
        try:
            obj = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            obj = None
        if not 200 <= rec.status < 300:
            etype = None
            if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
                err = obj["error"]
                etype = err.get("code") or err.get("type")
                if isinstance(err.get("message"), str):
                    rec.detail = err["message"][:300]
            elif raw:
                rec.detail = raw[:300].decode("utf-8", "replace")
            rec.error = f"http_{rec.status}:{etype}" if etype else f"http_{rec.status}"
            return
        if not isinstance(obj, dict):
            rec.error = "bad_json"
            return
        _apply_usage(rec, obj)

    def _finish_stream(self) -> None:
        rec = self.rec
        rec.events = self._n
        if self._n:
            rec.ttft = self._first - self.scheduled
            if self._n > 1:
                rec.itl = (self._last - self._first) / (self._n - 1)
        if self._usage is not None:
            try:
                obj = orjson.loads(self._usage)
            except orjson.JSONDecodeError:
                return
            if isinstance(obj, dict):
                _apply_usage(rec, obj)


def _apply_usage(rec: RequestRecord, obj: dict[str, Any]) -> None:
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        # Groq puts streamed usage under x_groq.usage.
        xg = obj.get("x_groq")
        usage = xg.get("usage") if isinstance(xg, dict) else None
    if isinstance(usage, dict):
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        rec.prompt_tokens = pt if isinstance(pt, int) else None
        rec.completion_tokens = ct if isinstance(ct, int) else None


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def origin(self) -> str:
        """scheme://host:port"""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The full endpoint URL."""
        return self.origin + self.path


class Client(Protocol):
    """Sends request `i` (body index) as tenant `k` and feeds the response to `reader`."""

    async def request(self, i: int, k: int, reader: ResponseReader) -> None: ...

    async def close(self) -> None: ...


class AiohttpClient:
    """The same exchange over one aiohttp ClientSession (supports https)."""

    def __init__(
        self,
        target: Target,
        keys: list[str | None],
        bodies: list[bytes],
        limit: int,
        timeout: float,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        self._url = target.url
        self._bodies = bodies
        base = {"Content-Type": "application/json", "User-Agent": "neogate-loadtest"}
        base.update(extra_headers or {})
        self._headers = [
            dict(base, **({"Authorization": f"Bearer {k}"} if k else {})) for k in keys
        ]
        self._timeout = timeout
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(1, limit), limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,
        )

    async def request(self, i: int, k: int, reader: ResponseReader) -> None:
        """Send body `i` as tenant `k`; errors end up in the reader's record."""
        remaining = max(0.001, reader.scheduled + self._timeout - _perf())
        try:
            async with asyncio.timeout(remaining):
                async with self._session.post(
                    self._url, data=self._bodies[i], headers=self._headers[k]
                ) as resp:
                    ctype = resp.headers.get("Content-Type", "").encode("latin-1")
                    reader.headers(resp.status, ctype, resp.headers.get("x-neogate-backend"))
                    async for chunk in resp.content.iter_any():
                        reader.body(chunk, _perf())
            reader.finish(_perf())
        except TimeoutError:
            reader.fail("timeout", _perf())
        except aiohttp.ClientConnectorError:
            reader.fail("connect_error", _perf())
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError):
            reader.fail("disconnected", _perf())
        except aiohttp.ClientError as exc:
            reader.fail(f"client_error:{type(exc).__name__}", _perf())

    async def close(self) -> None:
        """Close the session."""
        with contextlib.suppress(Exception):
            await self._session.close()


def _error_message(payload: bytes) -> str | None:
    """The message of a `data: {"error": {...}}` event, if it has one."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload[:300].decode("utf-8", "replace") or None
    err = obj.get("error") if isinstance(obj, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    return message[:300] if isinstance(message, str) else None
