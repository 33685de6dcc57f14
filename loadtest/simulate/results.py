"""Per-request records of a simulation and the per-policy summary computed from them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from loadtest.simulate.traces import TraceRequest
from policies.types import RouteRequest, Slo

if TYPE_CHECKING:
    from loadtest.simulate.backends import SimGpu, SimProvider
    from loadtest.simulate.routers import SimPolicy
    from loadtest.simulate.scenario import Scenario
    from loadtest.simulate.traces import Trace

TIMELINE_BUCKET_S = 10.0


@dataclass(slots=True, eq=False)
class SimRequest:
    """A request's life in the simulation."""

    i: int
    tr: TraceRequest
    rr: RouteRequest
    z: tuple[float, float]
    prefill_noise: float
    order: tuple[str, ...] = ()
    backend: str | None = None
    dispatched_at: float = 0.0
    predicted_ttft_s: float | None = None
    predicted_itl_s: float | None = None
    first_token_at: float | None = None
    done_at: float | None = None
    failed: bool = False
    cost_usd: float = 0.0
    chargeback_usd: float = 0.0
    queued_until: float | None = None
    # Its predicted ITL miss probability on the local worker that took it (first choice),
    # and the expected misses charged to the SLO budget for it while it runs.
    miss_p: float = 0.0
    miss_charge: float = 0.0

    def copy(self) -> SimRequest:
        """An independent copy, for `Engine.fork` (spelled out: 20x faster than copy.copy on
        slots, and a fork copies every request; the fork test checks no field is missed)."""
        return SimRequest(
            self.i,
            self.tr,
            self.rr,
            self.z,
            self.prefill_noise,
            self.order,
            self.backend,
            self.dispatched_at,
            self.predicted_ttft_s,
            self.predicted_itl_s,
            self.first_token_at,
            self.done_at,
            self.failed,
            self.cost_usd,
            self.chargeback_usd,
            self.queued_until,
            self.miss_p,
            self.miss_charge,
        )


@dataclass
class PolicyResult:
    """One policy's outcome on one trace."""

    policy: str
    requests: int
    failed: int
    tokens: int
    gpu_cost_usd: float
    external_cost_usd: float
    local_chargeback_usd: float
    slo_attainment: dict[str, float]
    token_share: dict[str, float]
    gpu_utilization: dict[str, float]
    mean_batch: dict[str, float]
    ttft_p50_s: float
    ttft_p99_s: float
    interactive_external_fraction: float
    queued_requests: int
    refused_attempts: int = 0
    timeline: list[tuple[float, int, int]] = field(default_factory=list)
    # Per SLO class, why its requests missed: "local ttft", "external itl", "failed", ...
    # (`miss_causes`; a request that broke two bounds counts under both).
    misses: dict[str, dict[str, int]] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def total_cost_usd(self) -> float:
        """GPU-hours as held (the trace, or longer while a GPU still works) plus external spend."""
        return self.gpu_cost_usd + self.external_cost_usd

    @property
    def cost_per_million_tokens(self) -> float:
        """Total cost per million tokens served (prompt + completion)."""
        return self.total_cost_usd / self.tokens * 1e6 if self.tokens else math.inf

    def as_json(self) -> dict[str, Any]:
        """The JSON shape `neogate simulate --json` writes per policy."""
        return {
            "cost_per_million_tokens": self.cost_per_million_tokens,
            "slo_attainment": self.slo_attainment.get("interactive", math.nan),
            "slo_attainment_by_class": self.slo_attainment,
            "total_cost_usd": self.total_cost_usd,
            "gpu_cost_usd": self.gpu_cost_usd,
            "external_cost_usd": self.external_cost_usd,
            "local_chargeback_usd": self.local_chargeback_usd,
            "tokens": self.tokens,
            "requests": self.requests,
            "failed": self.failed,
            "token_share": self.token_share,
            "gpu_utilization": self.gpu_utilization,
            "mean_batch": self.mean_batch,
            "interactive_ttft_p50_s": self.ttft_p50_s,
            "interactive_ttft_p99_s": self.ttft_p99_s,
            "interactive_external_fraction": self.interactive_external_fraction,
            "queued_requests": self.queued_requests,
            "refused_attempts": self.refused_attempts,
            "misses_by_cause": self.misses,
        }


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class FinishedRun(Protocol):
    """What the summary reads of a finished run (`loadtest.simulate.engine.Engine`)."""

    sc: Scenario
    trace: Trace
    policy: SimPolicy
    reqs: list[SimRequest]
    gpus: dict[str, SimGpu]
    providers: dict[str, SimProvider]
    queued_total: int
    refusals: int


