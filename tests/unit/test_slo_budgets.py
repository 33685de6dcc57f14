"""The gateway's SLO budgets (issue 13): what a request that got no answer counts, what a
reload keeps, and in-flight requests settling across a reload. Plain values, numbers by hand."""

from __future__ import annotations

import asyncio
import math

import pytest

from gateway.config import parse_config
from gateway.errors import NoBackendAvailable, UpstreamStatus, UpstreamTimeout
from gateway.flow.feedback import Feedback
from gateway.flow.reliability import Reliability
from gateway.flow.slo_budgets import (
    SloBudgets,
    SloBudgetView,
    SloOutcome,
    judge,
    missed_before_answer,
)
from gateway.metering.outcome import AttemptOutcome
from gateway.metrics import GatewayMetrics
from gateway.state.live import LiveState, LocalRoom
from policies.budget import MissBudget
from policies.types import Candidate, RouteDecision, RouteRequest, Slo
from tests.unit.test_lifetimes import POLICY

CHAT = Slo(max_ttft_s=1.0, max_itl_s=0.05)
BULK = Slo(max_total_s=600.0)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _store(slos: dict[str, Slo], clock: Clock) -> tuple[SloBudgets, SloBudgetView]:
    store = SloBudgets(clock)
    view = store.view(slos, ["m"])
    store.adopt(view)
    return store, view


def _decision(cls: str = "chat", backend: str = "gpu", p: float = 0.0) -> RouteDecision:
    chosen = Candidate(backend, 0.0, 0.1, 0.02, 1.0, True, miss_probability=p)
    return RouteDecision((chosen,), "", 0, "cost", budget_class=cls, slo_class=cls, model="m")


def _out(status: str, ttft: float | None, total: float, tokens: int = 11) -> AttemptOutcome:
    return AttemptOutcome("gpu", "m", status, ttft, total, 100, tokens)


def test_a_withdrawn_request_takes_its_faded_count_back_out() -> None:
    b = MissBudget()
    for _ in range(3):
        b = b.count(0.0)
    # One of the three (counted at 0) leaves unjudged at 600 s, one time constant later:
    # 3/e - 1/e = 2/e = 0.73576 routed; nothing missed.
    b = b.withdraw(600.0, 600.0)
    assert b.routed == pytest.approx(2.0 / math.e) and b.missed == 0.0
    # Never below nothing.
    assert MissBudget().withdraw(0.0, 0.0).routed == 0.0


def test_a_request_the_client_ended_is_judged_by_the_bounds_already_passed() -> None:
    # A stream: its TTFT bound (1 s) passes with no first token; a whole answer is judged
    # by its total bound only (its first token is its last).
    assert not missed_before_answer(CHAT, True, 0.9)
    assert missed_before_answer(CHAT, True, 1.1)
    assert not missed_before_answer(CHAT, False, 1.1)
    assert not missed_before_answer(BULK, True, 599.0)
    assert missed_before_answer(BULK, False, 601.0)


def test_the_verdict_on_an_answer_that_began() -> None:
    # Whole and in time: met. 11 tokens at 0.2 s, 0.7 s total: ITL 0.5 / 10 = 0.05: met.
    assert judge(CHAT, _out("ok", 0.2, 0.7), True) is False
    assert judge(CHAT, _out("ok", 0.2, 0.71), True) is True  # ITL 0.051
    # The answer broke after a timely first token: no whole answer, a miss.
    for status in ("upstream_cut", "upstream_error", "upstream_protocol_error", "unmetered"):
        assert judge(CHAT, _out(status, 0.2, 0.3), True) is True
    # The client left mid-stream: judged by what was measured.
    assert judge(CHAT, _out("client_disconnect", 0.2, 0.3, 3), True) is False
    assert judge(CHAT, _out("client_disconnect", 1.2, 1.3, 3), True) is True
    # ... or before the first token: withdrawn before the TTFT bound, a miss after it.
    assert judge(CHAT, _out("client_disconnect", None, 0.5, 0), True) is None
    assert judge(CHAT, _out("client_disconnect", None, 1.5, 0), True) is True
    # A stream that ended "ok" with no first token: a miss.
    assert judge(CHAT, _out("ok", None, 0.5, 0), True) is True


