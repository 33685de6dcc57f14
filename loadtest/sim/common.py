"""Wire helpers shared by the simulated backends: ids, SSE framing, OpenAI errors, usage, fake text, sockets."""

from __future__ import annotations

import asyncio
import base64
import math
import random
import secrets
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

SSE_DONE = b"data: [DONE]\n\n"
JSON_TYPE = "application/json"

# Common English words that are one token each in cl100k_base and o200k_base, so a gateway
# that counts streamed text with a real tokenizer gets (almost) the sim's own count.
_VOCABULARY = """
    the of and to in is that it for on with as was at by this from are be or an have not but
    they which one you all were we when there can has more if will their what so about would
    out up into them some time could other than then now only its also two may like over such
    these new most after first any where many used well because very just those system work
    part data model token each number way even back much good through long still make small
    high large world same both point under state since need great last light own value water
    form place case order line power process between result level group set
"""


def new_id(prefix: str) -> str:
    """A unique id in the style of the OpenAI API (`chatcmpl-...`, `call_...`)."""
    return prefix + secrets.token_hex(12)


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_headers() -> dict[str, str]:
    """Headers of an OpenAI-style event stream."""
    return {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def error_payload(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error object: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An OpenAI-format error response with the given HTTP status."""
    return web.Response(
        status=status,
        body=orjson.dumps(error_payload(message, type_, code, param)),
        content_type=JSON_TYPE,
        headers=headers,
    )


def json_response(obj: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    """A 200 JSON response serialised with orjson."""
    return web.Response(body=orjson.dumps(obj), content_type=JSON_TYPE, headers=headers)


def usage_object(
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    reasoning_tokens: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """OpenAI usage; prompt_tokens includes cached_tokens, completion_tokens includes reasoning_tokens."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }
    if extra:
        usage.update(extra)
    return usage


class TextSource:
    """Deterministic fake text: a seeded word stream read from an offset derived from the prompt.

    Each piece is one word with a leading space (or a full stop), i.e. one token.
    """

    def __init__(self, seed: int, length: int = 4096) -> None:
        rng = random.Random(seed)
        words = _VOCABULARY.split()
        stream: list[str] = []
        while len(stream) < length:
            stream.extend(" " + rng.choice(words) for _ in range(rng.randint(5, 14)))
            stream.append(".")
        self._stream = tuple(stream[:length])
        self._encoded = {w: orjson.dumps(w) for w in set(self._stream)}

    def pieces(self, key: int, count: int) -> list[str]:
        """`count` one-token pieces starting at a position chosen by `key`."""
        size = len(self._stream)
        start = key % size
        out = list(self._stream[start : start + count])
        while len(out) < count:
            out.extend(self._stream[: count - len(out)])
        return out

    def encoded(self, piece: str) -> bytes:
        """The JSON string literal of a piece (cached for the vocabulary)."""
        cached = self._encoded.get(piece)
        return cached if cached is not None else orjson.dumps(piece)


SHUTDOWN = web.AppKey("sim_shutdown", asyncio.Event)


async def _signal_shutdown(app: web.Application) -> None:
    app[SHUTDOWN].set()


def install_shutdown_event(app: web.Application) -> None:
    """Give the app an event set at shutdown, so hanging handlers can end."""
    app[SHUTDOWN] = asyncio.Event()
    app.on_shutdown.append(_signal_shutdown)


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = request.headers.get("x-request-id") or new_id("req_")


@web.middleware
async def openai_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Render aiohttp's own HTTP errors (404, 405, 413) as OpenAI error bodies."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        return error_response(exc.status, exc.reason, kind, None)
    return response


def base_app() -> web.Application:
    """An application with OpenAI error rendering, `x-request-id` headers and a shutdown event."""
    app = web.Application(middlewares=[openai_errors], client_max_size=64 * 1024 * 1024)
    app.on_response_prepare.append(_add_request_id)
    install_shutdown_event(app)
    return app


async def start_site(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 = any free port); return the runner and the bound port.

    Handlers are cancelled when their client disconnects, so a simulated request leaves the
    worker's batch as soon as its client goes away. Call `runner.cleanup()` to stop.
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = int(runner.addresses[0][1])
    return runner, bound


def fake_embedding(text: str, dims: int, seed: int) -> list[float]:
    """A deterministic unit vector for `text`."""
    rng = random.Random(zlib.crc32(text.encode()) ^ seed)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]


def embeddings_body(
    model: str, inputs: tuple[str, ...], prompt_tokens: int, dims: int, encoding: str, seed: int
) -> dict[str, Any]:
    """The `/v1/embeddings` response object."""
    data: list[dict[str, Any]] = []
    for i, text in enumerate(inputs):
        vec = fake_embedding(text, dims, seed)
        value: Any = vec
        if encoding == "base64":
            value = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