def summarize(engine: FinishedRun) -> PolicyResult:
    """Cost, SLO attainment, shares and utilization from a finished run."""
    sc, trace = engine.sc, engine.trace
    met: dict[str, list[int]] = {}
    misses: dict[str, dict[str, int]] = {}
    tokens_by: dict[str, int] = {}
    ttfts: list[float] = []
    external_interactive = 0
    n_interactive = 0
    nb = max(1, math.ceil(trace.duration_s / TIMELINE_BUCKET_S))
    local_tl = [0] * nb
    ext_tl = [0] * nb
    for r in engine.reqs:
        tr = r.tr
        slo = sc.slo_classes[tr.slo_class]
        ok = meets_slo(r, slo)
        if not ok:
            counts = misses.setdefault(tr.slo_class, {})
            for cause in miss_causes(r, slo, r.backend in engine.gpus):
                counts[cause] = counts.get(cause, 0) + 1
        m = met.setdefault(tr.slo_class, [0, 0])
        m[0] += ok
        m[1] += 1
        if tr.slo_class == "interactive":
            n_interactive += 1
            if r.first_token_at is not None:
                ttfts.append(r.first_token_at - tr.t)
            if r.backend is not None and r.backend not in engine.gpus:
                external_interactive += 1
        if r.backend is not None and not r.failed:
            n = tr.prompt_tokens + tr.output_tokens
            tokens_by[r.backend] = tokens_by.get(r.backend, 0) + n
            b = min(int(tr.t // TIMELINE_BUCKET_S), nb - 1)
            if r.backend in engine.gpus:
                local_tl[b] += n
            else:
                ext_tl[b] += n
    tokens = sum(tokens_by.values())
    names = [*engine.gpus, *engine.providers]
    return PolicyResult(
        policy=engine.policy.name,
        requests=len(engine.reqs),
        failed=sum(r.failed for r in engine.reqs),
        tokens=tokens,
        gpu_cost_usd=sum(
            g.model.price_per_hour * max(trace.duration_s, engine.gpus[g.name].last_done) / 3600
            for g in sc.locals
        ),
        external_cost_usd=sum(r.cost_usd for r in engine.reqs),
        local_chargeback_usd=sum(r.chargeback_usd for r in engine.reqs),
        slo_attainment={k: v[0] / v[1] for k, v in sorted(met.items())},
        token_share={n: tokens_by.get(n, 0) / tokens if tokens else 0.0 for n in names},
        gpu_utilization={n: min(g.busy_s / trace.duration_s, 1.0) for n, g in engine.gpus.items()},
        mean_batch={n: (g.batch_s / g.busy_s if g.busy_s else 0.0) for n, g in engine.gpus.items()},
        ttft_p50_s=_quantile(ttfts, 0.5),
        ttft_p99_s=_quantile(ttfts, 0.99),
        interactive_external_fraction=external_interactive / n_interactive if n_interactive else 0,
        queued_requests=engine.queued_total,
        refused_attempts=engine.refusals,
        timeline=[(i * TIMELINE_BUCKET_S, local_tl[i], ext_tl[i]) for i in range(nb)],
        misses={c: dict(sorted(v.items())) for c, v in sorted(misses.items())},
    )


def meets_slo(r: SimRequest, slo: Slo) -> bool:
    """Did this request get what its class promised? Times count from arrival."""
    broken = _broken(r, slo)
    return broken is not None and not any(broken)


def _broken(r: SimRequest, slo: Slo) -> tuple[bool, bool, bool] | None:
    """Whether it broke its TTFT, ITL and total bounds; None: it got no whole answer."""
    if r.failed or r.first_token_at is None or r.done_at is None:
        return None
    t0, n = r.tr.t, r.tr.output_tokens
    return (
        slo.max_ttft_s is not None and r.first_token_at - t0 > slo.max_ttft_s,
        slo.max_itl_s is not None
        and n > 1
        and (r.done_at - r.first_token_at) / (n - 1) > slo.max_itl_s,
        slo.max_total_s is not None and r.done_at - t0 > slo.max_total_s,
    )


def miss_causes(r: SimRequest, slo: Slo, local: bool) -> tuple[str, ...]:
    """Which of its class's bounds a request broke, each prefixed by where it was served
    ("local ttft", "external itl", ...); ("failed",) when it got no whole answer; () when it
    met them all (`meets_slo`)."""
    broken = _broken(r, slo)
    if broken is None:
        return ("failed",)
    where = "local" if local else "external"
    return tuple(
        f"{where} {bound}" for bound, b in zip(("ttft", "itl", "total"), broken, strict=True) if b
    )
