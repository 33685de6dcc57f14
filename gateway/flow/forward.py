"""One request's attempts over the ranked backends: failover and hedging only before the first byte reaches the client.

    pick the next ranked backend whose breaker admits it and whose gate has a slot
      (the first attempt may wait in the gate's bounded queue; a full queue is a 429)
    open it: non-streamed answers are read whole, streams up to their first event,
      so a failure anywhere before the client saw a byte still fails over
    retryable failure (unreachable, reset, 5xx, 429, 401/403, timeout, broken body)
      -> jittered backoff, one unit of the retry budget, the next backend; when the
      request had a single candidate, a transient failure (refused or reset
      connection, 500/502/503/504) is tried once more on that same backend
    pass-through failure (400, 404, 409, 413, 422) -> raised at once, never retried,
      `x-should-retry: false`
    spent (attempts, candidates or deadline) -> the last failure, or 503 when no
      backend could be tried at all, with `x-should-retry: true` and `retry-after`
      (waiting can help), except the backend refusing the gateway's own credentials
    the retry budget refused a retry -> `x-should-retry: false`, no `retry-after`: the
      budget is there to stop retries from multiplying an outage, the SDK's included

With hedging on (streams only), a second attempt starts when the first has sent
no event after the hedge delay; the first to answer wins, the other is cancelled
and its backend named in `Attempt.hedged` (the operator's cost, not the tenant's).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from adapters.base import AttemptTimeouts, Backend, UpstreamResponse
from gateway.errors import (
    GatewayError,
    NoBackendAvailable,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.flow.backpressure import Gate, GateToken
from gateway.flow.hedging import HedgeConfig, hedge_delay, hedge_first_byte
from gateway.flow.relay import DONE, is_json_object

# Upstream statuses that are the gateway's own credentials failing on that backend: another
# backend may well succeed, and the breaker should see the backend as broken.
_CREDENTIAL_STATUSES = frozenset({401, 403})
# Upstream statuses worth one more try on the same backend when it is the only candidate.
_TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})


class AttemptHooks(Protocol):
    """What the forwarder reports to, and asks of, the live routing state (`Feedback`)."""

    def admit(self, backend: str) -> bool:
        """The breaker's leave for one attempt (consumes the half-open probe)."""
        ...

    def on_failure(self, backend: str, exc: GatewayError, elapsed: float) -> None: ...

    def on_abandon(self, backend: str) -> None:
        """An admitted attempt ended without a verdict (cancelled, lost a hedge)."""
        ...

    def may_retry(self) -> bool:
        """Spend one unit of the retry budget."""
        ...

    def on_retry(self, backend: str) -> None: ...


@dataclass(frozen=True, slots=True)
class SentAttempt:
    """An attempt whose request went out: a cancelled one (a lost hedge, or a client that
    left before any answer) still had the prompt, so it is metered."""

    backend: str
    backend_model: str
    number: int


@dataclass(frozen=True, slots=True)
class ForwardOptions:
    """How hard one request tries."""

    max_attempts: int = 3
    queue_wait_s: float = 0.0  # the first attempt's wait for a gate slot
    hedge: HedgeConfig = field(default_factory=HedgeConfig)


@dataclass(frozen=True, slots=True)
class AttemptPlan:
    """One ranked candidate turned into what the forwarder needs."""

    backend: Backend
    backend_model: str
    body: bytes
    timeouts: AttemptTimeouts
    ttft_s: float | None = None  # predicted, for the hedge delay
    ttft_spread_s: float | None = None


def _no_release() -> None:
    return None


@dataclass(slots=True)
class Attempt:
    """A started attempt: which backend, which try, and the open response."""

    backend: str
    backend_model: str
    number: int
    response: UpstreamResponse
    first_event: bytes | None  # streams: the first event, read before committing to the client
    events: AsyncIterator[bytes] | None  # streams: the rest, bounded by the attempt's deadline
    started: float  # loop time the attempt began
    timeouts: AttemptTimeouts | None = None  # as applied (already cut to the request's deadline)
    hedged: tuple[SentAttempt, ...] = ()  # cancelled hedges: the operator's cost
    answer: dict[str, Any] | None = None  # a buffered answer, parsed once (for metering)
    _release: _Release | None = field(default=None, repr=False)

    def release(self) -> None:
        """Give back the gate slot this attempt holds; safe to call more than once."""
        if self._release is not None:
            self._release()


