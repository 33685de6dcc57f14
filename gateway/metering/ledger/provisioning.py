"""Provisioning truth: does each local GPU pay for itself over a window, and at what load would it.

Per local backend, from the ledger and the GPU's terms in the policy file (price per
hour, profile): hours held, tokens, mean batch, load against b*, attributed $/M (what the
ledger charged its requests), the GPU's own cost per million tokens it served (the hours
held, idle time included), the counterfactual (what the cheapest external candidate that
met each request's SLO would have charged for the same tokens), the net saving (can be
negative), the break-even load against that external price, and one line of advice.

Hours held: a reserved GPU's are the window; an on_demand GPU's are its observed uptime in
the window (the gateway's scrapes of the worker, `gpu_uptime`; `gateway/metering/uptime.py`),
unknown when none was observed (see docs/economics.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from gateway.config import GatewayConfig
from gateway.metering.ledger.gpu_uptime import uptime_spans
from gateway.metering.ledger.rows import LedgerStore
from gateway.metering.money import NUSD_PER_USD
from gateway.metering.uptime import Held, HeldFrom, held
from policies.costmodel import GpuModel

# The window of the Prometheus gauges and of /admin/backends (unless ?window= says otherwise).
PROVISIONING_WINDOW_S = 3600.0


@dataclass(frozen=True, slots=True)
class GpuTerms:
    """What the policy file says about one local GPU backend."""

    backend: str
    mode: str
    price_per_hour: float
    # b*: largest batch meeting the tightest ITL target of the SLO classes (reference context).
    slo_batch: int
    # Output tokens/s the profile gives at b* (the most this GPU serves within the SLO).
    tokens_per_s_at_slo_batch: float
    # Cheapest external list price for the models it serves, (input + output) / 2 per token:
    # the fallback counterfactual when the ledger has none for the window.
    list_usd_per_token: float | None


def gpu_terms(config: GatewayConfig) -> dict[str, GpuTerms]:
    """The terms of every local backend with a `gpu` in `config`."""
    itls = [c.max_itl_s for c in config.slo_classes.values() if c.max_itl_s is not None]
    target = min(itls) if itls else None
    out: dict[str, GpuTerms] = {}
    for b in config.backends:
        if not b.is_local or b.gpu is None:
            continue
        model = GpuModel.from_spec(b.gpu)
        b_star = model.slo_batch(target)
        prices = [
            (p.input_per_million + p.output_per_million) / 2e6
            for other in config.backends
            if not other.is_local
            for m in b.models
            if m in other.models and (p := other.price_for(m)) is not None
        ]
        out[b.name] = GpuTerms(
            b.name,
            b.gpu.mode,
            b.gpu.price_per_hour,
            b_star,
            model.throughput(b_star) if b_star else 0.0,
            min(prices) if prices else None,
        )
    return out


@dataclass(frozen=True, slots=True)
class Provisioning:
    """One local GPU over one window."""

    backend: str
    mode: str
    since: float
    until: float
    # Reserved: the window. On_demand: observed uptime; None when none was observed.
    hours_held: float | None
    hours_from: HeldFrom
    observed_up_hours: float | None  # uptime the scrapes saw in the window (either mode)
    gpu_cost_usd: float | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    tokens_per_s: float
    # Token-weighted batch size the requests saw; and requests in flight, time-averaged
    # over the window (idle time included).
    mean_batch: float | None
    mean_concurrency: float
    slo_batch: int
    utilisation: float | None  # mean concurrency / b*
    attributed_usd: float
    attributed_usd_per_m: float | None
    held_usd_per_m: float | None  # the hours held over the tokens served
    counterfactual_usd: float | None
    counterfactual_usd_per_m: float | None
    # Share of the window's tokens whose counterfactual the ledger recorded; the rest are
    # priced at the same rate (or the list price when none is recorded).
    counterfactual_coverage: float
    net_saving_usd: float | None  # counterfactual - GPU cost held; negative: it does not pay
    break_even_tokens_per_s: float | None
    advice: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


async def provisioning(
    store: LedgerStore,
    terms: Mapping[str, GpuTerms],
    *,
    since: float | None,
    until: float | None,
    now: float,
) -> list[Provisioning]:
    """Provisioning truth for every GPU in `terms` over [since, until) (until: now).

    Without `since` the window starts at the backend's first ledger row or first observed
    uptime, whichever is earlier (at the end if neither).
    """
    end = until if until is not None else now
    clauses, params = ["is_local = ?", "ts < ?"], [True, end]
    if since is not None:
        clauses.append("ts >= ?")
        params.append(since)
    sql = (
        "SELECT backend, COUNT(DISTINCT request_id), SUM(prompt_tokens), SUM(completion_tokens), "
        "SUM(cost_nusd), SUM(total_s), "
        "SUM(CAST(completion_tokens AS DOUBLE PRECISION) * batch_size), "
        "SUM(CASE WHEN batch_size IS NULL THEN 0 ELSE completion_tokens END), "
        "SUM(counterfactual_cost_nusd), "
        "SUM(CASE WHEN counterfactual_cost_nusd IS NULL THEN 0 "
        "ELSE prompt_tokens + completion_tokens END), MIN(ts) "
        f"FROM ledger WHERE {' AND '.join(clauses)} GROUP BY backend"
    )
    found = {rec[0]: rec[1:] for rec in await store.fetch(sql, params)}
    spans = await uptime_spans(store, since, end)
    out = []
    for name, t in terms.items():
        rec = found.get(name)
        if rec is None:
            rec = (0, 0, 0, 0, 0.0, 0.0, 0, None, 0, None)
        reqs, p_tok, c_tok, cost, busy_s, w_batch, c_batched, cf, cf_tok, first = rec
        up = spans.get(name, [])
        firsts = [float(first)] if first is not None else []
        firsts += [min(s.start for s in up)] if up else []
        start = since if since is not None else min(firsts, default=end)
        out.append(
            _truth(
                t,
                start,
                end,
                held(t.mode, up, start, end),
                int(reqs or 0),
                int(p_tok or 0),
                int(c_tok or 0),
                int(cost or 0),
                float(busy_s or 0.0),
                float(w_batch or 0.0),
                int(c_batched or 0),
                None if cf is None else int(cf),
                int(cf_tok or 0),
            )
        )
    return out


def _truth(
    t: GpuTerms,
    since: float,
    until: float,
    kept: Held,
    reqs: int,
    p_tok: int,
    c_tok: int,
    cost_nusd: int,
    busy_s: float,
    w_batch: float,
    c_batched: int,
    cf_nusd: int | None,
    cf_tokens: int,
) -> Provisioning:
    hours = None if kept.seconds is None else kept.seconds / 3600.0
    gpu_usd = None if hours is None else hours * t.price_per_hour
    # Rates are per second held: what an on_demand GPU served while up is what its break-even
    # compares with (the window when none was observed, or nothing measurable).
    held_s = kept.seconds if kept.seconds else max(until - since, 0.0)
    tokens = p_tok + c_tok
    attributed = cost_nusd / NUSD_PER_USD
    mean_conc = busy_s / held_s if held_s > 0 else 0.0
    # The counterfactual rate: what the ledger recorded, else the cheapest list price.
    rate: float | None = None
    if cf_nusd is not None and cf_tokens > 0:
        rate = cf_nusd / NUSD_PER_USD / cf_tokens
    elif t.list_usd_per_token is not None:
        rate = t.list_usd_per_token
    counterfactual = None if rate is None else rate * tokens
    per_s = t.price_per_hour / 3600.0
    p = Provisioning(
        backend=t.backend,
        mode=t.mode,
        since=since,
        until=until,
        hours_held=hours,
        hours_from=kept.held_from,
        observed_up_hours=None if kept.observed_s is None else kept.observed_s / 3600.0,
        gpu_cost_usd=gpu_usd,
        requests=reqs,
        prompt_tokens=p_tok,
        completion_tokens=c_tok,
        tokens_per_s=tokens / held_s if held_s > 0 else 0.0,
        mean_batch=w_batch / c_batched if c_batched else None,
        mean_concurrency=mean_conc,
        slo_batch=t.slo_batch,
        utilisation=mean_conc / t.slo_batch if t.slo_batch else None,
        attributed_usd=attributed,
        attributed_usd_per_m=attributed * 1e6 / tokens if tokens else None,
        held_usd_per_m=gpu_usd * 1e6 / tokens if tokens and gpu_usd is not None else None,
        counterfactual_usd=counterfactual,
        counterfactual_usd_per_m=None if rate is None else rate * 1e6,
        counterfactual_coverage=cf_tokens / tokens if tokens else 0.0,
        net_saving_usd=(
            None if counterfactual is None or gpu_usd is None else counterfactual - gpu_usd
        ),
        break_even_tokens_per_s=per_s / rate if rate else None,
        advice="",
    )
    return _with_advice(p, t)


def _with_advice(p: Provisioning, t: GpuTerms) -> Provisioning:
    return replace(p, advice=advice(p, t))


def _rate(x: float) -> str:
    if x >= 1000:
        return f"{x / 1000:.1f}k"
    return f"{x:.0f}" if x >= 10 or x == 0 else f"{x:.2g}"


def advice(p: Provisioning, t: GpuTerms) -> str:
    """One line: does this GPU pay, and above what load would it."""
    if p.until <= p.since:
        return f"{p.backend}: no window to judge (no ledger rows, no uptime and no --since)"
    ext = p.counterfactual_usd_per_m
    batch = "no requests" if p.mean_batch is None else f"mean batch {p.mean_batch:.0f}"
    window_h = (p.until - p.since) / 3600.0
    if p.hours_held is None or p.gpu_cost_usd is None:
        head = (
            f"{p.backend} (on_demand): no uptime observed in the window's {window_h:.1f} h, "
            "so the hours it was held are unknown"
        )
    elif p.held_usd_per_m is None:
        head = f"{p.backend} served nothing in {p.hours_held:.1f} h (${p.gpu_cost_usd:.2f} held)"
    else:
        head = f"at {batch} {p.backend} costs ${p.held_usd_per_m:.2f}/M"
        if ext is not None:
            head += f" against ${ext:.2f}/M external"
    if p.hours_from == "uptime" and p.hours_held is not None:
        head += f" (on_demand: up {p.hours_held:.2f} h of the window's {window_h:.2f} h, observed)"
    if p.break_even_tokens_per_s is None:
        return head + "; no external price to compare with"
    be = p.break_even_tokens_per_s
    line = f"{head}; it pays above {_rate(be)} tokens/s (served {_rate(p.tokens_per_s)}/s)"
    if p.net_saving_usd is not None:
        word = "saved" if p.net_saving_usd >= 0 else "lost"
        line += f", {word} ${abs(p.net_saving_usd):.2f} over the window"
    # Output tokens/s at b* bound what it can serve within the SLO; prompts add to them,
    # so this is a hint, not a proof.
    if t.tokens_per_s_at_slo_batch and be > 4 * t.tokens_per_s_at_slo_batch:
        line += (
            f"; it decodes at most ~{_rate(t.tokens_per_s_at_slo_batch)} output tokens/s at "
            f"b*={t.slo_batch}: it is unlikely to pay at any load"
        )
    return line


def provisioning_gauges_values(rows: list[Provisioning]) -> dict[str, dict[str, float]]:
    """{gauge suffix: {backend: value}} for the Prometheus gauges (NaN where unknown)."""

    def val(x: float | None) -> float:
        return math.nan if x is None else float(x)

    out: dict[str, dict[str, float]] = {
        "hours_held": {},
        "tokens": {},
        "mean_batch": {},
        "utilisation_ratio": {},
        "attributed_usd_per_million": {},
        "held_usd_per_million": {},
        "counterfactual_usd": {},
        "net_saving_usd": {},
        "break_even_tokens_per_second": {},
    }
    for r in rows:
        out["hours_held"][r.backend] = val(r.hours_held)
        out["tokens"][r.backend] = float(r.prompt_tokens + r.completion_tokens)
        out["mean_batch"][r.backend] = val(r.mean_batch)
        out["utilisation_ratio"][r.backend] = val(r.utilisation)
        out["attributed_usd_per_million"][r.backend] = val(r.attributed_usd_per_m)
        out["held_usd_per_million"][r.backend] = val(r.held_usd_per_m)
        out["counterfactual_usd"][r.backend] = val(r.counterfactual_usd)
        out["net_saving_usd"][r.backend] = val(r.net_saving_usd)
        out["break_even_tokens_per_second"][r.backend] = val(r.break_even_tokens_per_s)
    return out
