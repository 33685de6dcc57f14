"""One request's attempts (`gateway.flow.forward`) over real backends and a real gate.

Each backend is an `OpenAICompatBackend` on the plain-http road against a raw loopback
server that answers with exact bytes (a status, a body, an SSE stream, nothing at all), so
every failure is the real one the adapter raises. The live routing state is replaced by
`Hooks`, a recorder of the `AttemptHooks` protocol (the seam the forwarder reports through),
so the test can say what it was told and in which order, and decide what the breaker and
the retry budget allow. No test depends on timing beyond waits of a second or more for
things that take milliseconds (issue 17's mutation survivors).
"""

from __future__ import annotations

import asyncio
import faulthandler
import random
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest

from adapters.backend import OpenAICompatBackend
from adapters.base import AttemptTimeouts
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    NoBackendAvailable,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.flow.attempt import Attempt, AttemptPlan, ForwardOptions, SentAttempt
from gateway.flow.backpressure import Gate, GateConfig, GateRejected
from gateway.flow.forward import _backoff, first_attempt_that_answers
from gateway.flow.hedging import HedgeConfig
from gateway.flow.retryable import advise_client_retry, is_retryable, is_transient

T = AttemptTimeouts(connect_s=2.0, first_byte_s=5.0, idle_s=5.0, total_s=10.0)
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
ANSWER = b'{"id":"x","choices":[]}'
EVENT = b'data: {"id":"x","choices":[]}'


