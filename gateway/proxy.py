"""The request path of the inference endpoints: edge, estimate, admission, route, forward, relay, meter."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from gateway.errors import GatewayError, ModelNotFound, PayloadTooLarge, PermissionDenied
from gateway.forward import Attempt, SentAttempt, first_attempt_that_answers
from gateway.inbound import PATHS, Endpoint, InboundRequest, parse_request
from gateway.metering import Completion
from gateway.relay import DONE, EventFilter
from gateway.reliability import StallGuard, bound_write_buffer
from gateway.runtime import REQUEST_ID, RUNTIME, Runtime, Tenant
from gateway.usage import StreamMeter

_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


async def read_body(request: web.Request, cap: int) -> bytes:
    """Read the body, refusing it before it is read whole when it is over the cap."""
    length = request.content_length
    if length is not None and length > cap:
        raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {cap} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise PayloadTooLarge(f"request body is over the limit of {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def client_request_id(request: web.Request) -> str | None:
    """The client's own id for this request (kept beside ours in the ledger; never the key)."""
    value = request.headers.get("x-client-request-id") or request.headers.get("x-request-id")
    if value is None or len(value) > 128 or not value.isprintable():
        return None
    return value


def handler(endpoint: Endpoint) -> Any:
    """The aiohttp handler of one inference endpoint."""

    async def handle(request: web.Request) -> web.StreamResponse:
        rt = request.app[RUNTIME].current
        tenant = rt.auth.tenant_for(request)
        raw = await read_body(request, tenant.limits.max_body_bytes)
        inbound = parse_request(raw, endpoint, tenant.limits)
        return await serve(rt, request, tenant, inbound)

    return handle


async def serve(
    rt: Runtime, request: web.Request, tenant: Tenant, inbound: InboundRequest
) -> web.StreamResponse:
    """Admit, route, forward and meter one validated request."""
    model = rt.models.get(inbound.model)
    if model is None:
        raise ModelNotFound(
            f"The model `{inbound.model}` does not exist or you do not have access to it.",
            param="model",
        )
    if tenant.allowed_models is not None and inbound.model not in tenant.allowed_models:
        raise PermissionDenied(
            f"this key may not use the model `{inbound.model}`",
            param="model",
            code="model_not_allowed",
        )
    rid = request[REQUEST_ID]
    arrived = time.monotonic()
    estimate = rt.estimator.estimate(inbound, model)
    reservation = await rt.meter.reserve(tenant, model, estimate)
    completion = Completion(rid, tenant.name, inbound, estimate, reservation, arrived)
    completion.client_request_id = client_request_id(request)
    rel = rt.router.reliability
    sent: list[SentAttempt] = []
    try:
        plans, decision = await rt.router.plan(inbound, model, tenant, estimate, request.headers)
        completion.decision = decision
        attempt = await first_attempt_that_answers(
            plans,
            path=PATHS[inbound.endpoint],
            headers=rt.forward_headers(request, rid),
            stream=inbound.stream,
            deadline=asyncio.get_running_loop().time() + rt.request_deadline_s(tenant, request),
            hooks=rt.router,
            gate=rel.gate,
            options=rel.forward_options,
            sent=sent,
        )
    except asyncio.CancelledError:
        # The client left before any answer. An attempt that was out had the prompt
        # (a non-streamed answer is only sent whole): it gets its row.
        await asyncio.shield(rt.meter.left_before_answer(completion, sent, rt.router.batch_seen))
        raise
    except BaseException:
        await rt.meter.abandon(completion)
        raise
    batch = rt.router.batch_seen(attempt.backend)
    completion.attach(attempt, batch, rt.meter.unit_prices(attempt.backend, inbound.model, batch))
    if attempt.hedged:
        completion.hedge_losers = rt.meter.hedge_prices(
            attempt.hedged, inbound.model, rt.router.batch_seen
        )
    rt.router.on_start(attempt.backend, attempt.response.headers, estimate.prompt_tokens)
    try:
        if inbound.stream:
            return await _relay_stream(rt, request, completion, attempt)
        return await _relay_whole(rt, completion, attempt)
    finally:
        attempt.release()
        rt.router.on_end(
            attempt.backend,
            inbound.model,
            completion.ttft_s,
            time.monotonic() - arrived,
            completion.completion_tokens,
            completion.groq_usage,
            estimate.prompt_tokens,
        )


