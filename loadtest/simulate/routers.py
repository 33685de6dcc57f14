"""Routing policies as the simulator drives them: neogate's own (through `select`) and baselines.

Every policy returns a `Choice`: the fallback order of backend names, and for
neogate's cost policy how long a delay-tolerant request may wait for local headroom.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from policies.select import Policy, compile_policy, select
from policies.spec import CostPolicySpec, LatencyPolicySpec
from policies.types import BackendSnapshot, Candidate, RouteRequest, Slo


@dataclass(frozen=True, slots=True)
class Choice:
    """A policy's answer: try `order` in turn; maybe wait for a local worker first."""

    order: tuple[str, ...]
    wait_for_local: float | None = None
    # Predicted TTFT of the first choice, when the policy predicts (for error tracking).
    predicted_ttft_s: float | None = None
    predicted_itl_s: float | None = None
    # The first choice's predicted ITL miss probability (local workers; for the SLO budget).
    miss_probability: float = 0.0


class SimPolicy(Protocol):
    """What the engine asks a policy per request."""

    name: str

    def choose(
        self, request: RouteRequest, snapshots: Sequence[BackendSnapshot], now: float
    ) -> Choice: ...


@dataclass
class SelectPolicy:
    """neogate's router: the same `select()` the gateway calls."""

    name: str
    policy: Policy
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    # Why an idle local GPU was passed over for an external backend: "gpu: reason" -> count.
    # An idle GPU's marginal cost is 0, so only a predicted SLO miss puts it behind.
    idle_passed: Counter[str] = field(default_factory=Counter)
    routed: int = 0

    def _note_idle_passed(
        self, candidates: Sequence[Candidate], snapshots: Sequence[BackendSnapshot]
    ) -> None:
        self.routed += 1
        if not candidates or any(s.name == candidates[0].backend for s in snapshots if s.is_local):
            return
        for s in snapshots:
            if s.is_local and s.inflight == 0:
                c = next((c for c in candidates if c.backend == s.name), None)
                if c is not None and c.reason:
                    self.idle_passed[f"{s.name}: {_shape(c.reason)}"] += 1

    def choose(
        self, request: RouteRequest, snapshots: Sequence[BackendSnapshot], now: float
    ) -> Choice:
        d = select(request, snapshots, self.policy, now, rng_value=self.rng.random())
        top = d.chosen
        if top is not None and d.wait_for_local is None:
            self._note_idle_passed(d.candidates, snapshots)
        return Choice(
            tuple(c.backend for c in d.candidates),
            d.wait_for_local,
            None if top is None else top.predicted_ttft_s,
            None if top is None else top.predicted_itl_s,
            0.0 if top is None else top.miss_probability,
        )


@dataclass
class RoundRobin:
    """Every healthy backend in turn, regardless of price or load."""

    name: str = "round-robin"
    _next: int = 0

    def choose(
        self, request: RouteRequest, snapshots: Sequence[BackendSnapshot], now: float
    ) -> Choice:
        names = [s.name for s in snapshots if s.healthy]
        if not names:
            return Choice(())
        k = self._next % len(names)
        self._next += 1
        return Choice(tuple(names[k:] + names[:k]))


@dataclass
class AlwaysLocalUntilError:
    """The least-loaded local worker; external providers only after a local error."""

    name: str = "always-local-until-error"

    def choose(
        self, request: RouteRequest, snapshots: Sequence[BackendSnapshot], now: float
    ) -> Choice:
        local = sorted((s for s in snapshots if s.is_local), key=lambda s: s.inflight)
        remote = sorted((s for s in snapshots if not s.is_local), key=_list_price)
        return Choice(tuple(s.name for s in (*local, *remote)))


@dataclass
class CheapestExternal:
    """The cheapest provider by list price; local workers only as a last resort."""

    name: str = "cheapest-external"

    def choose(
        self, request: RouteRequest, snapshots: Sequence[BackendSnapshot], now: float
    ) -> Choice:
        remote = sorted((s for s in snapshots if not s.is_local), key=_price_for(request))
        local = [s for s in snapshots if s.is_local]
        return Choice(tuple(s.name for s in (*remote, *local)))


@dataclass
class SpillAt:
    """The least-loaded local worker while it has fewer than `n` requests in flight, else the
    cheapest provider for the request (a static spill threshold, as operators often set)."""

    n: int
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or f"spill@{self.n}"

    def choose(
        self, request: RouteRequest, snapshots: Sequence[BackendSnapshot], now: float
    ) -> Choice:
        local = sorted((s for s in snapshots if s.is_local), key=lambda s: s.inflight)
        remote = sorted((s for s in snapshots if not s.is_local), key=_price_for(request))
        if local and local[0].inflight < self.n:
            return Choice(tuple(s.name for s in (*local, *remote)))
        return Choice(tuple(s.name for s in (*remote, *local)))


@dataclass
class LeastLoaded:
    """The backend with the fewest requests in flight (ties: the cheaper list price)."""

    name: str = "least-loaded"

    def choose(
        self, request: RouteRequest, snapshots: Sequence[BackendSnapshot], now: float
    ) -> Choice:
        ranked = sorted(
            (s for s in snapshots if s.healthy), key=lambda s: (s.inflight, _list_price(s))
        )
        return Choice(tuple(s.name for s in ranked))


def _price_for(request: RouteRequest) -> Callable[[BackendSnapshot], float]:
    def price(s: BackendSnapshot) -> float:
        return (
            request.prompt_tokens * s.price_in_per_token
            + request.expected_output_tokens * s.price_out_per_token
        )

    return price


def _shape(reason: str) -> str:
    """A reason with its numbers rounded, so that near-identical ones count together."""

    def rounded(m: re.Match[str]) -> str:
        x = float(m.group())
        return f"{x:.1f}" if x < 10 else f"{x:.0f}"

    return re.sub(r"\d+\.\d+", rounded, reason)


def _list_price(s: BackendSnapshot) -> float:
    return s.price_in_per_token + s.price_out_per_token


def default_policies(
    seed: int = 0, slo_classes: Mapping[str, Slo] | None = None
) -> list[SimPolicy]:
    """neogate `cost`, the baselines, and `fastest` (neogate's latency policy)."""
    return [
        SelectPolicy("cost", compile_policy(CostPolicySpec(), slo_classes), random.Random(seed)),
        RoundRobin(),
        AlwaysLocalUntilError(),
        CheapestExternal(),
        SelectPolicy("fastest", compile_policy(LatencyPolicySpec()), random.Random(seed)),
    ]
