"""Answering one generation request, whole or streamed, paced by a Generation, with mid-stream faults."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web

from loadtest.sim.common import JSON_TYPE, error_payload, error_response, sse, sse_headers
from loadtest.sim.faults import MIDSTREAM_FAULTS, TOKENS_BEFORE_MIDSTREAM_FAULT, wait_for_shutdown
from loadtest.sim.render import Renderer

MALFORMED_EVENT = b'data: {"id": "chatcmpl-broken", "choices": [{"delta": \n\n'
MALFORMED_BODY = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"mess'


class GenerationAborted(Exception):
    """The backend gave up on a request (shutting down); its connection is dropped."""


class Generation(Protocol):
    """Paces the tokens of one request (a worker's batch slot or a provider's timer)."""

    def start(self) -> None:
        """Begin generating (enqueue, start the clock)."""

    async def wait_past(self, sent: int) -> int:
        """Wait until more than `sent` tokens per choice exist; return how many exist."""

    def close(self) -> None:
        """Stop generating (finished, failed or the client went away)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """How to answer: what to render, how many tokens, which fault, and late-bound usage."""

    renderer: Renderer
    total: int
    fault: str | None
    delay_s: float
    usage: Callable[[], dict[str, Any]]
    last_chunk_extra: Callable[[dict[str, Any]], Mapping[str, Any] | None] | None = None


async def send(request: web.Request, reply: Reply, gen: Generation) -> web.StreamResponse:
    """Answer `request` with `reply`, taking tokens from `gen`."""
    if reply.renderer.req.stream:
        return await _send_stream(request, reply, gen)
    return await _send_whole(request, reply, gen)


async def _send_whole(request: web.Request, reply: Reply, gen: Generation) -> web.StreamResponse:
    if reply.fault == "slow":
        await asyncio.sleep(reply.delay_s)
    gen.start()
    try:
        sent = 0
        while sent < reply.total:
            sent = await gen.wait_past(sent)
    except GenerationAborted:
        return error_response(503, "The server is shutting down.", "server_error", "shutdown")
    finally:
        gen.close()
    if reply.fault == "malformed":
        return web.Response(body=MALFORMED_BODY, content_type=JSON_TYPE)
    if reply.fault == "empty_stream":
        return web.Response(body=b"", content_type=JSON_TYPE)
    body = orjson.dumps(reply.renderer.body(reply.usage()))
    if reply.fault not in ("cut", "stall"):
        return web.Response(body=body, content_type=JSON_TYPE)
    resp = web.StreamResponse(headers={"Content-Type": JSON_TYPE})
    resp.content_length = len(body)
    await resp.prepare(request)
    if reply.fault == "cut":
        await resp.write(body[: len(body) // 2])
    else:
        await wait_for_shutdown(request)
    _abort(request)
    return resp


async def _send_stream(request: web.Request, reply: Reply, gen: Generation) -> web.StreamResponse:
    resp = web.StreamResponse(headers=sse_headers())
    await resp.prepare(request)
    if reply.fault == "empty_stream":
        await resp.write_eof()
        return resp
    if reply.fault == "slow":
        await asyncio.sleep(reply.delay_s)
    renderer = reply.renderer
    limit = reply.total
    if reply.fault in MIDSTREAM_FAULTS:
        limit = min(TOKENS_BEFORE_MIDSTREAM_FAULT, reply.total)
    gen.start()
    try:
        sent = 0
        while sent < limit:
            produced = min(await gen.wait_past(sent), limit)
            out = renderer.tokens(sent, produced)
            if sent == 0:
                out = renderer.head() + out
                if reply.fault == "malformed":
                    out += MALFORMED_EVENT
            await resp.write(out)
            sent = produced
        if reply.fault in (None, "slow", "slow_first_byte", "malformed"):
            usage = reply.usage()
            extra = reply.last_chunk_extra(usage) if reply.last_chunk_extra else None
            await resp.write(renderer.tail(usage, extra))
    except ConnectionResetError:
        return resp  # the client went away; nothing left to tell it
    except GenerationAborted:
        _abort(request)
        return resp
    finally:
        gen.close()
    if reply.fault == "cut":
        _abort(request)
    elif reply.fault == "stall":
        await wait_for_shutdown(request)
        _abort(request)
    elif reply.fault == "echo_key":
        given = request.headers.get("Authorization", "")
        debug = {"index": 0, "delta": {"content": f" [auth: {given}]"}, "finish_reason": None}
        await resp.write(sse({"object": "chat.completion.chunk", "choices": [debug]}))
        err = error_payload(f"key {given} was revoked", "invalid_request_error", "key_revoked")
        # The last event without its blank line: the key is in the stream's unterminated tail.
        await resp.write(b"data: " + orjson.dumps(err))
        await resp.write_eof()
    elif reply.fault == "error_midstream":
        err = error_payload(
            "Simulated failure in the middle of the stream.", "server_error", "sim_midstream"
        )
        await resp.write(sse(err))
        await resp.write_eof()
    else:
        await resp.write_eof()
    return resp


def _abort(request: web.Request) -> None:
    """Drop the connection without finishing the response."""
    transport = request.transport
    if transport is not None:
        transport.abort()
