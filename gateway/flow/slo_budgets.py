"""The population SLO budgets the gateway keeps (`policies.budget`): per public model and SLO
class, over the life of the process, and what counts as a miss.

    SloBudgets (Process: one per process)      SloBudgetView (one per config)
      the windows in force, one per class        the config's SLO bounds and models;
      adopt(view): a reload's classes            count / charge / settle / unanswered,
                                                 into the windows adopted for it

A window holds one class's `MissBudget` per model under one set of bounds (TTFT, ITL,
total). A reload keeps the window of a class whose bounds are unchanged, so what the
window counted (routed requests, measured misses, in-flight charges, the calibration) goes
on; a class that is removed is dropped; a new class, or one whose bounds changed, starts
with an empty window, since its past misses were judged against other bounds. A view
writes only into the windows it was adopted with: a request routed under the old config
settles into the same window when its class was kept, and into the dropped one (which no
routing reads any more) when it was not.

What a routed request counts, by how it ended (`settle`, `unanswered`):

- answered ("ok"): judged by `met_slo`, times from arrival;
- no complete answer (every attempt failed, an upstream error or 429 passed on, a timeout,
  no backend, a stream or body that broke after the answer began): a miss;
- the client's doing (it left; or the upstream refused what it asked for, a 400/404/409/
  413/422 passed through): judged by what was measured, a miss if a bound had already
  passed, else taken out of the window (`MissBudget.withdraw`), neither met nor missed.
  Counting such a request as met would make the budget look healthier than its clients
  found it; counting it as a miss would let impatient clients spend the class's budget.
  It is taken out at its age since arrival: it was counted a few milliseconds later, so
  about 1e-5 of a request stays behind per withdrawal (ms over a 600 s time constant).

A broken answer is a miss but not calibration evidence: the latency model
predicts slowness, not failures, and scaling its predictions by them would spill work
whose latency it predicts well.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gateway.metering.outcome import AttemptOutcome
from policies.budget import MissBudget
from policies.types import RouteDecision, Slo

# How an answering attempt ended (`AttemptOutcome.status`) when the client got the whole
# answer, or left while it was coming: judged by the times measured. Any other ending
# (upstream_cut, upstream_error, upstream_protocol_error, unmetered) is a miss.
ANSWERED = frozenset({"ok"})
CLIENT_LEFT = "client_disconnect"

Bounds = tuple[float | None, float | None, float | None]
# A class's budget for a model it has not counted yet (immutable: shared).
_EMPTY = MissBudget()


def bounds(slo: Slo) -> Bounds:
    """What a miss is judged against: TTFT, ITL and total. The queue wait is not a bound."""
    return (slo.max_ttft_s, slo.max_itl_s, slo.max_total_s)


@dataclass(frozen=True, slots=True)
class SloOutcome:
    """What `Feedback.on_end` needs to score a finished request against its class's SLO."""

    decision: RouteDecision
    # What `Feedback.on_start` charged the decision's budget class.
    charge: float = 0.0
    # A streamed answer's first byte is its first token; a whole answer's is its last.
    streamed: bool = True


def met_slo(slo: Slo, ttft_s: float | None, total_s: float, completion_tokens: int) -> bool:
    """Did a request meet its class's SLO (times from arrival)? TTFT and ITL are judged
    only when the first token's time is known (`ttft_s`, a streamed answer); the mean ITL
    is the time after the first token over the tokens after it."""
    if slo.max_total_s is not None and total_s > slo.max_total_s:
        return False
    if ttft_s is None:
        return True
    if slo.max_ttft_s is not None and ttft_s > slo.max_ttft_s:
        return False
    n = completion_tokens
    return not (
        slo.max_itl_s is not None and n > 1 and (total_s - ttft_s) / (n - 1) > slo.max_itl_s
    )


def missed_before_answer(slo: Slo, streamed: bool, elapsed_s: float) -> bool:
    """A request the client ended before its answer: had a bound already passed? The total
    bound, and for a stream the TTFT bound (no first token by then). A whole answer's
    first token is its last, so only the total judges it (as `met_slo`)."""
    if slo.max_total_s is not None and elapsed_s > slo.max_total_s:
        return True
    return streamed and slo.max_ttft_s is not None and elapsed_s > slo.max_ttft_s


def judge(slo: Slo, outcome: AttemptOutcome, streamed: bool) -> bool | None:
    """The verdict on a request whose answer began: True a miss, False met, None withdrawn
    (the client left before its first token and before any bound had passed)."""
    left = outcome.status == CLIENT_LEFT
    if outcome.status not in ANSWERED and not left:
        return True  # the answer broke: the client has no whole answer
    if streamed and outcome.ttft_s is None:  # no first token reached the client
        return True if not left or missed_before_answer(slo, True, outcome.total_s) else None
    known = outcome.ttft_s if streamed else None
    return not met_slo(slo, known, outcome.total_s, outcome.completion_tokens)


class _Window:
    """One SLO class's miss budgets per public model, under one set of bounds."""

    __slots__ = ("bounds", "by_model")

    def __init__(self, judged: Bounds) -> None:
        self.bounds = judged
        self.by_model: dict[str, MissBudget] = {}


