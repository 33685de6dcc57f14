"""The request path of the inference endpoints: edge, estimate, admission, route, forward, relay, meter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Protocol

from gateway.config import GatewayConfig, ModelSpec
from gateway.errors import GatewayError, ModelNotFound, PermissionDenied, UpstreamProtocolError
from gateway.flow.attempt import Attempt, SentAttempt
from gateway.flow.completion import Completion
from gateway.flow.estimate import Estimator
from gateway.flow.feedback import Feedback
from gateway.flow.forward import first_attempt_that_answers
from gateway.flow.headers import answer_headers, forward_headers, request_deadline_s
from gateway.flow.meter import Meter
from gateway.flow.relay import DONE, EventFilter
from gateway.flow.reliability import ReliabilitySettings
from gateway.flow.routing import Router
from gateway.flow.slo_budgets import CLIENT_LEFT, SloOutcome
from gateway.http.auth import Authenticator, Tenant
from gateway.http.client_headers import check_client_headers
from gateway.http.exchange import ClientExchange, StallGuard, refuse_encoded_body
from gateway.http.inbound import PATHS, Endpoint, InboundRequest, parse_request
from gateway.metering.stream_meter import StreamMeter
from policies.types import RouteRequest

_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def client_request_id(headers: Mapping[str, str]) -> str | None:
    """The client's own id for this request (kept beside ours in the ledger; never the key)."""
    value = headers.get("x-client-request-id") or headers.get("x-request-id")
    if value is None or len(value) > 128 or not value.isprintable():
        return None
    return value


class Services(Protocol):
    """The config-lifetime parts the request path uses (`gateway.runtime.Runtime` has them)."""

    @property
    def config(self) -> GatewayConfig: ...
    @property
    def models(self) -> Mapping[str, ModelSpec]: ...
    @property
    def auth(self) -> Authenticator: ...
    @property
    def estimator(self) -> Estimator: ...
    @property
    def router(self) -> Router: ...
    @property
    def feedback(self) -> Feedback: ...
    @property
    def meter(self) -> Meter: ...
    @property
    def settings(self) -> ReliabilitySettings: ...
    @property
    def deadline_ceiling_s(self) -> float: ...


async def serve_request(rt: Services, ex: ClientExchange, endpoint: Endpoint) -> None:
    """Authenticate, read and validate one inference request, then serve it."""
    refuse_encoded_body(ex.headers)  # first: a compressed body is never read, keyed or not
    tenant = rt.auth.tenant_for(ex.headers)
    check_client_headers(ex.headers, rt.config.slo_classes)
    raw = await ex.read_body(tenant.limits.max_body_bytes)
    inbound = parse_request(raw, endpoint, tenant.limits)
    await serve(rt, ex, tenant, inbound)


async def serve(rt: Services, ex: ClientExchange, tenant: Tenant, inbound: InboundRequest) -> None:
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
    rid = ex.rid
    arrived = time.monotonic()
    estimate = await rt.estimator.estimate(inbound, model, tenant.limits.max_tokens)
    reservation = await rt.meter.reserve(tenant, model, estimate)
    completion = Completion(rid, tenant.name, inbound, estimate, reservation, arrived)
    completion.client_request_id = client_request_id(ex.headers)
    sent: list[SentAttempt] = []
    broken: list[SentAttempt] = []
    routed: RouteRequest | None = None  # set once counted in its SLO class's budget
    try:
        rt.feedback.on_request()
        req = rt.router.route_request(inbound, tenant, estimate, ex.headers)
        rt.feedback.on_routed(req)
        routed = req
        plans, decision = await rt.router.plan(req, inbound, model, tenant)
        completion.decision = decision
        budget_s = request_deadline_s(rt.deadline_ceiling_s, ex.headers)
        attempt = await first_attempt_that_answers(
            plans,
            path=PATHS[inbound.endpoint],
            headers=forward_headers(ex.headers, rid),
            stream=inbound.stream,
            deadline=asyncio.get_running_loop().time() + budget_s,
            hooks=rt.feedback,
            gate=rt.feedback.gate,
            options=rt.settings.forward,
            sent=sent,
            broken=broken,
        )
    except asyncio.CancelledError as exc:
        # The client left before any answer. An attempt that was out had the prompt
        # (a non-streamed answer is only sent whole): it gets its row.
        rt.feedback.on_unanswered(routed, time.monotonic() - arrived, exc)
        await asyncio.shield(rt.meter.left_before_answer(completion, sent, rt.router.batch_seen))
        raise
    except BaseException as exc:
        # No answer: no backend, every attempt failed, an error passed on (an SLO miss).
        rt.feedback.on_unanswered(routed, time.monotonic() - arrived, exc)
        await rt.meter.abandon(completion)
        raise
    finally:
        if broken:  # answers that broke mid-body: the operator's cost, failover or not
            await asyncio.shield(rt.meter.broken_attempts(completion, broken, rt.router.batch_seen))
    batch = rt.router.batch_seen(attempt.backend)
    context = estimate.prompt_tokens + estimate.expected_output_tokens // 2
    prices = rt.meter.prices.unit_prices(
        attempt.backend, inbound.model, batch, estimate.prompt_tokens, context
    )
    completion.attach(attempt, batch, prices)
    if attempt.hedged:
        completion.hedge_losers = rt.meter.hedge_prices(
            attempt.hedged,
            inbound.model,
            rt.router.batch_seen,
            prompt_tokens=estimate.prompt_tokens,
        )
    charge = rt.feedback.on_start(
        attempt.backend, attempt.response.headers, estimate.prompt_tokens, decision
    )
    left = False
    try:
        if inbound.stream:
            await _relay_stream(rt, ex, completion, attempt)
        else:
            await _relay_whole(rt, ex, completion, attempt)
    except asyncio.CancelledError:
        left = True  # the client went away (a whole answer's body was still being read)
        raise
    finally:
        attempt.release()
        # The outcome the meter recorded; one that never reached the meter ends here.
        outcome = completion.outcome or completion.end(
            CLIENT_LEFT if left else "unmetered", time.monotonic()
        )
        rt.feedback.on_end(outcome, slo=SloOutcome(decision, charge, inbound.stream))


