"""`neogate sim static` on a bare asyncio Protocol: the same precomputed answers, less CPU.

The benchmarks run the upstream on the same two cores as the gateway (and wrk); the
aiohttp version of the static upstream spends ~100 us of CPU per request, which a
saturated 2-core machine takes from the gateway being measured. This server keeps
connections alive, reads each request head and body by Content-Length, and answers
with one write of precomputed bytes: chat and text completions (whole or streamed,
with or without the usage chunk), `GET /v1/models` and `GET /health`. Anything else
gets a 404; a request it cannot frame gets a 400 and the connection closes.
"""

from __future__ import annotations

import asyncio
import re
from typing import Final, cast

import orjson

from loadtest.sim.common import TextSource
from loadtest.sim.static import _CREATED, _chat_bytes, _completion_bytes

_STREAM: Final = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE: Final = re.compile(rb'"include_usage"\s*:\s*true')
_CONTENT_LENGTH: Final = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
_MAX_HEAD: Final = 64 * 1024
_MAX_BODY: Final = 64 * 1024 * 1024


def _response(status: str, content_type: str, body: bytes, *, close: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    )
    return head.encode() + body


class StaticAnswers:
    """Every answer the server gives, as finished HTTP/1.1 responses."""

    def __init__(
        self, model: str = "static-model", completion_tokens: int = 16, prompt_tokens: int = 10
    ) -> None:
        pieces = TextSource(0).pieces(0, completion_tokens)
        self.by_path: dict[bytes, tuple[bytes, bytes, bytes]] = {}
        for path, build in (
            (b"/v1/chat/completions", _chat_bytes),
            (b"/v1/completions", _completion_bytes),
        ):
            whole, plain, usage = build(model, pieces, prompt_tokens)
            self.by_path[path] = (
                _response("200 OK", "application/json", whole),
                _response("200 OK", "text/event-stream", plain),
                _response("200 OK", "text/event-stream", usage),
            )
        models = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": model, "object": "model", "created": _CREATED, "owned_by": "static"}
                ],
            }
        )
        self.models = _response("200 OK", "application/json", models)
        self.health = _response("200 OK", "text/plain", b"")
        self.not_found = _response(
            "404 Not Found", "application/json", b'{"error":{"message":"not found"}}'
        )
        self.bad = _response(
            "400 Bad Request",
            "application/json",
            b'{"error":{"message":"bad request"}}',
            close=True,
        )

    def answer(self, method: bytes, path: bytes, body: bytes) -> bytes:
        if method == b"POST":
            answers = self.by_path.get(path)
            if answers is not None:
                if _STREAM.search(body) is None:
                    return answers[0]
                return answers[2] if _INCLUDE_USAGE.search(body) else answers[1]
        elif method == b"GET":
            if path == b"/v1/models":
                return self.models
            if path == b"/health":
                return self.health
        return self.not_found


class _StaticProtocol(asyncio.Protocol):
    def __init__(self, answers: StaticAnswers) -> None:
        self._answers = answers
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._fail(out)
                    return
                break
            head = buf[:end]
            m = _CONTENT_LENGTH.search(head)
            length = int(m.group(1)) if m else 0
            if length > _MAX_BODY or b"\r\ntransfer-encoding:" in head.lower():
                self._fail(out)  # chunked request bodies: not for this baseline server
                return
            start = end + 4
            if len(buf) < start + length:
                break
            line_end = head.find(b"\r\n")
            parts = (head if line_end < 0 else head[:line_end]).split(b" ")
            if len(parts) != 3:
                self._fail(out)
                return
            out.append(self._answers.answer(parts[0], parts[1], buf[start : start + length]))
            buf = buf[start + length :]
        self._buf = buf
        if out and self._transport is not None:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _fail(self, out: list[bytes]) -> None:
        if self._transport is not None:
            self._transport.write(b"".join([*out, self._answers.bad]))
            self._transport.close()
        self._buf = b""


async def start_static_raw(
    host: str, port: int, answers: StaticAnswers | None = None
) -> tuple[asyncio.Server, int]:
    """Listen on host:port (0: any free port); returns the server and the bound port."""
    ready = answers or StaticAnswers()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _StaticProtocol(ready), host, port, backlog=2048)
    bound: int = server.sockets[0].getsockname()[1]
    return server, bound