class SloBudgets:
    """The process's SLO class windows (`Process.slo_budgets`); configs reach them through
    a `SloBudgetView` each, and a reload's view is put in force by `adopt`."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._in_force: dict[str, _Window] = {}

    def view(self, slos: Mapping[str, Slo], models: Iterable[str]) -> SloBudgetView:
        """A config's view (not in force, and writing nowhere, until adopted)."""
        return SloBudgetView(self, slos, models)

    def adopt(self, view: SloBudgetView) -> None:
        """Put a config's classes in force: a class whose bounds are unchanged keeps its
        window (minus models the config no longer serves); a new or changed class gets an
        empty one; a removed class's window is dropped."""
        models = view.models
        windows: dict[str, _Window] = {}
        for name, slo in view.slos.items():
            judged = bounds(slo)
            kept = self._in_force.get(name)
            if kept is None or kept.bounds != judged:
                kept = _Window(judged)
            else:
                for model in [m for m in kept.by_model if m not in models]:
                    del kept.by_model[model]
            windows[name] = kept
        view.windows = windows
        self._in_force = windows


class SloBudgetView:
    """One config's access to the process's SLO budgets: its bounds judge its requests,
    and it writes into the windows `SloBudgets.adopt` gave it. Per model: one model's easy
    traffic (an 8B fleet) must not fund another's misses (a 70B pair), nor its
    calibration hide them."""

    def __init__(self, store: SloBudgets, slos: Mapping[str, Slo], models: Iterable[str]) -> None:
        self._clock = store.clock
        self.slos: Mapping[str, Slo] = MappingProxyType(dict(slos))
        self.models = frozenset(models)
        self.windows: Mapping[str, _Window] = MappingProxyType({})

    def of(self, model: str) -> Mapping[str, MissBudget]:
        """The model's budget per SLO class as it stands (empty classes for an unseen model)."""
        return MappingProxyType({c: w.by_model.get(model, _EMPTY) for c, w in self.windows.items()})

    def left(self, model: str) -> Mapping[str, float]:
        """What each of the model's class budgets has left now."""
        now = self._clock()
        return MappingProxyType(
            {c: w.by_model.get(model, _EMPTY).left(now) for c, w in self.windows.items()}
        )

    def count(self, model: str, slo_class: str) -> None:
        """One more request of the model and class was routed."""
        w = self.windows.get(slo_class)
        if w is not None:
            w.by_model[model] = w.by_model.get(model, _EMPTY).count(self._clock())

    def charge(self, decision: RouteDecision | None, backend: str, local_gpu: bool) -> float:
        """The expected misses charged when `backend` answered: a local first choice's
        predicted miss probability, calibrated (0 for anything else)."""
        chosen = None if decision is None else decision.chosen
        if (
            decision is None
            or chosen is None
            or chosen.backend != backend
            or chosen.miss_probability <= 0.0
            or not local_gpu
        ):
            return 0.0
        w = self.windows.get(decision.budget_class)
        budget = None if w is None else w.by_model.get(decision.model)
        if w is None or budget is None:
            return 0.0
        charge = budget.charge(chosen.miss_probability)
        w.by_model[decision.model] = budget.admit(charge)
        return charge

    def settle(self, outcome: AttemptOutcome, local_gpu: bool, slo: SloOutcome) -> None:
        """A started answer ended: its verdict (`judge`) and its charge back into the
        budgets. Only an answer judged by its measured times is the calibration's evidence:
        a broken one is a miss the latency model was never asked to predict."""
        d = slo.decision
        own, model = d.slo_class, d.model
        if own not in self.windows:
            return
        now = self._clock()
        verdict = judge(self.slos[own], outcome, slo.streamed)
        missed = verdict is True
        chosen = d.chosen
        if local_gpu and d.budget_class == own:
            p: float | None = None
            if verdict is not None and outcome.status in (*ANSWERED, CLIENT_LEFT):
                mine = chosen is not None and chosen.backend == outcome.backend
                p = chosen.miss_probability if mine and chosen is not None else 0.0
            self._apply(own, model, lambda b: b.settle(now, slo.charge, missed, predicted=p))
        else:
            if slo.charge > 0.0:
                self._apply(d.budget_class, model, lambda b: b.settle(now, slo.charge, False))
            self._apply(own, model, lambda b: b.settle(now, 0.0, missed))
        if verdict is None:
            self._apply(own, model, lambda b: b.withdraw(now, outcome.total_s))

    def unanswered(
        self, model: str, slo_class: str, streamed: bool, elapsed_s: float, *, clients_doing: bool
    ) -> None:
        """A routed request ended before any answer began (`elapsed_s` after it arrived):
        a miss, unless it was the client's doing and no bound had passed yet (withdrawn)."""
        slo = self.slos.get(slo_class)
        if slo is None or slo_class not in self.windows:
            return
        now = self._clock()
        if not clients_doing or missed_before_answer(slo, streamed, elapsed_s):
            self._apply(slo_class, model, lambda b: b.settle(now, 0.0, True))
        else:
            self._apply(slo_class, model, lambda b: b.withdraw(now, elapsed_s))

    def _apply(self, slo_class: str, model: str, step: Callable[[MissBudget], MissBudget]) -> None:
        """Change the model's budget of the class, if the window has one (it was counted)."""
        w = self.windows.get(slo_class)
        budget = None if w is None else w.by_model.get(model)
        if w is not None and budget is not None:
            w.by_model[model] = step(budget)