class _Release:
    """Gives one gate slot back exactly once."""

    __slots__ = ("_gate", "_token")

    def __init__(self, gate: Gate | None, token: GateToken | None) -> None:
        self._gate = gate
        self._token = token

    def __call__(self) -> None:
        token, self._token = self._token, None
        if token is not None and self._gate is not None:
            self._gate.release(token)


class _Buffered:
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


class _NoCandidate(Exception):
    """Inside a hedge race: nothing left to start."""


def is_retryable(exc: GatewayError) -> bool:
    """Whether another backend might succeed where this attempt failed."""
    if isinstance(exc, UpstreamStatus):
        return exc.retryable or exc.upstream_status in _CREDENTIAL_STATUSES
    return isinstance(exc, UpstreamError)


async def first_attempt_that_answers(
    plans: Sequence[AttemptPlan],
    *,
    path: str,
    headers: Mapping[str, str],
    stream: bool,
    deadline: float,
    hooks: AttemptHooks,
    gate: Gate | None = None,
    options: ForwardOptions | None = None,
    sent: list[SentAttempt] | None = None,
    broken: list[SentAttempt] | None = None,
) -> Attempt:
    """Try the plans in rank order until one answers; raise the final error once spent.

    `deadline` is in event-loop time. The returned attempt holds a gate slot:
    the caller must `release()` it when the answer has been relayed. When the caller
    is cancelled (the client left), `sent` holds the attempts whose request was out.
    `broken` gets every attempt whose whole answer began (a 2xx) and then broke (cut,
    stalled or not JSON): the backend did the work, so the caller meters it.
    """
    fwd = _Forwarder(plans, path, headers, stream, deadline, hooks, gate, options, sent)
    if broken is not None:
        fwd.broken = broken
    opts = fwd.options
    if stream and plans:
        delay = hedge_delay(
            opts.hedge,
            candidates=len(plans),
            ttft_mean_s=plans[0].ttft_s,
            ttft_spread_s=plans[0].ttft_spread_s,
        )
        if delay is not None:
            return await fwd.hedged(delay)
    return await fwd.sequential()