async def _relay_whole(rt: Runtime, completion: Completion, attempt: Attempt) -> web.Response:
    try:
        body = await attempt.response.read()
    except GatewayError:
        await rt.meter.finish(completion, outcome="upstream_error")
        raise
    completion.first_byte_at = time.monotonic()
    await rt.meter.finish(completion, outcome="ok", answer=attempt.answer)
    return web.Response(
        body=body,
        status=attempt.response.status,
        headers=rt.answer_headers(completion, attempt, "application/json"),
    )


async def _relay_stream(
    rt: Runtime, request: web.Request, completion: Completion, attempt: Attempt
) -> web.StreamResponse:
    inbound = completion.inbound
    flt = EventFilter(strip_usage=not inbound.include_usage)
    meter = completion.stream_meter()
    resp = web.StreamResponse(status=200, headers=rt.answer_headers(completion, attempt, None))
    resp.headers.update(_SSE_HEADERS)
    # A client that reads nothing for as long as an upstream may stay silent is cut.
    guard = StallGuard(request, attempt.timeouts.idle_s if attempt.timeouts else 60.0)
    try:
        return await _relay_events(rt, request, completion, attempt, resp, guard, flt, meter)
    finally:
        guard.close()


async def _relay_events(
    rt: Runtime,
    request: web.Request,
    completion: Completion,
    attempt: Attempt,
    resp: web.StreamResponse,
    guard: StallGuard,
    flt: EventFilter,
    meter: StreamMeter,
) -> web.StreamResponse:
    assert attempt.first_event is not None and attempt.events is not None
    outcome = "ok"
    failure: GatewayError | None = None  # sent after the ledger row, like [DONE]
    held: bytes | None = None  # the upstream's own error event, also sent after the row
    try:
        await resp.prepare(request)
        bound_write_buffer(request, rt.router.reliability.settings.write_buffer_bytes)
        completion.first_byte_at = time.monotonic()
        block: bytes | None = attempt.first_event
        events = attempt.events
        while block is not None:
            meter.feed(block)
            out = flt.filter(block)
            if flt.error_seen:
                held = out
                break
            if out is not None:
                await guard.write(resp, out + b"\n\n")
            if flt.done:
                break
            block = await anext(events, None)
        if not flt.done:
            outcome = "upstream_error" if flt.error_seen else "upstream_cut"
    except GatewayError as exc:
        outcome = "upstream_cut"
        failure = exc
    except (ConnectionResetError, asyncio.CancelledError) as exc:
        outcome = "client_disconnect"
        attempt.response.close()
        await asyncio.shield(rt.meter.finish(completion, outcome=outcome, meter=meter))
        if isinstance(exc, asyncio.CancelledError):
            raise
        return resp  # the client is gone (or was cut); aiohttp tolerates the closed transport
    attempt.response.close()
    await rt.meter.finish(completion, outcome=outcome, meter=meter)
    if outcome == "ok":
        try:
            await guard.write(resp, DONE + b"\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the row is written; the client left before [DONE]
    elif held is not None:
        await _send_last(resp, held)
    elif outcome == "upstream_cut" and not flt.error_seen:
        await _send_stream_error(
            resp,
            failure
            or GatewayError("the upstream stream ended before it was complete", code="stream_cut"),
        )
    return resp


async def _send_stream_error(resp: web.StreamResponse, exc: GatewayError) -> None:
    """A mid-stream failure: `data: {"error": ...}` and the stream closes without [DONE]."""
    await _send_last(resp, b"data: " + exc.body())


async def _send_last(resp: web.StreamResponse, event: bytes) -> None:
    try:
        await resp.write(event + b"\n\n")
        await resp.write_eof()
    except ConnectionResetError:
        return