def reply(status: int, body: bytes = b"", *fields: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close", *fields]
    return "\r\n".join([*head, "", ""]).encode() + body


def sse(*events: bytes) -> bytes:
    head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    return head.encode() + b"".join(e + b"\n\n" for e in events)


HANG = b""  # answer nothing, hold the connection


@dataclass
class Server:
    answer: bytes
    then_hold: bool = False  # keep the connection open after the answer
    go: asyncio.Event | None = None  # answer only once this is set
    port: int = 0
    requests: int = 0
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a request came in


@dataclass
class Hooks:
    """Records what the forwarder reports; `admits` and `retries` decide what it is allowed."""

    refuse: set[str] = field(default_factory=set)
    retries: int = 100
    calls: list[tuple[str, ...]] = field(default_factory=list)
    failures: list[tuple[str, GatewayError, float]] = field(default_factory=list)

    def admit(self, backend: str) -> bool:
        self.calls.append(("admit", backend))
        return backend not in self.refuse

    def on_failure(self, backend: str, exc: GatewayError, elapsed: float) -> None:
        self.calls.append(("on_failure", backend))
        self.failures.append((backend, exc, elapsed))

    def on_abandon(self, backend: str) -> None:
        self.calls.append(("on_abandon", backend))

    def may_retry(self) -> bool:
        self.calls.append(("may_retry",))
        self.retries -= 1
        return self.retries >= 0

    def on_retry(self, backend: str) -> None:
        self.calls.append(("on_retry", backend))


class Upstreams:
    """Backends by name, each a raw loopback server answering the same bytes to every request."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.servers: dict[str, Server] = {}
        self._listening: list[asyncio.Server] = []
        self._backends: list[OpenAICompatBackend] = []

    async def plan(
        self,
        name: str,
        answer: bytes,
        *,
        refused: bool = False,
        then_hold: bool = False,
        go: asyncio.Event | None = None,
    ) -> AttemptPlan:
        script = Server(answer, then_hold, go)
        self.servers[name] = script
        if refused:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            script.port = s.getsockname()[1]
            s.close()  # nothing listens there now
        else:
            await self._listen(script)
        backend = OpenAICompatBackend(
            name=name,
            base_url=f"http://127.0.0.1:{script.port}/v1",
            api_key=None,
            session=self.session,
            is_local=False,
            road="pooled",
        )
        self._backends.append(backend)
        return AttemptPlan(backend, f"{name}-model", BODY, T)

    def requests(self, name: str) -> int:
        return self.servers[name].requests

    async def _listen(self, script: Server) -> None:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                script.requests += 1
                script.arrived.set()
                if script.go is not None:
                    await script.go.wait()
                if script.answer:
                    writer.write(script.answer)
                    await writer.drain()
                if not script.answer or script.then_hold:
                    await script.hold.wait()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        self._listening.append(server)
        script.port = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for script in self.servers.values():
            script.hold.set()
        for b in self._backends:
            b.close()
        for server in self._listening:
            server.close()
            await server.wait_closed()


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """A forwarder that loops or waits forever: end the process after 20 s of one test,
    with every thread's stack (each test here takes at most a second or two)."""
    faulthandler.dump_traceback_later(20, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
async def ups() -> AsyncIterator[Upstreams]:
    async with aiohttp.ClientSession() as session:
        upstreams = Upstreams(session)
        yield upstreams
        await upstreams.close()


def deadline(seconds: float = 10.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def forward(
    plans: list[AttemptPlan],
    hooks: Hooks,
    *,
    stream: bool = False,
    within: float = 10.0,
    gate: Gate | None = None,
    options: ForwardOptions | None = None,
    sent: list[SentAttempt] | None = None,
    broken: list[SentAttempt] | None = None,
) -> Attempt:
    return await first_attempt_that_answers(
        plans,
        path="/chat/completions",
        headers={},
        stream=stream,
        deadline=deadline(within),
        hooks=hooks,
        gate=gate,
        options=options,
        sent=sent,
        broken=broken,
    )


# --- whole answers, one after another -----------------------------------------------------------


async def test_the_first_backend_that_answers_is_used_and_holds_a_gate_slot(ups: Upstreams) -> None:
    hooks = Hooks()
    gate = Gate(GateConfig(max_per_backend=1))
    a = await ups.plan("a", reply(200, ANSWER))
    b = await ups.plan("b", reply(200, ANSWER))
    sent: list[SentAttempt] = []
    before = asyncio.get_running_loop().time()
    attempt = await forward([a, b], hooks, within=3.0, gate=gate, sent=sent)
    assert before <= attempt.started <= asyncio.get_running_loop().time()
    assert (attempt.backend, attempt.backend_model, attempt.number) == ("a", "a-model", 0)
    assert attempt.answer == {"id": "x", "choices": []}
    assert (attempt.first_event, attempt.events, attempt.hedged) == (None, None, ())
    assert attempt.response.status == 200 and await attempt.response.read() == ANSWER
    with pytest.raises(TypeError, match=r"^a buffered answer has no events$"):
        attempt.response.events()
    # The attempt's limits are cut to what is left of the request's 3 s.
    assert attempt.timeouts is not None
    assert attempt.timeouts.connect_s == 2.0 and 1.0 < attempt.timeouts.total_s <= 3.0
    assert 1.0 < attempt.timeouts.first_byte_s <= 3.0 and 1.0 < attempt.timeouts.idle_s <= 3.0
    assert hooks.calls == [("admit", "a")] and sent == []
    assert (ups.requests("a"), ups.requests("b")) == (1, 0)
    assert gate.try_acquire("a") is None  # the attempt holds a's one slot
    attempt.release()
    attempt.release()  # a second release gives back nothing more
    token = gate.try_acquire("a")
    assert token is not None and gate.try_acquire("a") is None
    gate.release(token)
    attempt.response.close()


async def test_a_5xx_fails_over_to_the_next_backend(ups: Upstreams) -> None:
    hooks = Hooks()
    gate = Gate(GateConfig(max_per_backend=1))
    a = await ups.plan("a", reply(500, b'{"error":{"message":"boom"}}'))
    b = await ups.plan("b", reply(200, ANSWER))
    attempt = await forward([a, b], hooks, gate=gate)
    assert (attempt.backend, attempt.number) == ("b", 1)
    assert hooks.calls == [
        ("admit", "a"),
        ("on_failure", "a"),
        ("admit", "b"),
        ("may_retry",),
        ("on_retry", "b"),
    ]
    _, exc, elapsed = hooks.failures[0]
    assert isinstance(exc, UpstreamStatus) and exc.upstream_status == 500
    assert 0 <= elapsed < 5
    token = gate.try_acquire("a")  # the failed attempt gave its slot back
    assert token is not None
    gate.release(token)
    attempt.release()
    attempt.response.close()


async def test_a_client_mistake_is_raised_at_once_and_not_retried(ups: Upstreams) -> None:
    hooks = Hooks()
    a = await ups.plan("a", reply(400, b'{"error":{"message":"bad"}}'))
    b = await ups.plan("b", reply(200, ANSWER))
    with pytest.raises(UpstreamStatus) as info:
        await forward([a, b], hooks)
    assert info.value.upstream_status == 400 and info.value.should_retry is False
    assert (ups.requests("a"), ups.requests("b")) == (1, 0)
    assert hooks.calls == [("admit", "a"), ("on_failure", "a")]


async def test_credentials_refused_fail_over_but_the_client_is_told_not_to_retry(
    ups: Upstreams,
) -> None:
    hooks = Hooks()
    a = await ups.plan("a", reply(401, b"", "Retry-After: 9"))
    b = await ups.plan("b", reply(403))
    with pytest.raises(UpstreamStatus) as info:
        await forward([a, b], hooks)
    assert info.value.upstream_status == 403
    assert (info.value.should_retry, info.value.retry_after_s) == (False, None)
    assert (ups.requests("a"), ups.requests("b")) == (1, 1)


async def test_when_every_backend_fails_the_last_failure_says_retry_after_a_second(
    ups: Upstreams,
) -> None:
    hooks = Hooks()
    a = await ups.plan("a", reply(503, b"", "Retry-After: 7"))
    b = await ups.plan("b", reply(502))
    with pytest.raises(UpstreamStatus) as info:
        await forward([a, b], hooks)
    assert info.value.upstream_status == 502
    assert (info.value.should_retry, info.value.retry_after_s) == (True, 1.0)
    # Two candidates: no second try on either, though a third attempt was allowed.
    assert (ups.requests("a"), ups.requests("b")) == (1, 1)
    c = await ups.plan("c", reply(502))
    d = await ups.plan("d", reply(503, b"", "Retry-After: 7"))
    with pytest.raises(UpstreamStatus) as info:
        await forward([c, d], Hooks())
    assert (info.value.should_retry, info.value.retry_after_s) == (True, 7.0)


async def test_at_most_max_attempts_backends_are_tried(ups: Upstreams) -> None:
    plans = [await ups.plan(n, reply(500)) for n in "abcd"]
    with pytest.raises(UpstreamStatus):
        await forward(plans, Hooks())
    assert [ups.requests(n) for n in "abcd"] == [1, 1, 1, 0]  # 3 by default
    more = [await ups.plan(n, reply(500)) for n in "efgh"]
    with pytest.raises(UpstreamStatus):
        await forward(more, Hooks(), options=ForwardOptions(max_attempts=4))
    assert [ups.requests(n) for n in "efgh"] == [1, 1, 1, 1]


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_a_lone_backend_is_tried_once_more_after_a_transient_status(
    ups: Upstreams, status: int
) -> None:
    hooks = Hooks()
    a = await ups.plan("a", reply(status))
    with pytest.raises(UpstreamStatus):
        await forward([a], hooks)
    assert ups.requests("a") == 2
    assert hooks.calls == [
        ("admit", "a"),
        ("on_failure", "a"),
        ("admit", "a"),
        ("may_retry",),
        ("on_retry", "a"),
        ("on_failure", "a"),
    ]


async def test_a_lone_unreachable_backend_is_tried_once_more(ups: Upstreams) -> None:
    hooks = Hooks()
    a = await ups.plan("a", b"", refused=True)
    with pytest.raises(UpstreamUnavailable) as info:
        await forward([a], hooks)
    assert info.value.should_retry is True
    assert hooks.calls == [
        ("admit", "a"),
        ("on_failure", "a"),
        ("admit", "a"),
        ("may_retry",),
        ("on_retry", "a"),
        ("on_failure", "a"),
    ]


@pytest.mark.parametrize("status", [429, 501, 505, 401])
async def test_a_lone_backend_is_not_tried_again_after_other_failures(
    ups: Upstreams, status: int
) -> None:
    hooks = Hooks()
    a = await ups.plan("a", reply(status))
    with pytest.raises(UpstreamStatus):
        await forward([a], hooks)
    assert ups.requests("a") == 1
    assert hooks.calls == [("admit", "a"), ("on_failure", "a")]


async def test_a_lone_backend_that_answered_a_broken_body_is_not_tried_again(
    ups: Upstreams,
) -> None:
    a = await ups.plan("a", reply(200, b"not json"))
    broken: list[SentAttempt] = []
    with pytest.raises(UpstreamProtocolError):
        await forward([a], Hooks(), broken=broken)
    assert ups.requests("a") == 1


async def test_the_retry_budget_refusing_ends_the_request_and_frees_the_pick(
    ups: Upstreams,
) -> None:
    hooks = Hooks(retries=0)
    gate = Gate(GateConfig(max_per_backend=1))
    a = await ups.plan("a", reply(503, b"", "Retry-After: 5"))
    b = await ups.plan("b", reply(200, ANSWER))
    with pytest.raises(UpstreamStatus) as info:
        await forward([a, b], hooks, gate=gate)
    assert info.value.upstream_status == 503
    assert (info.value.should_retry, info.value.retry_after_s) == (False, None)
    assert ups.requests("b") == 0
    assert hooks.calls == [
        ("admit", "a"),
        ("on_failure", "a"),
        ("admit", "b"),
        ("may_retry",),
        ("on_abandon", "b"),
    ]
    token = gate.try_acquire("b")
    assert token is not None  # b's slot went back
    gate.release(token)


async def test_a_body_that_is_not_a_json_object_fails_over_and_is_metered(ups: Upstreams) -> None:
    a = await ups.plan("a", reply(200, b"[1, 2]"))
    b = await ups.plan("b", reply(200, b"<html>"))
    c = await ups.plan("c", reply(200, ANSWER))
    hooks = Hooks()
    broken: list[SentAttempt] = []
    attempt = await forward([a, b, c], hooks, broken=broken)
    assert attempt.backend == "c"
    assert broken == [SentAttempt("a", "a-model", 0), SentAttempt("b", "b-model", 1)]
    messages = [exc.message for _, exc, _ in hooks.failures]
    assert messages == [
        "backend a sent a body that is not a JSON object",
        "backend b sent a body that is not a JSON object",
    ]
    attempt.release()
    attempt.response.close()


async def test_a_broken_body_fails_over_also_when_nobody_meters_it(ups: Upstreams) -> None:
    a = await ups.plan("a", reply(200, b"not json"))
    b = await ups.plan("b", reply(200, ANSWER))
    attempt = await forward([a, b], Hooks())  # no `broken` list given
    assert attempt.backend == "b"
    attempt.release()
    attempt.response.close()


async def test_an_error_status_is_not_metered_as_broken(ups: Upstreams) -> None:
    a = await ups.plan("a", reply(500))
    b = await ups.plan("b", reply(200, ANSWER))
    broken: list[SentAttempt] = []
    attempt = await forward([a, b], Hooks(), broken=broken)
    assert broken == []
    attempt.release()
    attempt.response.close()


# --- no backend, no time ---------------------------------------------------------------------


async def test_no_backend_admitted_is_503_with_retry_after_a_second(ups: Upstreams) -> None:
    gate = Gate(GateConfig(max_per_backend=1))
    a = await ups.plan("a", reply(200, ANSWER))
    b = await ups.plan("b", reply(200, ANSWER))
    hooks = Hooks(refuse={"a", "b"})
    with pytest.raises(NoBackendAvailable) as info:
        await forward([a, b], hooks, gate=gate)
    assert info.value.message == "no backend can serve this model right now"
    assert (info.value.should_retry, info.value.retry_after_s) == (True, 1.0)
    assert hooks.calls == [("admit", "a"), ("admit", "b")]
    for name in ("a", "b"):  # the breaker's refusal gave the slot back
        token = gate.try_acquire(name)
        assert token is not None
        gate.release(token)
    assert (ups.requests("a"), ups.requests("b")) == (0, 0)


async def test_nothing_admitted_with_time_left_is_no_backend_not_a_timeout(
    ups: Upstreams,
) -> None:
    a = await ups.plan("a", reply(200, ANSWER))
    with pytest.raises(NoBackendAvailable):
        await forward([a], Hooks(refuse={"a"}), within=0.5)


async def test_a_refused_backend_is_skipped_for_the_next(ups: Upstreams) -> None:
    a = await ups.plan("a", reply(200, ANSWER))
    b = await ups.plan("b", reply(200, ANSWER))
    hooks = Hooks(refuse={"a"})
    attempt = await forward([a, b], hooks)
    assert (attempt.backend, attempt.number) == ("b", 0)  # no attempt was made on a
    assert hooks.calls == [("admit", "a"), ("admit", "b")]
    attempt.release()
    attempt.response.close()


async def test_a_deadline_already_passed_tries_nothing(ups: Upstreams) -> None:
    a = await ups.plan("a", reply(200, ANSWER))
    hooks = Hooks()
    with pytest.raises(UpstreamTimeout) as info:
        await forward([a], hooks, within=-1.0)
    assert info.value.message == "the request's deadline passed before any backend answered"
    assert (info.value.should_retry, info.value.retry_after_s) == (True, 1.0)
    assert hooks.calls == [("admit", "a"), ("on_abandon", "a")]
    assert ups.requests("a") == 0


async def test_limits_are_cut_below_a_second_when_less_is_left(ups: Upstreams) -> None:
    a = await ups.plan("a", reply(200, ANSWER))
    attempt = await forward([a], Hooks(), within=0.5)
    assert attempt.timeouts is not None
    assert 0 < attempt.timeouts.total_s <= 0.5 and 0 < attempt.timeouts.connect_s <= 0.5
    attempt.release()
    attempt.response.close()


async def test_failover_goes_on_with_less_than_a_second_left(ups: Upstreams) -> None:
    a = await ups.plan("a", reply(500))
    b = await ups.plan("b", reply(200, ANSWER))
    attempt = await forward([a, b], Hooks(), within=0.8)
    assert attempt.backend == "b"
    attempt.release()
    attempt.response.close()


async def test_a_deadline_that_passes_after_a_failure_ends_the_failover(ups: Upstreams) -> None:
    a = await ups.plan("a", HANG)
    b = await ups.plan("b", reply(200, ANSWER))
    hooks = Hooks()
    with pytest.raises(UpstreamTimeout) as info:
        await forward([a, b], hooks, within=0.3)
    assert info.value.message == "backend a timed out (waiting for first byte)"
    assert ups.requests("b") == 0
    assert hooks.calls == [("admit", "a"), ("on_failure", "a")]


class LoopClock:
    """The running loop's clock held still, moved only by the test (the forwarder's deadline
    and `remaining()` are in loop time): "exactly 0 s left" is then a state a test can make.
    Sockets still work; a timer fires only once the test moves the clock past it."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.now = self.loop.time()

    def __enter__(self) -> LoopClock:
        self.loop.time = lambda: self.now  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.loop.time


@dataclass
class SpendAllOnFailure(Hooks):
    """A failure that, on the clock, takes the request's time up to `left` seconds before its
    deadline (`deadline` is set once the request started)."""

    clock: LoopClock | None = None
    deadline: float = 0.0
    left: float = 0.0
    failed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_failure(self, backend: str, exc: GatewayError, elapsed: float) -> None:
        super().on_failure(backend, exc, elapsed)
        assert self.clock is not None
        self.clock.now = self.deadline - self.left
        self.failed.set()


async def test_a_deadline_reached_exactly_tries_nothing(ups: Upstreams) -> None:
    # 0.0 s left is no time left: the pick is given back, nothing is sent, and the client is
    # told the deadline passed (not that no backend was there).
    a = await ups.plan("a", reply(200, ANSWER))
    hooks = Hooks()
    with LoopClock(), pytest.raises(UpstreamTimeout) as info:
        await forward([a], hooks, within=0.0)
    assert info.value.message == "the request's deadline passed before any backend answered"
    assert hooks.calls == [("admit", "a"), ("on_abandon", "a")]
    assert ups.requests("a") == 0


@pytest.mark.parametrize("stream", [False, True], ids=["failover", "hedge"])
async def test_a_failure_that_ends_exactly_at_the_deadline_ends_the_request(
    ups: Upstreams, stream: bool
) -> None:
    # a fails just as the deadline is reached (0.0 s left): b is not picked, not asked of the
    # retry budget, not sent anything, neither as a failover nor as a hedge.
    a = await ups.plan("a", reply(500))
    b = await ups.plan("b", sse(EVENT) if stream else reply(200, ANSWER))
    with LoopClock() as clock:
        hooks = SpendAllOnFailure(clock=clock, deadline=clock.now + 10.0)
        with pytest.raises(UpstreamStatus) as info:
            await forward([a, b], hooks, stream=stream, options=HEDGE, within=10.0)
    assert info.value.upstream_status == 500
    assert hooks.calls == [("admit", "a"), ("on_failure", "a")]
    assert ups.requests("b") == 0


async def test_the_backoff_sleeps_no_longer_than_the_time_left(ups: Upstreams) -> None:
    # a fails with a microsecond left, less than any backoff (up to 0.02 s after a first
    # failure): the forwarder sleeps only that microsecond, then finds no time left.
    a = await ups.plan("a", reply(500))
    b = await ups.plan("b", reply(200, ANSWER))
    with LoopClock() as clock:
        end = clock.now + 10.0
        hooks = SpendAllOnFailure(clock=clock, deadline=end, left=1e-6)
        task = asyncio.ensure_future(forward([a, b], hooks, within=10.0))
        await hooks.failed.wait()  # the forwarder went straight on to its backoff sleep
        clock.now = end
        for _ in range(100):  # a timer due now fires in the loop's next turn or two
            if task.done():
                break
            await asyncio.sleep(0)
        done = task.done()
        task.cancel()
        with pytest.raises((UpstreamStatus, asyncio.CancelledError)):
            await task
    assert done, "the backoff slept past the request's deadline"
    assert hooks.calls == [
        ("admit", "a"),
        ("on_failure", "a"),
        ("admit", "b"),
        ("may_retry",),
        ("on_abandon", "b"),
    ]
    assert ups.requests("b") == 0


# --- the gate -------------------------------------------------------------------------------


async def test_a_full_backend_is_passed_over_without_waiting(ups: Upstreams) -> None:
    gate = Gate(GateConfig(max_per_backend=1))
    a = await ups.plan("a", reply(200, ANSWER))
    b = await ups.plan("b", reply(200, ANSWER))
    held = gate.try_acquire("a")
    assert held is not None
    hooks = Hooks()
    attempt = await forward([a, b], hooks, gate=gate)
    assert (attempt.backend, attempt.number) == ("b", 0)
    assert hooks.calls == [("admit", "b")]
    attempt.release()
    attempt.response.close()
    gate.release(held)


async def test_only_the_first_attempt_queues_for_a_slot(ups: Upstreams) -> None:
    gate = Gate(GateConfig(max_per_backend=1, max_queue=4))
    a = await ups.plan("a", reply(200, ANSWER))
    b = await ups.plan("b", reply(200, ANSWER))
    held = [gate.try_acquire("a"), gate.try_acquire("b")]
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, gate.release, held[0])  # a's slot frees while the request waits
    hooks = Hooks()
    attempt = await forward([a, b], hooks, gate=gate, options=ForwardOptions(queue_wait_s=5.0))
    assert attempt.backend == "a"
    attempt.release()
    attempt.response.close()
    # Both full and no wait allowed: the queue refuses at once.
    again = [gate.try_acquire("a")]
    with pytest.raises(GateRejected):
        await forward([a, b], Hooks(), gate=gate)
    # Full after a failure: the retry does not queue, the request ends.
    c = await ups.plan("c", reply(500))
    held.append(gate.try_acquire("a"))
    with pytest.raises(UpstreamStatus):
        await forward([c, b], Hooks(), gate=gate, options=ForwardOptions(queue_wait_s=5.0))
    for t in [*held[1:], *again]:
        if t is not None:
            gate.release(t)


async def test_the_queue_wait_is_cut_to_the_deadline(ups: Upstreams) -> None:
    # 0.3 s left and a 5 s queue wait: the wait ends at the deadline, before the slot
    # frees at 0.5 s.
    gate = Gate(GateConfig(max_per_backend=1, max_queue=4))
    a = await ups.plan("a", reply(200, ANSWER))
    held = gate.try_acquire("a")
    assert held is not None
    asyncio.get_running_loop().call_later(0.5, gate.release, held)
    with pytest.raises(GateRejected):
        await forward([a], Hooks(), gate=gate, within=0.3, options=ForwardOptions(queue_wait_s=5.0))
    assert ups.requests("a") == 0


async def test_a_queued_slot_the_breaker_refuses_is_given_back(ups: Upstreams) -> None:
    gate = Gate(GateConfig(max_per_backend=1, max_queue=4))
    a = await ups.plan("a", reply(200, ANSWER))
    held = gate.try_acquire("a")
    assert held is not None
    asyncio.get_running_loop().call_later(0.05, gate.release, held)
    hooks = Hooks(refuse={"a"})
    with pytest.raises(NoBackendAvailable):
        await forward([a], hooks, gate=gate, options=ForwardOptions(queue_wait_s=5.0))
    token = gate.try_acquire("a")
    assert token is not None
    gate.release(token)


# --- streams ----------------------------------------------------------------------------------


async def test_a_stream_commits_on_its_first_event(ups: Upstreams) -> None:
    gate = Gate(GateConfig(max_per_backend=1))
    a = await ups.plan("a", sse(EVENT, b"data: [DONE]"))
    before = asyncio.get_running_loop().time()
    attempt = await forward([a], Hooks(), stream=True, within=3.0, gate=gate)
    assert gate.try_acquire("a") is None  # the stream holds a's one slot
    attempt.release()
    token = gate.try_acquire("a")
    assert token is not None
    gate.release(token)
    assert (attempt.backend, attempt.backend_model, attempt.number) == ("a", "a-model", 0)
    assert before <= attempt.started <= asyncio.get_running_loop().time()
    assert attempt.timeouts is not None and 1.0 < attempt.timeouts.total_s <= 3.0
    assert attempt.first_event == EVENT and attempt.answer is None
    assert attempt.events is not None
    assert [e async for e in attempt.events] == [b"data: [DONE]"]
    attempt.release()
    attempt.response.close()


@pytest.mark.parametrize(
    "first",
    [b"data: [DONE]", b": keep-alive", b'data:{"id":1}', b'event: x\ndata: {"a":1}'],
)
async def test_first_events_that_pass(ups: Upstreams, first: bytes) -> None:
    a = await ups.plan("a", sse(first))
    attempt = await forward([a], Hooks(), stream=True)
    assert attempt.first_event == first
    attempt.release()
    attempt.response.close()


async def test_a_first_event_that_is_not_json_fails_over(ups: Upstreams) -> None:
    a = await ups.plan("a", sse(b"data: hello"))
    b = await ups.plan("b", sse(EVENT))
    hooks = Hooks()
    attempt = await forward([a, b], hooks, stream=True)
    assert attempt.backend == "b"
    exc = hooks.failures[0][1]
    assert isinstance(exc, UpstreamProtocolError) and exc.code == "upstream_bad_event"
    assert exc.message == "backend a sent a first stream event that is not a JSON object"
    attempt.release()
    attempt.response.close()


async def test_a_stream_closed_before_any_event_fails_over(ups: Upstreams) -> None:
    a = await ups.plan("a", sse())
    b = await ups.plan("b", sse(EVENT))
    hooks = Hooks()
    attempt = await forward([a, b], hooks, stream=True)
    assert attempt.backend == "b"
    assert hooks.failures[0][1].message == "backend a closed the stream before any event"
    attempt.release()
    attempt.response.close()


async def test_a_stream_with_no_event_in_time_fails_over(ups: Upstreams) -> None:
    stalled = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n: opening\n"
    a = await ups.plan("a", stalled.encode(), then_hold=True)  # a comment, then no event
    b = await ups.plan("b", sse(EVENT))
    a = AttemptPlan(a.backend, a.backend_model, BODY, AttemptTimeouts(2.0, 0.3, 5.0, 10.0))
    hooks = Hooks()
    attempt = await forward([a, b], hooks, stream=True)
    assert attempt.backend == "b"
    exc = hooks.failures[0][1]
    assert isinstance(exc, UpstreamTimeout)
    assert exc.message == "backend a sent no stream event in time"
    attempt.release()
    attempt.response.close()


# --- a client that leaves ------------------------------------------------------------------------


async def test_a_client_that_leaves_mid_attempt_leaves_it_listed_and_abandoned(
    ups: Upstreams,
) -> None:
    gate = Gate(GateConfig(max_per_backend=1))
    a = await ups.plan("a", HANG)
    hooks = Hooks()
    sent: list[SentAttempt] = []
    task = asyncio.create_task(forward([a], hooks, gate=gate, sent=sent))
    async with asyncio.timeout(5):
        while not ups.requests("a"):
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sent == [SentAttempt("a", "a-model", 0)]  # the prompt went out: metered
    assert hooks.calls == [("admit", "a"), ("on_abandon", "a")]
    token = gate.try_acquire("a")
    assert token is not None
    gate.release(token)


# --- hedging ----------------------------------------------------------------------------------

HEDGE = ForwardOptions(hedge=HedgeConfig(enabled=True, delay_s=0.05))


async def test_a_slow_first_byte_is_hedged_and_the_loser_named(ups: Upstreams) -> None:
    gate = Gate(GateConfig(max_per_backend=1))
    a = await ups.plan("a", HANG)
    b = await ups.plan("b", sse(EVENT))
    hooks = Hooks()
    sent: list[SentAttempt] = []
    attempt = await forward([a, b], hooks, stream=True, gate=gate, options=HEDGE, sent=sent)
    assert (attempt.backend, attempt.number) == ("b", 1)
    assert attempt.hedged == (SentAttempt("a", "a-model", 0),)
    assert sent == []  # the loser is metered through `hedged`
    assert ("on_retry", "b") in hooks.calls and ("on_abandon", "a") in hooks.calls
    token = gate.try_acquire("a")
    assert token is not None  # the loser's slot went back
    gate.release(token)
    attempt.release()
    attempt.response.close()


def slow_first_byte(plan: AttemptPlan, seconds: float) -> AttemptPlan:
    t = AttemptTimeouts(connect_s=2.0, first_byte_s=seconds, idle_s=5.0, total_s=10.0)
    return AttemptPlan(plan.backend, plan.backend_model, plan.body, t)


async def test_the_hedge_calls_the_second_attempt_a_retry_not_the_first(ups: Upstreams) -> None:
    a = await ups.plan("a", HANG)
    b = await ups.plan("b", sse(EVENT))
    hooks = Hooks()
    attempt = await forward([a, b], hooks, stream=True, options=HEDGE)
    assert [c for c in hooks.calls if c[0] in ("on_retry", "may_retry", "admit")] == [
        ("admit", "a"),
        ("may_retry",),
        ("admit", "b"),
        ("on_retry", "b"),
    ]
    attempt.release()
    attempt.response.close()


async def test_a_third_hedge_starts_after_two_delays(ups: Upstreams) -> None:
    a = slow_first_byte(await ups.plan("a", HANG), 3.0)
    b = slow_first_byte(await ups.plan("b", HANG), 3.0)
    c = await ups.plan("c", sse(EVENT))
    attempt = await forward([a, b, c], Hooks(), stream=True, options=HEDGE)
    assert (attempt.backend, attempt.number) == ("c", 2)
    assert attempt.hedged == (SentAttempt("a", "a-model", 0), SentAttempt("b", "b-model", 1))
    attempt.release()
    attempt.response.close()


async def test_a_hedge_is_started_while_the_delay_fits_in_the_deadline(ups: Upstreams) -> None:
    # 0.8 s left: the hedge after 0.05 s still fits; a never answers.
    a = await ups.plan("a", HANG)
    b = await ups.plan("b", sse(EVENT))
    attempt = await forward([a, b], Hooks(), stream=True, options=HEDGE, within=0.8)
    assert attempt.backend == "b"
    attempt.release()
    attempt.response.close()


async def test_the_hedge_is_due_after_its_delay_not_a_later_one(ups: Upstreams) -> None:
    # The whole request has 2 s: a hedge started only after seconds would come too late.
    a = await ups.plan("a", HANG)
    b = await ups.plan("b", sse(EVENT))
    attempt = await forward([a, b], Hooks(), stream=True, options=HEDGE, within=2.0)
    assert attempt.backend == "b"
    attempt.release()
    attempt.response.close()


async def test_with_no_candidate_left_the_hedge_does_not_ask_the_budget(ups: Upstreams) -> None:
    a = slow_first_byte(await ups.plan("a", HANG), 0.5)
    b = slow_first_byte(await ups.plan("b", HANG), 0.5)
    hooks = Hooks()
    with pytest.raises(UpstreamTimeout):
        await forward([a, b], hooks, stream=True, options=HEDGE)
    assert hooks.calls.count(("may_retry",)) == 1  # for b; no third candidate to ask for


async def test_the_first_attempt_of_a_hedge_race_may_queue_for_a_slot(ups: Upstreams) -> None:
    gate = Gate(GateConfig(max_per_backend=1, max_queue=4))
    a = await ups.plan("a", sse(EVENT))
    b = await ups.plan("b", sse(EVENT))
    held = [gate.try_acquire("a"), gate.try_acquire("b")]
    asyncio.get_running_loop().call_later(0.05, gate.release, held[0])
    options = ForwardOptions(queue_wait_s=5.0, hedge=HedgeConfig(enabled=True, delay_s=0.05))
    attempt = await forward([a, b], Hooks(), stream=True, gate=gate, options=options)
    assert attempt.backend == "a"
    attempt.release()
    attempt.response.close()
    assert held[1] is not None
    gate.release(held[1])


async def test_a_hedge_does_not_queue_for_a_slot(ups: Upstreams) -> None:
    gate = Gate(GateConfig(max_per_backend=1, max_queue=4))
    a = slow_first_byte(await ups.plan("a", HANG), 1.0)
    b = await ups.plan("b", sse(EVENT))
    held = gate.try_acquire("b")
    assert held is not None
    asyncio.get_running_loop().call_later(0.1, gate.release, held)  # b frees after the hedge
    options = ForwardOptions(queue_wait_s=5.0, hedge=HedgeConfig(enabled=True, delay_s=0.05))
    with pytest.raises(UpstreamTimeout):
        await forward([a, b], Hooks(), stream=True, gate=gate, options=options)
    assert ups.requests("b") == 0


def with_ttft(plan: AttemptPlan, mean: float, spread: float) -> AttemptPlan:
    return AttemptPlan(
        plan.backend,
        plan.backend_model,
        plan.body,
        plan.timeouts,
        ttft_s=mean,
        ttft_spread_s=spread,
    )


async def test_a_whole_answer_is_never_hedged(ups: Upstreams) -> None:
    a = slow_first_byte(await ups.plan("a", HANG), 0.5)
    b = await ups.plan("b", reply(200, ANSWER))
    hooks = Hooks()
    attempt = await forward([a, b], hooks, options=HEDGE)
    assert (attempt.backend, attempt.hedged) == ("b", ())
    assert hooks.calls[:3] == [("admit", "a"), ("on_failure", "a"), ("admit", "b")]
    attempt.release()
    attempt.response.close()


LATE_HEDGE = ForwardOptions(hedge=HedgeConfig(enabled=True, min_delay_s=0.01, max_delay_s=5.0))


async def test_the_hedge_delay_follows_the_first_plans_ttft(ups: Upstreams) -> None:
    # 0.05 s + 2 sigmas x 0.01 s = 0.07 s, long before a gives up (1 s).
    a = with_ttft(slow_first_byte(await ups.plan("a", HANG), 1.0), 0.05, 0.01)
    b = await ups.plan("b", sse(EVENT))
    attempt = await forward([a, b], Hooks(), stream=True, options=LATE_HEDGE)
    assert attempt.hedged == (SentAttempt("a", "a-model", 0),)
    attempt.release()
    attempt.response.close()


async def test_a_wide_ttft_spread_puts_the_hedge_off(ups: Upstreams) -> None:
    # 0.05 s + 2 x 2 s = 4.05 s: a gives up first (0.5 s), and b is a failover, not a hedge.
    a = with_ttft(slow_first_byte(await ups.plan("a", HANG), 0.5), 0.05, 2.0)
    b = await ups.plan("b", sse(EVENT))
    hooks = Hooks()
    attempt = await forward([a, b], hooks, stream=True, options=LATE_HEDGE)
    assert (attempt.backend, attempt.hedged) == ("b", ())
    assert ("on_failure", "a") in hooks.calls
    attempt.release()
    attempt.response.close()


async def test_a_hedge_race_ends_on_a_client_mistake(ups: Upstreams) -> None:
    a = await ups.plan("a", reply(404, b'{"error":{"message":"no"}}'))
    b = await ups.plan("b", sse(EVENT))
    with pytest.raises(UpstreamStatus) as info:
        await forward([a, b], Hooks(), stream=True, options=HEDGE)
    assert info.value.upstream_status == 404 and info.value.should_retry is False
    assert ups.requests("b") == 0


async def test_a_hedge_race_where_all_fail_gives_the_last_failure(ups: Upstreams) -> None:
    a = await ups.plan("a", reply(500))
    b = await ups.plan("b", reply(503))
    with pytest.raises(UpstreamStatus) as info:
        await forward([a, b], Hooks(), stream=True, options=HEDGE)
    assert info.value.upstream_status == 503
    assert (info.value.should_retry, info.value.retry_after_s) == (True, 1.0)


async def test_a_hedge_the_budget_refuses_is_not_started(ups: Upstreams) -> None:
    a = await ups.plan("a", reply(500))
    b = await ups.plan("b", sse(EVENT))
    with pytest.raises(UpstreamStatus) as info:
        await forward([a, b], Hooks(retries=0), stream=True, options=HEDGE)
    assert (info.value.should_retry, info.value.retry_after_s) == (False, None)
    assert ups.requests("b") == 0


async def test_a_hedge_that_answers_with_the_winner_is_closed_and_given_back(
    ups: Upstreams,
) -> None:
    # Both attempts answer in the same turn of the loop (their servers write at once):
    # a wins by rank; b, which answered too, is closed, its slot given back, reported
    # abandoned and named as the operator's cost.
    go = asyncio.Event()
    gate = Gate(GateConfig(max_per_backend=1))
    a = await ups.plan("a", sse(EVENT), go=go)
    b = await ups.plan("b", sse(EVENT), go=go)
    hooks = Hooks()
    task = asyncio.ensure_future(forward([a, b], hooks, stream=True, gate=gate, options=HEDGE))
    await ups.servers["a"].arrived.wait()
    await ups.servers["b"].arrived.wait()  # the hedge after 0.05 s
    go.set()
    attempt = await task
    assert (attempt.backend, attempt.number) == ("a", 0)
    assert attempt.hedged == (SentAttempt("b", "b-model", 1),)
    assert hooks.calls[-1] == ("on_abandon", "b")
    token = gate.try_acquire("b")
    assert token is not None  # the loser's slot went back
    gate.release(token)
    attempt.release()
    attempt.response.close()


async def test_a_hedge_with_nothing_admitted_is_503(ups: Upstreams) -> None:
    a = await ups.plan("a", sse(EVENT))
    b = await ups.plan("b", sse(EVENT))
    with pytest.raises(NoBackendAvailable):
        await forward([a, b], Hooks(refuse={"a", "b"}), stream=True, options=HEDGE)


# --- the plain parts -----------------------------------------------------------------------------


def test_which_failures_another_backend_may_not_repeat() -> None:
    def status(n: int) -> UpstreamStatus:
        return UpstreamStatus("s", upstream_status=n)

    assert [
        n for n in (400, 401, 403, 404, 408, 409, 429, 500, 599) if is_retryable(status(n))
    ] == [
        401,
        403,
        408,
        429,
        500,
        599,
    ]
    assert is_retryable(UpstreamTimeout("t")) and is_retryable(UpstreamError("e"))
    assert not is_retryable(InvalidRequest("bad"))
    assert [n for n in (429, 500, 501, 502, 503, 504, 505) if is_transient(status(n))] == [
        500,
        502,
        503,
        504,
    ]
    assert is_transient(UpstreamUnavailable("u"))
    assert not is_transient(UpstreamTimeout("t")) and not is_transient(UpstreamError("e"))


def test_what_the_client_is_advised_once_tries_are_spent() -> None:
    for n in (401, 403):
        refused = UpstreamStatus("s", upstream_status=n, retry_after_s=3.0)
        advise_client_retry(refused)
        assert (refused.should_retry, refused.retry_after_s) == (False, None)
    waited = UpstreamStatus("s", upstream_status=429, retry_after_s=3.0)
    advise_client_retry(waited)
    assert (waited.should_retry, waited.retry_after_s) == (True, 3.0)
    bare = UpstreamTimeout("t")
    advise_client_retry(bare)
    assert (bare.should_retry, bare.retry_after_s) == (True, 1.0)


def test_the_backoff_is_full_jitter_under_a_doubling_cap() -> None:
    rng_state = random.getstate()
    try:
        random.seed(17)
        for n, cap in ((1, 0.02), (2, 0.04), (4, 0.16), (5, 0.25), (9, 0.25)):
            draws = [_backoff(n) for _ in range(400)]
            assert 0 <= min(draws) < cap * 0.05 and cap * 0.95 < max(draws) <= cap, n
    finally:
        random.setstate(rng_state)