class _Forwarder:
    """The state of one request's attempts."""

    def __init__(
        self,
        plans: Sequence[AttemptPlan],
        path: str,
        headers: Mapping[str, str],
        stream: bool,
        deadline: float,
        hooks: AttemptHooks,
        gate: Gate | None,
        options: ForwardOptions | None,
        sent: list[SentAttempt] | None = None,
    ) -> None:
        self.pending = list(plans)
        self.path = path
        self.headers = headers
        self.stream = stream
        self.deadline = deadline
        self.hooks = hooks
        self.gate = gate
        self.options = options or ForwardOptions()
        self.loop = asyncio.get_running_loop()
        self.failures: list[GatewayError] = []
        self.attempts = 0
        self.budget_refused = False  # the retry budget said no: the client must not retry
        self.same_backend_retry = len(self.pending) == 1  # one chance left for a lone candidate
        self.sent = sent if sent is not None else []  # attempts out right now
        self.broken: list[SentAttempt] = []  # 2xx answers whose body broke (metered)

    def remaining(self) -> float:
        return self.deadline - self.loop.time()

    async def sequential(self) -> Attempt:
        while self.attempts < self.options.max_attempts:
            if self.attempts > 0:
                if not self.pending or self.remaining() <= 0:
                    break
                await asyncio.sleep(min(_backoff(self.attempts), max(0.0, self.remaining())))
            picked = await self.pick(may_wait=self.attempts == 0)
            if picked is None:
                break
            plan, release = picked
            if self.attempts > 0 and not self.hooks.may_retry():
                self.budget_refused = True
                self._unpick(plan, release)
                break
            if self.remaining() <= 0:
                self._unpick(plan, release)
                break
            if self.attempts > 0:
                self.hooks.on_retry(plan.backend.name)
            try:
                return await self.open(plan, release, self.attempts)
            except GatewayError as exc:
                if not is_retryable(exc):
                    exc.should_retry = False  # the client's own mistake, as the upstream says
                    raise
                self.failures.append(exc)
                if self.same_backend_retry and is_transient(exc):
                    self.same_backend_retry = False
                    self.pending.append(plan)
        raise self.final_error()

    async def hedged(self, delay_s: float) -> Attempt:
        first = await self.pick(may_wait=True)
        if first is None:
            raise self.final_error()
        ready: dict[int, tuple[AttemptPlan, _Release]] = {0: first}
        names: dict[int, AttemptPlan] = {}

        async def start(k: int) -> Attempt | GatewayError:
            picked = ready.pop(k, None) or await self.pick(may_wait=False)
            if picked is None:
                raise _NoCandidate
            plan, release = picked
            names[k] = plan
            if k > 0:
                self.hooks.on_retry(plan.backend.name)
            try:
                return await self.open(plan, release, k)
            except GatewayError as exc:
                if not is_retryable(exc):
                    return exc  # wins the race: the client's error ends it
                self.failures.append(exc)
                raise

        def may_start(k: int) -> bool:
            del k
            if not self.pending or self.remaining() <= 0:
                return False
            if not self.hooks.may_retry():
                self.budget_refused = True
                return False
            return True

        def discard(value: Attempt | GatewayError) -> None:
            if isinstance(value, Attempt):
                value.response.close()
                value.release()
                self.hooks.on_abandon(value.backend)

        try:
            race = await hedge_first_byte(
                start,
                delay_s,
                self.options.max_attempts,
                may_start=may_start,
                discard=discard,
            )
        except (GatewayError, _NoCandidate):
            raise self.final_error() from None
        if isinstance(race.value, GatewayError):
            race.value.should_retry = False  # the client's own mistake, as the upstream says
            raise race.value
        race.value.hedged = tuple(
            SentAttempt(names[i].backend.name, names[i].backend_model, i)
            for i in race.losers
            if i in names
        )
        self.sent.clear()  # the losers are metered through `hedged`
        return race.value

    async def pick(self, *, may_wait: bool) -> tuple[AttemptPlan, _Release] | None:
        """The best-ranked pending plan that the breaker admits and the gate has room for.

        A backend at capacity stays pending (a later pick may find room); one the
        breaker refuses is dropped for this request. Only the first attempt queues,
        for the best-ranked backend, and a full or slow queue raises `GateRejected`.
        """
        while self.pending:
            for i, plan in enumerate(self.pending):
                name = plan.backend.name
                token = self.gate.try_acquire(name) if self.gate is not None else None
                if self.gate is not None and token is None:
                    continue
                del self.pending[i]
                release = _Release(self.gate, token)
                if self.hooks.admit(name):
                    return plan, release
                release()
                break
            else:
                if not may_wait or self.gate is None:
                    return None
                wait = min(self.options.queue_wait_s, max(0.0, self.remaining()))
                plan = self.pending[0]
                token = await self.gate.acquire(plan.backend.name, wait)
                self.pending.pop(0)
                release = _Release(self.gate, token)
                if self.hooks.admit(plan.backend.name):
                    return plan, release
                release()
        return None

    def _unpick(self, plan: AttemptPlan, release: _Release) -> None:
        release()
        self.hooks.on_abandon(plan.backend.name)

    async def open(self, plan: AttemptPlan, release: _Release, number: int) -> Attempt:
        """Run one attempt up to the point where the client may see its first byte."""
        out = SentAttempt(plan.backend.name, plan.backend_model, number)
        self.sent.append(out)
        try:
            attempt = await self._open(plan, release, number)
        except asyncio.CancelledError:
            raise  # stays listed: it had the request when the caller was cancelled
        except BaseException:
            self.sent.remove(out)
            raise
        self.sent.remove(out)
        return attempt

    async def _open(self, plan: AttemptPlan, release: _Release, number: int) -> Attempt:
        name = plan.backend.name
        started = self.loop.time()
        timeouts = _within(plan.timeouts, self.deadline - started)
        self.attempts += 1
        try:
            response = await plan.backend.open(self.path, plan.body, self.headers, timeouts)
            try:
                if self.stream:
                    events = response.events()
                    first_at = started + timeouts.first_byte_s
                    first = _checked_first(await _first_event(events, name, first_at), name)
                    # The adapter bounds the rest of the stream by the attempt's total
                    # and idle limits (the Backend contract): no timer per event here.
                    return Attempt(
                        name,
                        plan.backend_model,
                        number,
                        response,
                        first,
                        events,
                        started,
                        timeouts,
                        _release=release,
                    )
                try:
                    body, answer = await _whole_body(response, name)
                except GatewayError:
                    self.broken.append(SentAttempt(name, plan.backend_model, number))
                    raise
            except BaseException:
                response.close()
                raise
        except GatewayError as exc:
            release()
            self.hooks.on_failure(name, exc, self.loop.time() - started)
            raise
        except BaseException:
            release()
            self.hooks.on_abandon(name)
            raise
        buffered = _Buffered(response, body)
        return Attempt(
            name,
            plan.backend_model,
            number,
            buffered,
            None,
            None,
            started,
            timeouts,
            answer=answer,
            _release=release,
        )

    def final_error(self) -> GatewayError:
        """What the client gets once the gateway's own tries are spent."""
        if self.failures:
            last = self.failures[-1]
        elif self.remaining() <= 0:
            last = UpstreamTimeout("the request's deadline passed before any backend answered")
        else:
            last = NoBackendAvailable(
                "no backend can serve this model right now", retry_after_s=1.0
            )
        if self.budget_refused:
            last.should_retry, last.retry_after_s = False, None
        else:
            advise_client_retry(last)
        return last


