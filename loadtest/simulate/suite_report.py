"""The referee's report: Markdown with both tables, the verdicts, and one plot per scenario."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from loadtest.simulate.results import PolicyResult
from loadtest.simulate.suite import (
    BOUND_GAP,
    SLO_TARGET,
    TIE,
    Outcome,
    attainment,
    detail_table,
    meets,
    summary_table,
)


def verdict_lines(outcomes: Sequence[Outcome]) -> list[str]:
    """One line per scenario: the two targets and the provisioning verdict."""
    out = []
    for o in outcomes:
        cheapest = "cheapest at the SLO" if o.cheapest_ok else "NOT cheapest at the SLO"
        near = "within" if o.within_bound else "NOT within"
        against = (
            f"{o.bound_gap:+.1%} against the bound ({near} {BOUND_GAP:.0%})"
            if o.bound.feasible
            else "no bound (no routing meets the SLO target)"
        )
        line = f"- **{o.name}**: cost policy {cheapest}, {against}"
        if o.notes:
            line += "; " + "; ".join(o.notes)
        out.append(line + ".")
    return out


def misses_text(r: PolicyResult) -> str:
    """`interactive: local itl 5, local ttft 2; batch: none`."""
    parts = []
    for cls in sorted(r.slo_attainment):
        causes = r.misses.get(cls, {})
        text = ", ".join(f"{c} {n}" for c, n in causes.items()) if causes else "none"
        parts.append(f"{cls}: {text}")
    return "; ".join(parts) if parts else "no requests"


def markdown(outcomes: Sequence[Outcome], command: str, png: str | None) -> str:
    """The full report."""
    held = sum(o.cheapest_ok for o in outcomes)
    feasible = [o for o in outcomes if o.feasible]
    held_feasible = sum(o.cheapest_ok for o in feasible)
    near = sum(o.within_bound for o in outcomes)
    lose = [o.name for o in outcomes if o.gpus_lose]
    impossible = [o.name for o in outcomes if not o.bound.feasible]
    lines = [
        "# neogate simulate --suite",
        "",
        f"`{command}`",
        "",
        "Each cell: $ per million tokens served (interactive SLO attainment). Total $ = local "
        "GPU-hours as held (the whole trace, busy or idle; on_demand GPUs are up the whole "
        "trace since neogate does not start or stop them) + external tokens at the list price "
        "in force. `no GPUs` is the same traffic on the cheapest provider only, with no GPU "
        "cost. `spill@N` is the best N of "
        "a sweep, chosen in hindsight. The bound is the hindsight lower bound "
        "(`loadtest/simulate/bound.py`). The schedule is the cheapest routing a search found "
        "offline with the whole trace known, starting from the cost policy's, where the cost "
        "policy is not within the bound's 10% (`loadtest/simulate/schedule.py`): a routing "
        "that runs and meets the SLO target, so the least-cost routing lies between the bound "
        "and it. Simulated GPUs run on the measured profile "
        "(`simulate.physics`), the router on its configured belief (`gpu.profile`).",
        "",
        summary_table(outcomes),
        "",
        f"Targets: the cost policy is the cheapest online policy on the fleet meeting "
        f">= {SLO_TARGET:.0%} interactive SLO (ties within {TIE:.0%}) in {held} of "
        f"{len(outcomes)} scenarios ({held_feasible} of the {len(feasible)} where some "
        f"policy on the fleet meets it), and within {BOUND_GAP:.0%} of the bound in {near} of "
        f"{len(outcomes)}. Owning the GPUs loses to no GPUs even with perfect routing in: "
        f"{', '.join(lose) if lose else 'none'}. No routing at all can meet the SLO target "
        f"(the bound's relaxation has no solution) in: "
        f"{', '.join(impossible) if impossible else 'none'}.",
        "",
        "## Verdicts",
        "",
        *verdict_lines(outcomes),
        "",
        "## Every policy",
        "",
        detail_table(outcomes),
        "",
        "## Why requests missed",
        "",
        "Per SLO class, the misses of the cost policy and of all-local by the bound broken and "
        "where the request was served (one that broke two bounds counts under both).",
        "",
        *(
            f"- {o.name}: cost policy ({misses_text(o.cost)}); all-local "
            f"({misses_text(o.by('all-local'))})"
            for o in outcomes
        ),
        "",
        "## spill@N sweeps",
        "",
    ]
    for o in outcomes:
        cells = ", ".join(
            f"{r.policy} {r.cost_per_million_tokens:.4f} ({attainment(r):.1%})"
            for r in o.spill_sweep
        )
        lines.append(f"- {o.name}: {cells}")
    lines.append("")
    if png:
        lines += [f"![cost per policy and scenario]({png})", ""]
    return "\n".join(lines)


def plot(outcomes: Sequence[Outcome], path: Path) -> None:
    """A bar chart of $/M per policy for every scenario, with the bound and no-GPU lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(outcomes)
    cols = 2
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.2 * rows), squeeze=False)
    for ax, o in zip(axes.flat, outcomes, strict=False):
        res = o.results
        names = [r.policy for r in res]
        values = [r.cost_per_million_tokens for r in res]
        colors = [
            "tab:blue" if r.policy == "cost" else ("tab:green" if meets(r) else "tab:gray")
            for r in res
        ]
        ax.bar(names, values, color=colors)
        if o.bound.feasible:
            ax.axhline(o.bound.cost_per_million_tokens, color="black", ls="--", lw=1, label="bound")
        if o.schedule is not None:
            ax.axhline(
                o.schedule.cost_per_million_tokens, color="black", ls=":", lw=1, label="schedule"
            )
        gap = f"cost {o.bound_gap:+.1%} vs bound" if o.bound.feasible else "no bound at SLO"
        ax.set_title(f"{o.name} ({gap})", fontsize=9)
        ax.set_ylabel("$/M tokens", fontsize=8)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(
        f"$/M per policy (blue: cost; green: other policies meeting {SLO_TARGET:.0%} "
        "interactive SLO; gray: missing it; dashed: hindsight bound; dotted: hindsight schedule)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