async def _relay_whole(
    rt: Services, ex: ClientExchange, completion: Completion, attempt: Attempt
) -> None:
    try:
        body = await attempt.response.read()
    except GatewayError:
        await rt.meter.finish(completion, outcome="upstream_error")
        raise
    completion.first_byte_at = time.monotonic()
    await rt.meter.finish(completion, outcome="ok", answer=attempt.answer, answer_bytes=len(body))
    headers = answer_headers(completion, attempt, "application/json")
    await ex.send(attempt.response.status, headers, body)


async def _relay_stream(
    rt: Services, ex: ClientExchange, completion: Completion, attempt: Attempt
) -> None:
    inbound = completion.inbound
    flt = EventFilter(strip_usage=not inbound.include_usage)
    meter = completion.stream_meter()
    headers = answer_headers(completion, attempt, None)
    headers.update(_SSE_HEADERS)
    # A client that reads nothing for as long as an upstream may stay silent is cut.
    guard = StallGuard(ex, attempt.timeouts.idle_s if attempt.timeouts else 60.0)
    try:
        await _relay_events(rt, ex, completion, attempt, headers, guard, flt, meter)
    finally:
        guard.close()


async def _relay_events(
    rt: Services,
    ex: ClientExchange,
    completion: Completion,
    attempt: Attempt,
    headers: dict[str, str],
    guard: StallGuard,
    flt: EventFilter,
    meter: StreamMeter,
) -> None:
    assert attempt.first_event is not None and attempt.events is not None
    outcome = "ok"
    failure: GatewayError | None = None  # sent after the ledger row, like [DONE]
    held: bytes | None = None  # the upstream's own error event, also sent after the row
    try:
        await ex.open_stream(200, headers, rt.settings.write_buffer_bytes)
        completion.first_byte_at = time.monotonic()
        block: bytes | None = attempt.first_event
        events = attempt.events
        while block is not None:
            out = flt.filter(block)
            if flt.bad_event is not None:
                outcome = "upstream_protocol_error"
                failure = _bad_event_error(attempt.backend, flt.bad_event)
                break
            meter.feed(block, flt.event)
            if flt.error_seen:
                held = out
                break
            if out is not None:
                await guard.write(out + b"\n\n")
            if flt.done:
                break
            block = await anext(events, None)
        if not flt.done and failure is None:
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
        return  # the client is gone (or was cut)
    attempt.response.close()
    await rt.meter.finish(completion, outcome=outcome, meter=meter)
    if outcome == "ok":
        try:
            usage_chunk = flt.usage_chunk(meter.reported)
            if usage_chunk is not None:
                await guard.write(usage_chunk + b"\n\n")
            await guard.write(DONE + b"\n\n")
            await ex.write_eof()
        except ConnectionResetError:
            pass  # the row is written; the client left before [DONE]
    elif held is not None:
        await _send_last(ex, held)
    elif failure is not None or (outcome == "upstream_cut" and not flt.error_seen):
        await _send_stream_error(
            ex,
            failure
            or GatewayError("the upstream stream ended before it was complete", code="stream_cut"),
        )


def _bad_event_error(backend: str, event: bytes) -> UpstreamProtocolError:
    shown = event[:80].decode("utf-8", "replace")
    return UpstreamProtocolError(
        f"backend {backend} sent a stream event that is not a JSON object: {shown!r}",
        code="upstream_bad_event",
    )


async def _send_stream_error(ex: ClientExchange, exc: GatewayError) -> None:
    """A mid-stream failure: `data: {"error": ...}` and the stream closes without [DONE]."""
    await _send_last(ex, b"data: " + exc.body())


async def _send_last(ex: ClientExchange, event: bytes) -> None:
    try:
        await ex.write(event + b"\n\n")
        await ex.write_eof()
    except ConnectionResetError:
        return
