"""`select`: rank the usable backends for one request under a policy, and say why.

Pure and fast: frozen snapshots and the clock come in, a `RouteDecision` goes out.
Unhealthy backends, those cooling down after a 429, those at their gateway-side
concurrency cap and (pinned) those not listed are rejected with a reason; backends
near a rate limit stay usable but go to the end of the fallback order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from policies.headroom import near_limit
from policies.predict import predict
from policies.queueing import DEFAULT_SPREAD_SIGMAS, guard_for, tolerates_delay, wait_decision
from policies.spec import (
    CostPolicySpec,
    LatencyPolicySpec,
    PinnedPolicySpec,
    PolicySpec,
    SloClassSpec,
    WeightedPolicySpec,
)
from policies.types import BackendSnapshot, Candidate, RouteDecision, RouteRequest, Slo

MAX_REASON = 199


@dataclass(frozen=True, slots=True)
class CostPolicy:
    """Cheapest predicted cost among SLO-meeting candidates; fastest if none meets it.

    `protect` is the SLO of `protect_class`: delay-tolerant requests of other classes use
    a local worker only while it stays within it (see `policies.predict.predict`).
    """

    spread_sigmas: float = DEFAULT_SPREAD_SIGMAS
    protect_class: str | None = None
    protect: Slo | None = None


@dataclass(frozen=True, slots=True)
class LatencyPolicy:
    """Fastest predicted total latency."""


@dataclass(frozen=True, slots=True)
class WeightedPolicy:
    """Random first choice by static weight (the caller supplies the random number)."""

    weights: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class PinnedPolicy:
    """A fixed order, which is also the fallback order; unlisted backends are not used."""

    order: tuple[str, ...]
    rank: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", MappingProxyType({n: i for i, n in enumerate(self.order)}))


Policy = CostPolicy | LatencyPolicy | WeightedPolicy | PinnedPolicy
_COMPILED = (CostPolicy, LatencyPolicy, WeightedPolicy, PinnedPolicy)


def compile_policy(
    spec: PolicySpec | Policy, slo_classes: Mapping[str, SloClassSpec | Slo] | None = None
) -> Policy:
    """The plain value for a policy spec; do this once at config load, not per request.

    `slo_classes` supplies the cost policy's protected class; without it (or if the class
    is not defined) there is no guard.
    """
    if isinstance(spec, _COMPILED):
        return spec
    if isinstance(spec, CostPolicySpec):
        protect = None
        if spec.protect_class is not None and slo_classes is not None:
            found = slo_classes.get(spec.protect_class)
            protect = Slo.from_spec(found) if isinstance(found, SloClassSpec) else found
        return CostPolicy(spec.spread_sigmas, spec.protect_class if protect else None, protect)
    if isinstance(spec, LatencyPolicySpec):
        return LatencyPolicy()
    if isinstance(spec, WeightedPolicySpec):
        return WeightedPolicy(MappingProxyType(dict(spec.weights)))
    if isinstance(spec, PinnedPolicySpec):
        return PinnedPolicy(tuple(spec.order))
    raise TypeError(f"not a policy: {type(spec).__name__}")


def policy_name(policy: Policy) -> str:
    """The `kind` of a compiled policy."""
    if isinstance(policy, CostPolicy):
        return "cost"
    if isinstance(policy, LatencyPolicy):
        return "latency"
    if isinstance(policy, WeightedPolicy):
        return "weighted"
    return "pinned"


def _total_key(c: Candidate) -> tuple[float, float]:
    return (c.predicted_total_s, c.predicted_cost_usd)


def _cost_key(c: Candidate) -> tuple[float, float]:
    return (c.predicted_cost_usd, c.predicted_total_s)


def _ascii(text: str) -> str:
    if not text.isascii():
        text = text.encode("ascii", "replace").decode("ascii")
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def _detail(c: Candidate, s: BackendSnapshot, request: RouteRequest) -> str:
    gpu = s.gpu
    itl = f"itl {c.predicted_itl_s * 1000:.1f}ms"
    if request.slo.max_itl_s is not None:
        itl += f" <= {request.slo.max_itl_s * 1000:g}ms"
    ttft = f"ttft {c.predicted_ttft_s:.2f}s"
    if gpu is not None:
        return f"{gpu.mode}, batch {c.predicted_batch}/b*{c.slo_batch}, {ttft}, {itl}"
    return f"{ttft}, {itl}"


def _others(n: int) -> str:
    return "" if n <= 0 else f"; {n} other" + ("s" if n > 1 else "")


def _demote(c: Candidate) -> Candidate:
    return Candidate(
        c.backend,
        c.predicted_cost_usd,
        c.predicted_ttft_s,
        c.predicted_itl_s,
        c.predicted_total_s,
        c.meets_slo,
        "near rate limit" + (f"; {c.reason}" if c.reason else ""),
        c.predicted_batch,
        c.slo_batch,
        c.miss_probability,
    )


def select(
    request: RouteRequest,
    snapshots: Sequence[BackendSnapshot],
    policy: PolicySpec | Policy,
    now: float,
    *,
    rng_value: float = 0.5,
) -> RouteDecision:
    """Rank the backends in `snapshots` for `request` at time `now` under `policy`.

    `rng_value` in [0, 1) drives the weighted policy's pick, so the function stays pure.
    The decision's `candidates` hold every usable backend, best first: the fallback order.
    """
    pol = policy if isinstance(policy, _COMPILED) else compile_policy(policy)
    guard = None
    budget = 0.0
    budget_class = ""
    if isinstance(pol, CostPolicy):
        sigmas = pol.spread_sigmas
        if pol.protect is not None:
            guard = guard_for(request, pol.protect_class, pol.protect)
        # The class whose ITL target judges the local worker: the request's own, or the
        # protected class's for guarded work.
        own = guard is None or request.slo.max_itl_s is not None
        budget_class = request.slo_class if own else (pol.protect_class or "")
        if request.miss_budgets:
            budget = request.miss_budgets.get(budget_class, 0.0)
    else:
        sigmas = DEFAULT_SPREAD_SIGMAS
    rank = pol.rank if isinstance(pol, PinnedPolicy) else None
    need_tokens = request.prompt_tokens + request.max_output_tokens
    rejected: list[tuple[str, str]] = []
    accepted: list[BackendSnapshot] = []
    preds: list[Candidate | None] = []
    by_name: dict[str, BackendSnapshot] = {}
    version = 0
    alt: Candidate | None = None
    for s in snapshots:
        version = max(version, s.price_version)
        h = s.headroom
        if not s.healthy:
            rejected.append((s.name, "unhealthy"))
        elif h.cooldown_until is not None and now < h.cooldown_until:
            rejected.append((s.name, f"429 cool-down {h.cooldown_until - now:.1f}s"))
        elif s.max_concurrency is not None and s.inflight >= s.max_concurrency:
            rejected.append((s.name, f"at max concurrency {s.max_concurrency}"))
        elif rank is not None and s.name not in rank:
            rejected.append((s.name, "not in pinned order"))
        else:
            by_name[s.name] = s
            accepted.append(s)
            if s.gpu is None:
                c = predict(request, s, now, sigmas, guard)
                preds.append(c)
                if not s.is_local and (
                    alt is None
                    or (c.meets_slo, -c.predicted_cost_usd)
                    > (alt.meets_slo, -alt.predicted_cost_usd)
                ):
                    alt = c
            else:
                preds.append(None)  # local: priced once the alternative is known

    # Local GPUs are priced by the work they may displace: the alternative's price.
    displaced = alt.predicted_cost_usd if alt is not None else None
    usable: list[Candidate] = []
    near: list[Candidate] = []
    for s, pred in zip(accepted, preds, strict=True):
        c = pred if pred is not None else predict(request, s, now, sigmas, guard, displaced, budget)
        h = s.headroom
        # Most backends report no limits: skip the projection (cool-downs were rejected above).
        if (
            h.remaining_tokens is not None
            or h.remaining_requests is not None
            or h.remaining_output_tokens is not None
            or h.daily_remaining_requests is not None
        ) and near_limit(h, need_tokens, now, output_tokens=request.expected_output_tokens):
            near.append(_demote(c))
        else:
            usable.append(c)

    if isinstance(pol, CostPolicy):
        ranked, reason = _rank_cost(request, usable, near, by_name)
    elif isinstance(pol, LatencyPolicy):
        ranked, reason = _rank_latency(request, usable, near, by_name)
    elif isinstance(pol, WeightedPolicy):
        ranked, reason = _rank_weighted(pol, usable, near, rng_value)
    else:
        ranked, reason = _rank_pinned(pol, usable, near)

    if not ranked:
        why = ", ".join(f"{n} {r}" for n, r in rejected) or "no backends"
        reason = f"no usable backend: {why}"
    elif not usable:
        reason += "; all others unusable, using one near its rate limit"

    wait = None
    if (
        isinstance(pol, CostPolicy)
        and tolerates_delay(request)
        and (not ranked or not by_name[ranked[0].backend].is_local)
    ):
        wait = wait_decision(
            request, snapshots, now, spread_sigmas=sigmas, guard=guard, miss_budget=budget
        )
        if wait is not None:
            reason = f"wait up to {wait:.1f}s for local; then {reason}"
    return RouteDecision(
        tuple(ranked),
        _ascii(reason),
        version,
        policy_name(pol),
        tuple(rejected),
        wait,
        None if alt is None else alt.backend,
        displaced,
        budget_class,
        request.slo_class,
        request.model,
    )


Ranked = tuple[list[Candidate], str]


def _rank_cost(
    request: RouteRequest,
    usable: list[Candidate],
    near: list[Candidate],
    by_name: Mapping[str, BackendSnapshot],
) -> Ranked:
    """SLO-meeting by cost, then the rest by speed, then those near a rate limit."""
    ok = sorted((c for c in usable if c.meets_slo), key=_cost_key)
    bad = sorted((c for c in usable if not c.meets_slo), key=_total_key)
    ranked = ok + bad + sorted(near, key=_cost_key)
    if not ranked:
        return ranked, ""
    c = ranked[0]
    others = _others(len(ranked) - 1)
    if ok:
        price = f"${c.predicted_cost_usd:.7f}" if c.predicted_cost_usd > 0 else "$0"
        return (
            ranked,
            f"cost: {c.backend} {price} ({_detail(c, by_name[c.backend], request)}){others}",
        )
    why = c.reason or _detail(c, by_name[c.backend], request)
    return ranked, f"cost: none meets slo {request.slo_class}; fastest {c.backend} ({why}){others}"


def _rank_latency(
    request: RouteRequest,
    usable: list[Candidate],
    near: list[Candidate],
    by_name: Mapping[str, BackendSnapshot],
) -> Ranked:
    """Fastest predicted total first; those near a rate limit last."""
    ranked = sorted(usable, key=_total_key) + sorted(near, key=_total_key)
    if not ranked:
        return ranked, ""
    c = ranked[0]
    return ranked, (
        f"latency: {c.backend} total {c.predicted_total_s:.2f}s "
        f"({_detail(c, by_name[c.backend], request)}){_others(len(ranked) - 1)}"
    )


def _rank_weighted(
    pol: WeightedPolicy, usable: list[Candidate], near: list[Candidate], u: float
) -> Ranked:
    """A weighted pick first; those near a rate limit last."""
    w = pol.weights
    ranked = _weighted(usable, w, u) + _weighted(near, w, u)
    if not ranked:
        return ranked, ""
    c = ranked[0]
    total = sum(w.get(x.backend, 0.0) for x in ranked)
    return ranked, (
        f"weighted: {c.backend} weight {w.get(c.backend, 0.0):g} of {total:g}"
        f"{_others(len(ranked) - 1)}"
    )


def _rank_pinned(pol: PinnedPolicy, usable: list[Candidate], near: list[Candidate]) -> Ranked:
    """The configured order; those near a rate limit last."""
    rank = pol.rank

    def key(c: Candidate) -> int:
        return rank[c.backend]

    ranked = sorted(usable, key=key) + sorted(near, key=key)
    if not ranked:
        return ranked, ""
    c = ranked[0]
    return (
        ranked,
        f"pinned: {c.backend} (#{rank[c.backend] + 1} in order){_others(len(ranked) - 1)}",
    )


def _weighted(cands: list[Candidate], weights: Mapping[str, float], u: float) -> list[Candidate]:
    """First pick by weight using `u`; the rest by descending weight (unweighted last)."""
    if len(cands) <= 1:
        return cands
    total = 0.0
    for c in cands:
        total += weights.get(c.backend, 0.0)
    rest = sorted(cands, key=lambda c: -weights.get(c.backend, 0.0))
    if total <= 0:
        return rest
    target = min(max(u, 0.0), 1.0) * total
    acc = 0.0
    for c in cands:
        w = weights.get(c.backend, 0.0)
        acc += w
        if w > 0 and target < acc:
            first = c
            break
    else:
        # u == 1.0 or rounding: the last weighted candidate.
        first = next(c for c in reversed(cands) if weights.get(c.backend, 0.0) > 0)
    rest.remove(first)
    return [first, *rest]