def test_a_broken_local_answer_is_a_miss_its_charge_released_and_no_evidence() -> None:
    clock = Clock()
    _, view = _store({"chat": CHAT}, clock)
    for _ in range(1000):
        view.count("m", "chat")
    d = _decision(p=0.3)
    charge = view.charge(d, "gpu", local_gpu=True)
    assert charge == pytest.approx(0.3)  # no evidence yet: calibration 1
    assert view.left("m")["chat"] == pytest.approx(5.0 - 0.3)
    view.settle(_out("upstream_cut", 0.2, 0.3), True, SloOutcome(d, charge))
    b = view.of("m")["chat"]
    # One miss, the charge gone, and the calibration untouched: (0 + 1) / (0 + 1).
    assert b.missed == 1.0 and b.in_flight == 0.0 and b.calibration == 1.0
    assert view.left("m")["chat"] == pytest.approx(4.0)
    # A whole answer that misses is evidence: (1 + 1) / (0.3 + 1).
    charge = view.charge(d, "gpu", local_gpu=True)
    view.settle(_out("ok", 1.5, 2.0), True, SloOutcome(d, charge))
    assert view.of("m")["chat"].calibration == pytest.approx(2.0 / 1.3)


def test_a_client_that_left_before_its_first_token_is_withdrawn_with_its_charge() -> None:
    clock = Clock()
    _, view = _store({"chat": CHAT}, clock)
    view.count("m", "chat")
    d = _decision(p=0.2)
    charge = view.charge(d, "gpu", local_gpu=True)
    clock.t += 0.5
    view.settle(_out("client_disconnect", None, 0.5, 0), True, SloOutcome(d, charge))
    b = view.of("m")["chat"]
    # Counted at 1000, withdrawn 0.5 s later with weight exp(-0.5 / 600): nothing left.
    assert b.routed == pytest.approx(0.0, abs=1e-12)
    assert b.missed == 0.0 and b.in_flight == 0.0 and b.calibration == 1.0


def test_unanswered_requests_are_misses_unless_the_client_ended_them_in_time() -> None:
    clock = Clock()
    _, view = _store({"chat": CHAT}, clock)
    for _ in range(4):
        view.count("m", "chat")  # at 1000 s
    clock.t = 1000.3
    view.unanswered("m", "chat", True, 0.3, clients_doing=False)  # failed fast: a miss
    view.unanswered("m", "chat", True, 0.3, clients_doing=True)  # left in time: withdrawn
    clock.t = 1001.3
    view.unanswered("m", "chat", True, 1.3, clients_doing=True)  # left late: a miss
    b = view.of("m")["chat"]
    # Four counted, one taken back out 0.3 s later (at the weight it had faded to), all
    # faded 1.3 s: 3 x exp(-1.3 / 600); the misses at 1000.3 faded 1 s, the one at 1001.3 not.
    assert b.routed == pytest.approx(3.0 * math.exp(-1.3 / 600.0), rel=1e-12)
    assert b.missed == pytest.approx(math.exp(-1.0 / 600.0) + 1.0, rel=1e-12)
    # A class or model the budgets do not hold: nothing happens (and nothing is created).
    view.unanswered("m", "nope", True, 0.3, clients_doing=False)
    view.unanswered("other", "chat", True, 0.3, clients_doing=False)
    assert view.of("other")["chat"] == MissBudget()


def _feedback(view: SloBudgetView) -> Feedback:
    config = parse_config(POLICY)
    live = LiveState({b.name: b for b in config.backends}, 0.0, alpha=0.2)
    return Feedback(
        live, GatewayMetrics(), Reliability.from_config(config), LocalRoom(), view, clock=Clock()
    )


