"""The fastest possible OpenAI-compatible upstream: fixed answers as precomputed bytes (benchmark baseline).

Per request it reads the body and looks for `"stream": true` and `"include_usage": true` with a
byte search (no JSON parsing); every answer, whole or streamed, is one precomputed buffer.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from loadtest.sim.common import SSE_DONE, TextSource, sse, usage_object

_STREAM = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE = re.compile(rb'"include_usage"\s*:\s*true')
_CREATED = 1700000000


def _chat_bytes(model: str, pieces: list[str], prompt_tokens: int) -> tuple[bytes, bytes, bytes]:
    """(non-stream body, stream without usage, stream with usage)."""
    usage = usage_object(prompt_tokens, len(pieces))
    head = {
        "id": "chatcmpl-static",
        "created": _CREATED,
        "model": model,
        "system_fingerprint": "fp_static",
    }
    body = orjson.dumps(
        {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces)},
                    "logprobs": None,
                    "finish_reason": "length",
                }
            ],
            "usage": usage,
        }
    )
    deltas = [{"role": "assistant", "content": ""}] + [{"content": p} for p in pieces] + [{}]
    streams = []
    for with_usage in (False, True):
        events = []
        for i, delta in enumerate(deltas):
            finish = "length" if i == len(deltas) - 1 else None
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            chunk = {**head, "object": "chat.completion.chunk", "choices": [choice]}
            if with_usage:
                chunk["usage"] = None
            events.append(sse(chunk))
        if with_usage:
            events.append(
                sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
            )
        events.append(SSE_DONE)
        streams.append(b"".join(events))
    return body, streams[0], streams[1]


def _completion_bytes(
    model: str, pieces: list[str], prompt_tokens: int
) -> tuple[bytes, bytes, bytes]:
    usage = usage_object(prompt_tokens, len(pieces))
    head = {"id": "cmpl-static", "object": "text_completion", "created": _CREATED, "model": model}
    choice = {"index": 0, "text": "".join(pieces), "logprobs": None, "finish_reason": "length"}
    body = orjson.dumps({**head, "choices": [choice], "usage": usage})
    streams = []
    for with_usage in (False, True):
        events = []
        for i, text in enumerate([*pieces, ""]):
            finish = "length" if i == len(pieces) else None
            chunk = {
                **head,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            }
            if with_usage:
                chunk["usage"] = None
            events.append(sse(chunk))
        if with_usage:
            events.append(sse({**head, "choices": [], "usage": usage}))
        events.append(SSE_DONE)
        streams.append(b"".join(events))
    return body, streams[0], streams[1]


def _handler(
    answers: tuple[bytes, bytes, bytes],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    body, stream_plain, stream_usage = answers

    async def handle(request: web.Request) -> web.Response:
        raw = await request.read()
        if _STREAM.search(raw) is None:
            return web.Response(body=body, content_type="application/json")
        chosen = stream_usage if _INCLUDE_USAGE.search(raw) else stream_plain
        return web.Response(body=chosen, content_type="text/event-stream")

    return handle


def create_static_app(
    model: str = "static-model", completion_tokens: int = 16, prompt_tokens: int = 10, seed: int = 0
) -> web.Application:
    """Answer every chat/completions request with the same `completion_tokens`-token text.

    The reported usage is fixed (`prompt_tokens`, `completion_tokens`) whatever was asked.
    """
    pieces = TextSource(seed).pieces(0, completion_tokens)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", _handler(_chat_bytes(model, pieces, prompt_tokens)))
    app.router.add_post(
        "/v1/completions", _handler(_completion_bytes(model, pieces, prompt_tokens))
    )
    models = orjson.dumps(
        {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": _CREATED, "owned_by": "static"}],
        }
    )

    async def list_models(request: web.Request) -> web.Response:
        return web.Response(body=models, content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    return app
