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

What an attempt is: `gateway.flow.attempt`; which failures are retried and what the
client is told: `gateway.flow.retryable`; one attempt read up to its first byte:
`gateway.flow.first_byte`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence

from gateway.errors import GatewayError, NoBackendAvailable, UpstreamTimeout
from gateway.flow.attempt import Attempt, AttemptHooks, AttemptPlan, ForwardOptions, SentAttempt
from gateway.flow.backpressure import Gate, GateToken
from gateway.flow.first_byte import (
    BufferedAnswer,
    checked_first,
    first_event,
    timeouts_within,
    whole_body,
)
from gateway.flow.hedging import hedge_delay, hedge_first_byte
from gateway.flow.retryable import advise_client_retry, is_retryable, is_transient


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


class _NoCandidate(Exception):
    """Inside a hedge race: nothing left to start."""


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
        timeouts = timeouts_within(plan.timeouts, self.deadline - started)
        self.attempts += 1
        try:
            response = await plan.backend.open(self.path, plan.body, self.headers, timeouts)
            try:
                if self.stream:
                    events = response.events()
                    first_at = started + timeouts.first_byte_s
                    first = checked_first(await first_event(events, name, first_at), name)
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
                    body, answer = await whole_body(response, name)
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
        buffered = BufferedAnswer(response, body)
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


def _backoff(number: int) -> float:
    """Full jitter over a small exponential base: failover should be quick, not synchronized."""
    return random.uniform(0, min(0.25, 0.01 * (2**number)))
