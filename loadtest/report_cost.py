"""The cost part of `neogate report`: USD per million output tokens per backend by batch size.

Two sources, either or both: the modelled curve from a pricing sheet (a gateway policy YAML
stored in the results by `neogate loadtest --pricing`; local GPUs at hourly price over decode
throughput at that batch through the router's own cost model, external providers at list
price), and the measured points neogate's ledger reports for the run
(`GET /v1/usage?report=pricing&since=...`, per backend and batch-size bucket).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from loadtest.results import Results

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def pricing_sheet_from_config(path: Path) -> dict[str, Any]:
    """Prices of every backend in a gateway policy YAML, as plain JSON-able data."""
    from gateway.config import load_config

    cfg = load_config(path)
    backends = []
    for b in cfg.backends:
        entry: dict[str, Any] = {"name": b.name, "kind": b.kind, "local": b.is_local}
        if b.price is not None:
            entry["price"] = b.price.model_dump(mode="json")
        if b.model_prices:
            entry["model_prices"] = {
                m: p.model_dump(mode="json") for m, p in b.model_prices.items()
            }
        if b.gpu is not None:
            entry["gpu"] = b.gpu.model_dump(mode="json")
        backends.append(entry)
    return {"source": str(path), "backends": backends}


def cost_curves(pricing: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Backend -> [(batch, USD per million output tokens)] from a pricing sheet."""
    from policies.costmodel import GpuModel
    from policies.spec import GpuSpec

    out: dict[str, list[tuple[int, float]]] = {}
    for b in pricing.get("backends", []):
        name = str(b.get("name", "?"))
        if isinstance(b.get("gpu"), dict):
            model = GpuModel.from_spec(GpuSpec.model_validate(b["gpu"]))
            top = model.max_batch
            batches = sorted({*(x for x in BATCHES if x <= top), top})
            out[name] = [(x, model.cost_per_output_token(x) * 1e6) for x in batches]
        elif isinstance(b.get("price"), dict) and "output_per_million" in b["price"]:
            # An external provider charges the same per token at any batch.
            p = float(b["price"]["output_per_million"])
            out[name] = [(x, p) for x in BATCHES]
    return out


def bucket_x(label: str) -> float | None:
    """Where a batch bucket ("1", "2-4", "65+") sits on the batch axis (geometric middle)."""
    if label.endswith("+"):
        return float(label[:-1]) * 1.4
    lo, _, hi = label.partition("-")
    try:
        a = float(lo)
        b = float(hi) if hi else a
    except ValueError:
        return None
    return math.sqrt(a * b)


def measured_rows(runs: list[tuple[str, Results]]) -> list[dict[str, Any]]:
    """The ledger's pricing-sheet rows of every run that has them."""
    rows: list[dict[str, Any]] = []
    for _, res in runs:
        got = res.meta.get("pricing_measured")
        if isinstance(got, dict) and got.get("status") == 200 and isinstance(got.get("body"), dict):
            rows += [r for r in got["body"].get("data") or [] if isinstance(r, dict)]
    return rows


def plot_cost_vs_batch(
    curves: dict[str, list[tuple[int, float]]], measured: list[dict[str, Any]], path: Path
) -> None:
    """Modelled curves (lines) and measured ledger points (markers) per backend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    colors: dict[str, Any] = {}
    for name, pts in sorted(curves.items()):
        (line,) = ax.plot([b for b, _ in pts], [c for _, c in pts], label=f"{name} (model)")
        colors[name] = line.get_color()
    for r in measured:
        x, y = bucket_x(str(r.get("batch", ""))), r.get("charged_out_usd_per_m")
        name = str(r.get("backend"))
        if not isinstance(y, int | float) or y <= 0:
            continue
        if x is None:
            ax.axhline(y, linestyle=":", color=colors.get(name), label=f"{name} (ledger)")
            continue
        ax.scatter(
            [x],
            [y],
            marker="o",
            s=40,
            color=colors.get(name),
            edgecolors="black",
            label=f"{name} (ledger)",
            zorder=3,
        )
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (concurrent requests on the worker)")
    ax.set_ylabel("USD per million output tokens")
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=110)


def _fmt(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) and math.isfinite(v) else "-"


def cost_section(runs: list[tuple[str, Results]], out_dir: Path) -> list[str]:
    """Markdown (and cost_vs_batch.png) for the report's cost-per-batch part."""
    pricing = next(
        (r.meta["pricing"] for _, r in runs if isinstance(r.meta.get("pricing"), dict)), None
    )
    curves = cost_curves(pricing) if pricing else {}
    measured = measured_rows(runs)
    if not curves and not measured:
        return [
            "No pricing sheet in the results metadata (run `neogate loadtest --pricing "
            "POLICY.yaml` against neogate), so the cost-per-batch plot is omitted.",
            "",
        ]
    plot_cost_vs_batch(curves, measured, out_dir / "cost_vs_batch.png")
    md = ["![cost vs batch](cost_vs_batch.png)", ""]
    if curves:
        source = pricing.get("source", "?") if pricing else "?"
        md += [
            f"Modelled from the pricing sheet (`{source}`): USD per million output tokens, local "
            "GPUs at their hourly price over the decode throughput at that batch, external "
            "providers at their list price.",
            "",
            "| backend | " + " | ".join(f"b={b}" for b in BATCHES) + " |",
            "|---|" + "---:|" * len(BATCHES),
        ]
        for name, pts in sorted(curves.items()):
            by = dict(pts)
            md.append(f"| {name} | " + " | ".join(_fmt(by.get(b), 3) for b in BATCHES) + " |")
        md.append("")
    if measured:
        md += [
            "Measured by neogate's ledger during the run(s) (`GET /v1/usage?report=pricing`):",
            "",
            "| backend | batch | requests | prompt tok | output tok | $/M all | $/M out charged "
            "| $/M out list |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in measured:
            md.append(
                f"| {r.get('backend')} | {r.get('batch')} | {r.get('requests')} "
                f"| {r.get('prompt_tokens')} | {r.get('completion_tokens')} "
                f"| {_fmt(r.get('effective_usd_per_m'))} | {_fmt(r.get('charged_out_usd_per_m'))} "
                f"| {_fmt(r.get('list_out_usd_per_m'))} |"
            )
        md.append("")
    return md