def is_transient(exc: GatewayError) -> bool:
    """A failure that the same backend may well not repeat a moment later."""
    if isinstance(exc, UpstreamStatus):
        return exc.upstream_status in _TRANSIENT_STATUSES
    return isinstance(exc, UpstreamUnavailable)


def advise_client_retry(exc: GatewayError) -> None:
    """Set what the client is told once the gateway's own tries are over.

    Waiting helps after a transient failure (5xx, unreachable, timeout, 429, nothing in
    service): `x-should-retry: true` and a `retry-after`. It does not when the backend
    refuses the gateway's own credentials: `false`, and no `retry-after`.
    """
    if isinstance(exc, UpstreamStatus) and exc.upstream_status in _CREDENTIAL_STATUSES:
        exc.should_retry, exc.retry_after_s = False, None
        return
    exc.should_retry = True
    if exc.retry_after_s is None:
        exc.retry_after_s = 1.0


async def _first_event(events: AsyncIterator[bytes], backend: str, until: float) -> bytes:
    try:
        async with asyncio.timeout_at(until):
            return await anext(events)
    except StopAsyncIteration:
        pass
    except TimeoutError as exc:
        raise UpstreamTimeout(f"backend {backend} sent no stream event in time") from exc
    raise UpstreamProtocolError(f"backend {backend} closed the stream before any event")


def _checked_first(event: bytes, backend: str) -> bytes:
    """A first event that is not JSON fails the attempt while the client has seen nothing."""
    data = event.startswith(b"data:") and not event.startswith(DONE)
    if data and not is_json_object(event[5:].lstrip()):
        raise UpstreamProtocolError(
            f"backend {backend} sent a first stream event that is not a JSON object",
            code="upstream_bad_event",
        )
    return event


async def _whole_body(response: UpstreamResponse, backend: str) -> tuple[bytes, dict[str, Any]]:
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


def _within(t: AttemptTimeouts, remaining: float) -> AttemptTimeouts:
    remaining = max(remaining, 0.001)
    return AttemptTimeouts(
        connect_s=min(t.connect_s, remaining),
        first_byte_s=min(t.first_byte_s, remaining),
        idle_s=min(t.idle_s, remaining),
        total_s=min(t.total_s, remaining),
    )


def _backoff(number: int) -> float:
    """Full jitter over a small exponential base: failover should be quick, not synchronized."""
    return random.uniform(0, min(0.25, 0.01 * (2**number)))