@pytest.mark.parametrize(
    ("exc", "elapsed", "missed"),
    [
        (NoBackendAvailable("none"), 0.01, 1.0),  # nothing could serve it
        (UpstreamTimeout("slow"), 0.5, 1.0),  # the deadline passed
        (UpstreamStatus("500", upstream_status=500), 0.1, 1.0),
        (UpstreamStatus("429", upstream_status=429), 0.1, 1.0),  # passed on: no answer
        (UpstreamStatus("400", upstream_status=400), 0.1, None),  # the client's mistake
        (UpstreamStatus("400", upstream_status=400), 1.5, 1.0),  # ... after the TTFT bound
        (asyncio.CancelledError(), 0.1, None),  # the client left in time
        (asyncio.CancelledError(), 1.5, 1.0),  # ... after the TTFT bound
    ],
)
def test_feedback_sorts_unanswered_requests_by_whose_doing_it_was(
    exc: BaseException, elapsed: float, missed: float | None
) -> None:
    clock = Clock()
    _, view = _store({"interactive": CHAT}, clock)
    fb = _feedback(view)
    req = RouteRequest("m", 10, 20, 20, True, "interactive", CHAT)
    fb.on_routed(req)  # the request arrived (and was counted) at 1000 s
    clock.t += elapsed
    fb.on_unanswered(req, elapsed, exc)
    b = view.of("m")["interactive"]
    if missed is None:  # withdrawn: neither met nor missed
        assert b.routed == pytest.approx(0.0, abs=1e-12) and b.missed == 0.0
    else:
        assert b.routed == pytest.approx(math.exp(-elapsed / 600.0)) and b.missed == missed
    fb.on_unanswered(None, 5.0, exc)  # never routed: never counted, nothing to settle
    assert view.of("m")["interactive"] == b


def test_a_reload_keeps_unchanged_classes_and_starts_changed_ones_over() -> None:
    clock = Clock()
    store, old = _store({"chat": CHAT, "bulk": BULK, "gone": BULK}, clock)
    for cls in ("chat", "bulk", "gone"):
        for _ in range(300):
            old.count("m", cls)
    old.count("m2", "chat")
    # A local request of "chat" and one of "bulk" in flight, charged 0.25 each.
    d_chat, d_bulk = _decision("chat", p=0.25), _decision("bulk", p=0.25)
    c_chat = old.charge(d_chat, "gpu", local_gpu=True)
    c_bulk = old.charge(d_bulk, "gpu", local_gpu=True)
    chat_before = old.of("m")["chat"]
    assert chat_before.in_flight == 0.25 and old.left("m")["chat"] == pytest.approx(1.25)

    # The new config: "chat" as it was (only its queue wait differs: not a bound), "bulk"
    # with another total bound, "gone" removed, "new" added; model m2 no longer served.
    chat_waits = Slo(max_ttft_s=1.0, max_itl_s=0.05, max_queue_wait_s=5.0)
    new = store.view({"chat": chat_waits, "bulk": Slo(max_total_s=60.0), "new": BULK}, ["m"])
    assert new.left("m") == {}  # not in force, and writing nowhere, until adopted
    store.adopt(new)
    assert new.of("m")["chat"] == chat_before
    assert new.left("m")["chat"] == old.left("m")["chat"] == pytest.approx(1.25)
    assert new.of("m")["bulk"] == MissBudget() and new.of("m")["new"] == MissBudget()
    assert set(new.left("m")) == {"chat", "bulk", "new"}
    assert new.of("m2")["chat"] == MissBudget()  # dropped with its model

    # The in-flight requests end after the reload, settled by the old config's view.
    old.settle(_out("ok", 0.2, 0.4), True, SloOutcome(d_chat, c_chat))
    old.settle(_out("ok", 0.2, 0.4), True, SloOutcome(d_bulk, c_bulk))
    # "chat" kept its window: the charge leaves the budget the new config reads.
    # It met its SLO and was predicted to miss with 0.25: calibration (0 + 1) / (0.25 + 1)
    # = 0.8, so the 1.5 misses of 300 requests are worth 1.5 / 0.8 = 1.875 of prediction.
    assert new.of("m")["chat"].in_flight == 0.0
    assert new.left("m")["chat"] == pytest.approx(1.875)
    # "bulk" started over: the old request's charge and verdict stay in the old window.
    assert new.of("m")["bulk"] == MissBudget()
    assert old.of("m")["bulk"].in_flight == 0.0

    # Changed and changed back: still a new window (the old one's misses were judged
    # under bounds that were not in force in between).
    new.count("m", "bulk")
    back = store.view({"chat": CHAT, "bulk": BULK}, ["m"])
    store.adopt(back)
    assert back.of("m")["bulk"] == MissBudget()
    assert back.of("m")["chat"] == new.of("m")["chat"]
