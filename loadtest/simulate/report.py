"""Simulator output: the JSON summary, the goal check, a Markdown report and a PNG plot."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.simulate.results import PolicyResult
from loadtest.simulate.scenario import Scenario
from loadtest.simulate.traces import Trace, offered_concurrency

SLO_TARGET = 0.99
SAVING_TARGET = 0.30


@dataclass(frozen=True, slots=True)
class GoalCheck:
    """The issue's goal: cost policy >= 99% interactive SLO and >= 30% cheaper than the best
    baseline that also meets it."""

    cost_attainment: float
    cost_per_million: float
    best_baseline: str | None
    best_baseline_per_million: float | None
    saving: float | None
    met: bool

    def sentence(self) -> str:
        """One line saying whether the goal is met, with the numbers."""
        head = (
            f"cost policy: {self.cost_attainment:.2%} interactive SLO, "
            f"${self.cost_per_million:.4f} per million tokens"
        )
        if self.best_baseline is None or self.saving is None:
            return (
                f"{head}; no baseline meets the {SLO_TARGET:.0%} SLO target -> goal not assessable"
            )
        verdict = "MET" if self.met else "NOT MET"
        diff = (
            f"{self.saving:.1%} cheaper"
            if self.saving >= 0
            else f"{-self.saving:.1%} more expensive"
        )
        return (
            f"{head}; best baseline meeting the SLO: {self.best_baseline} "
            f"${self.best_baseline_per_million:.4f} -> {diff}; goal {verdict}"
        )


def goal_check(results: list[PolicyResult]) -> GoalCheck:
    """Compare the `cost` policy with the cheapest baseline that meets the SLO target."""
    by = {r.policy: r for r in results}
    cost = by["cost"]
    att = cost.slo_attainment.get("interactive", 0.0)
    meeting = [
        r
        for r in results
        if r.policy != "cost" and r.slo_attainment.get("interactive", 0.0) >= SLO_TARGET
    ]
    if not meeting:
        return GoalCheck(att, cost.cost_per_million_tokens, None, None, None, False)
    best = min(meeting, key=lambda r: r.cost_per_million_tokens)
    saving = 1.0 - cost.cost_per_million_tokens / best.cost_per_million_tokens
    met = att >= SLO_TARGET and saving >= SAVING_TARGET
    return GoalCheck(
        att, cost.cost_per_million_tokens, best.policy, best.cost_per_million_tokens, saving, met
    )


def results_json(results: list[PolicyResult]) -> dict[str, Any]:
    """{policy: {cost_per_million_tokens, slo_attainment (interactive), ...}}."""
    return {r.policy: r.as_json() for r in results}


def table(results: list[PolicyResult]) -> str:
    """A Markdown table of the headline numbers (also printed by the CLI)."""
    backends = list(results[0].token_share) if results else []
    gpus = list(results[0].gpu_utilization) if results else []
    head = (
        "| policy | $/M tokens | total $ | external $ | interactive SLO | batch SLO | "
        "TTFT p50 / p99 (s) | "
        + " | ".join(f"share {b}" for b in backends)
        + " | "
        + " | ".join(f"busy {g} (mean batch)" for g in gpus)
        + " |"
    )
    sep = "|" + "---|" * (7 + len(backends) + len(gpus))
    rows = [head, sep]
    for r in results:
        att = r.slo_attainment
        rows.append(
            f"| {r.policy} | {r.cost_per_million_tokens:.4f} | {r.total_cost_usd:.2f} | "
            f"{r.external_cost_usd:.2f} | {att.get('interactive', math.nan):.2%} | "
            f"{att.get('batch', math.nan):.2%} | {r.ttft_p50_s:.2f} / {r.ttft_p99_s:.2f} | "
            + " | ".join(f"{r.token_share[b]:.1%}" for b in backends)
            + " | "
            + " | ".join(f"{r.gpu_utilization[g]:.0%} ({r.mean_batch[g]:.0f})" for g in gpus)
            + " |"
        )
    return "\n".join(rows)


def _limits(results: list[PolicyResult], check: GoalCheck) -> list[str]:
    by = {r.policy: r for r in results}
    cost = by["cost"]
    out = [
        f"- Reserved GPUs cost ${cost.gpu_cost_usd:.2f} over the trace whether busy or idle: "
        f"{cost.gpu_cost_usd / cost.total_cost_usd:.0%} of the cost policy's total. No policy "
        f"can go below ${cost.gpu_cost_usd / cost.tokens * 1e6:.4f}/M (everything local, free "
        "at the margin); the cost policy's extra is what it spills to keep the SLO "
        f"(${cost.external_cost_usd:.2f}, {cost.interactive_external_fraction:.1%} of "
        f"interactive requests; {cost.queued_requests} batch requests waited for local room).",
    ]
    local = by.get("always-local-until-error")
    if local is not None:
        out.append(
            f"- Local-only is cheaper (${local.cost_per_million_tokens:.4f}/M) but meets the "
            f"interactive SLO for only {local.slo_attainment.get('interactive', 0):.2%}: in bursts, "
            "queued prefill delays first tokens and prefill steals decode time from running "
            "requests."
        )
    ext = by.get("cheapest-external")
    if ext is not None:
        g, s, e = cost.gpu_cost_usd, cost.external_cost_usd, ext.external_cost_usd
        need = (SAVING_TARGET * g + s) / (1.0 - SAVING_TARGET)
        out.append(
            f"- The saving against all-external comes from using GPUs that are paid anyway "
            f"({statistics.mean(cost.gpu_utilization.values()):.0%} busy here). Sending "
            f"everything to the cheapest provider would cost ${e:.2f} on top of the GPUs' "
            f"${g:.2f}; a {SAVING_TARGET:.0%} saving needs that to be at least ${need:.2f} "
            f"(= ({SAVING_TARGET:.1f} x GPU + spill) / {1 - SAVING_TARGET:.1f}). At lower load "
            "the reserved GPUs are idle money and the saving shrinks, then reverses."
        )
    out.append(
        f"- Chargeback of local tokens at the batch each request shared: "
        f"${cost.local_chargeback_usd:.2f} of the ${cost.gpu_cost_usd:.2f} GPU cost; the "
        "rest is idle time and decode time lost to prefill interference."
    )
    out.append(
        "- The simulated GPUs run the profile's measured figures through the simulator's own "
        "model of the hardware (loadtest/simulate/physics.py: chunked-prefill steps timed as "
        "a roofline, per-request prefill speed noise), not the router's cost model: what the "
        "router mispredicts it must learn as prediction error (2-sigma margin). Real workers "
        "add preemption and prefix caching this model does not have."
    )
    if not check.met:
        out.append(f"- Goal not met in this run: {check.sentence()}.")
    return out


def markdown(
    trace: Trace,
    scenario: Scenario,
    results: list[PolicyResult],
    seed: int,
    png_name: str | None,
) -> str:
    """The full Markdown report."""
    reqs = trace.requests
    n = len(reqs)
    inter = sum(r.slo_class == "interactive" for r in reqs)
    conc = [c for _, c in offered_concurrency(trace)]
    check = goal_check(results)
    lines = [
        f"# neogate simulate: trace `{trace.name}`, seed {seed}",
        "",
        f"{n} requests over {trace.duration_s:.0f} s ({inter / n:.0%} interactive); "
        f"mean prompt {statistics.mean(r.prompt_tokens for r in reqs):.0f} tokens, "
        f"mean output {statistics.mean(r.output_tokens for r in reqs):.0f}; offered concurrency "
        f"(10 s buckets) {min(conc):.0f} to {max(conc):.0f}.",
        "",
        "## Backends",
        "",
    ]
    for g in scenario.locals:
        m = g.model
        lines.append(
            f"- `{g.name}`: local GPU, {m.mode} at ${m.price_per_hour:.2f}/h, profile "
            f"`{m.profile.name or 'custom'}` (decode at context {m.profile.reference_context}: "
            f"{dict(m.points)} tokens/s; measured contexts {list(m.profile.contexts)}), "
            f"prefill {m.prefill_tokens_per_s:.0f} tokens/s at 512, max batch {m.max_batch}."
        )
    for p in scenario.providers:
        lines.append(
            f"- `{p.name}`: ${p.input_per_million}/{p.output_per_million} per M in/out; TTFT "
            f"median {p.ttft_median_s}s + prompt/{p.prefill_tokens_per_s:.0f}/s (lognormal "
            f"sigma {p.ttft_sigma}); ITL median {p.itl_median_s * 1000:.2f} ms (sigma {p.itl_sigma})."
        )
    lines += ["", "SLO classes: "]
    for name, slo in scenario.slo_classes.items():
        lines.append(
            f"- `{name}`: max TTFT {slo.max_ttft_s}, max ITL {slo.max_itl_s}, max total "
            f"{slo.max_total_s}, may queue {slo.max_queue_wait_s} s (times from arrival)."
        )
    lines += [
        "",
        "## Accounting",
        "",
        "Cost = local GPU-hours as held (the whole trace, busy or idle, and as long after it "
        "as a policy keeps a GPU working) + external spend at list prices. Tokens = prompt + "
        "completion tokens served. The GPUs are charged to every policy, including those "
        "that never use them (`neogate simulate --suite` adds a no-GPU fleet and a bound).",
        "",
        "## Results",
        "",
        table(results),
        "",
        f"**Goal** (cost policy >= {SLO_TARGET:.0%} interactive SLO and >= "
        f"{SAVING_TARGET:.0%} cheaper than the best baseline meeting it): {check.sentence()}.",
        "",
        "## What limits it",
        "",
        *_limits(results, check),
        "",
    ]
    if png_name:
        lines += [f"![timeline and cost per policy]({png_name})", ""]
    return "\n".join(lines)


def plot(trace: Trace, results: list[PolicyResult], path: Path) -> None:
    """Offered concurrency with the cost policy's local/external split, and $/M per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7.5))
    oc = offered_concurrency(trace)
    ax1.plot([t for t, _ in oc], [c for _, c in oc], color="black", label="offered concurrency")
    ax1.set_xlabel("time (s)")
    ax1.set_ylim(bottom=0)
    ax1.set_ylabel("offered concurrency")
    cost = next((r for r in results if r.policy == "cost"), None)
    if cost is not None:
        ax1b = ax1.twinx()
        ts = [t for t, _, _ in cost.timeline]
        width = ts[1] - ts[0] if len(ts) > 1 else 10.0
        loc = [lt / width for _, lt, _ in cost.timeline]
        ext = [et / width for _, _, et in cost.timeline]
        ax1b.bar(ts, loc, width=width, align="edge", alpha=0.35, color="tab:blue", label="local")
        ax1b.bar(
            ts,
            ext,
            width=width,
            align="edge",
            bottom=loc,
            alpha=0.5,
            color="tab:red",
            label="external",
        )
        ax1b.set_ylabel("cost policy: tokens/s by destination")
        ax1b.legend(loc="upper right")
    ax1.legend(loc="upper left")
    ax1.set_title(f"trace {trace.name}")
    names = [r.policy for r in results]
    values = [r.cost_per_million_tokens for r in results]
    colors = [
        "tab:green" if r.slo_attainment.get("interactive", 0) >= SLO_TARGET else "tab:gray"
        for r in results
    ]
    bars = ax2.bar(names, values, color=colors)
    for bar, r in zip(bars, results, strict=True):
        ax2.annotate(
            f"SLO {r.slo_attainment.get('interactive', 0):.1%}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax2.set_ylabel("$ per million tokens")
    ax2.set_title(f"cost per policy (green: interactive SLO >= {SLO_TARGET:.0%})")
    ax2.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
