"""`neogate report`: saved load-test results -> a short Markdown report with PNG plots.

Plots: latency CDFs (end-to-end, TTFT, ITL), throughput over time, backend share over time,
and cost per million output tokens per backend against batch size (from the pricing sheet in
the results metadata, i.e. the gateway policy given to `neogate loadtest --pricing`).
matplotlib is imported only when plotting, with the Agg backend and no pyplot global state.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadtest.report_cost import cost_section
from loadtest.results import Dist, RequestRecord, Results, load_results, summarize
from loadtest.usage_api import describe_usage


def _label(res: Results, path: Path) -> str:
    m = res.meta
    return str(m.get("label") or path.stem)


def _bin_width(records: Sequence[RequestRecord]) -> float:
    span = max((r.end for r in records), default=1.0)
    for w in (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0):
        if span / w <= 120:
            return w
    return 120.0


def _cdf(ax: Any, values: list[float], label: str) -> None:
    v = sorted(x * 1e3 for x in values)
    if not v:
        return
    ys = [(i + 1) / len(v) for i in range(len(v))]
    ax.plot(v, ys, label=label, linewidth=1.4)


def plot_latency_cdfs(runs: list[tuple[str, Results]], path: Path) -> None:
    """End-to-end, TTFT and ITL CDFs, one line per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    metrics: tuple[tuple[str, Callable[[RequestRecord], float | None]], ...] = (
        ("end-to-end latency", lambda r: r.latency),
        ("time to first token", lambda r: r.ttft),
        ("inter-token latency", lambda r: r.itl),
    )
    for ax, (title, get) in zip(axes, metrics, strict=True):
        plotted = False
        for label, res in runs:
            vals = [v for r in res.records if r.ok and (v := get(r)) is not None and v > 0]
            _cdf(ax, vals, label)
            plotted = plotted or bool(vals)
        if not plotted:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("ms (log scale)")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.0)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    if len(runs) > 1:
        axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)


def plot_throughput(runs: list[tuple[str, Results]], path: Path) -> None:
    """Completed requests/s, errors/s and output tokens/s over time (by completion time)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 6), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    for label, res in runs:
        w = _bin_width(res.records)
        ok: Counter[int] = Counter()
        bad: Counter[int] = Counter()
        tok: Counter[int] = Counter()
        for r in res.records:
            b = int(r.end // w)
            if r.ok:
                ok[b] += 1
                tok[b] += r.completion_tokens if r.completion_tokens is not None else r.events
            else:
                bad[b] += 1
        n = max([*ok, *bad, 0]) + 1
        # One extra point repeats the last bin so steps-post draws it to its end.
        xs = [i * w for i in range(n + 1)]
        ax1.plot(
            xs,
            [ok[min(i, n - 1)] / w for i in range(n + 1)],
            label=f"{label} ok",
            drawstyle="steps-post",
        )
        if bad:
            ax1.plot(
                xs,
                [bad[min(i, n - 1)] / w for i in range(n + 1)],
                label=f"{label} errors",
                drawstyle="steps-post",
                linestyle="--",
            )
        ax2.plot(
            xs, [tok[min(i, n - 1)] / w for i in range(n + 1)], label=label, drawstyle="steps-post"
        )
    ax1.set_ylabel("requests/s")
    ax1.legend(fontsize=8)
    ax1.grid(True, alpha=0.3)
    ax2.set_ylabel("output tokens/s")
    ax2.set_xlabel("seconds since start")
    ax2.grid(True, alpha=0.3)
    fig.savefig(path, dpi=110)


def plot_backend_share(runs: list[tuple[str, Results]], path: Path) -> bool:
    """Share of completed requests per backend over time; False when no run names backends."""
    with_backends = [(lbl, res) for lbl, res in runs if any(r.backend for r in res.records)]
    if not with_backends:
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3 * len(with_backends)), layout="constrained")
    axes = fig.subplots(len(with_backends), 1, squeeze=False)[:, 0]
    for ax, (label, res) in zip(axes, with_backends, strict=True):
        w = _bin_width(res.records)
        counts: dict[str, Counter[int]] = defaultdict(Counter)
        totals: Counter[int] = Counter()
        for r in res.records:
            if r.ok:
                b = int(r.end // w)
                counts[r.backend or "(none)"][b] += 1
                totals[b] += 1
        n = max(totals, default=0) + 1
        xs = [i * w for i in range(n + 1)]
        names = sorted(counts)
        last = [min(i, n - 1) for i in range(n + 1)]
        ys = [[counts[k][i] / totals[i] if totals[i] else 0.0 for i in last] for k in names]
        ax.stackplot(xs, ys, labels=names, step="post")
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of requests")
        ax.set_title(label)
        ax.legend(fontsize=8, loc="upper right")
    axes[-1].set_xlabel("seconds since start")
    fig.savefig(path, dpi=110)
    return True


def _ms(d: Dist | None, attr: str) -> str:
    return f"{getattr(d, attr) * 1e3:.2f}" if d is not None else "-"


def _settings_table(runs: list[tuple[str, Results]]) -> list[str]:
    keys = (
        "url",
        "mode",
        "schedule",
        "duration",
        "max_requests",
        "stream_ratio",
        "prompt_tokens",
        "max_tokens",
        "model",
        "client",
        "seed",
        "started_at",
    )
    lines = [
        "| setting | " + " | ".join(lbl for lbl, _ in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(str(r.meta.get(k, "-")) for _, r in runs) + " |")
    lines.append(
        "| tenants | "
        + " | ".join(str(len(r.meta.get("tenants") or {}) or 1) for _, r in runs)
        + " |"
    )
    return lines


def _summary_table(runs: list[tuple[str, Results]]) -> list[str]:
    lines = [
        "| run | requests | ok | req/s | out tok/s | e2e p50 | e2e p90 | e2e p99 "
        "| TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, res in runs:
        s = summarize(res.records)
        errs = ", ".join(f"{k}: {v}" for k, v in s.errors.items()) or "none"
        lines.append(
            f"| {label} | {s.requests} | {s.ok} | {s.req_per_s:.1f} | {s.output_tokens_per_s:.0f}"
            f" | {_ms(s.e2e, 'p50')} | {_ms(s.e2e, 'p90')} | {_ms(s.e2e, 'p99')}"
            f" | {_ms(s.ttft, 'p50')} | {_ms(s.ttft, 'p99')} | {_ms(s.itl, 'p50')}"
            f" | {_ms(s.itl, 'p99')} | {errs} |"
        )
    return lines


def write_report(paths: Sequence[Path], out_dir: Path, title: str | None = None) -> Path:
    """Write report.md and its PNGs into `out_dir`; returns the Markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [(_label(res, p), res) for p in paths for res in [load_results(p)]]
    md = [f"# {title or 'neogate load test'}", ""]
    first = runs[0][1].meta
    machine = first.get("machine") or {}
    if machine:
        md.append(
            f"Machine: {machine.get('cpus')} CPUs, {machine.get('processor')}, "
            f"{machine.get('platform')}, Python {machine.get('python')}."
        )
        md.append("")
    md += [
        "## Settings",
        "",
        *_settings_table(runs),
        "",
        "## Results (latencies in ms)",
        "",
        *_summary_table(runs),
        "",
    ]
    md += ["## Latency distributions", "", "![latency CDFs](latency_cdf.png)", ""]
    plot_latency_cdfs(runs, out_dir / "latency_cdf.png")
    md += ["## Throughput over time", "", "![throughput](throughput.png)", ""]
    plot_throughput(runs, out_dir / "throughput.png")
    md += ["## Backend share over time", ""]
    if plot_backend_share(runs, out_dir / "backend_share.png"):
        md += ["![backend share](backend_share.png)", ""]
    else:
        md += [
            "No response carried an `x-neogate-backend` header, so there is no backend "
            "share to plot (the target was not neogate, or it does not send the header).",
            "",
        ]
    md += ["## Cost", ""]
    for label, res in runs:
        if "usage_after" in res.meta:
            md += [f"{label}:", "", "```", describe_usage(res.meta), "```", ""]
    md += cost_section(runs, out_dir)
    report = out_dir / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")
    return report


def add_report_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `report` on a subparsers object."""
    p = subparsers.add_parser("report", help="turn load-test results into Markdown with plots")
    configure_parser(p)


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add the report options to `p`."""
    p.add_argument("results", nargs="+", help="results files (.jsonl or .csv)")
    p.add_argument("--out", default=None, help="output directory (default: beside the first file)")
    p.add_argument("--title", default=None, help="report title")


def run_report(args: argparse.Namespace) -> int:
    """Entry point of `neogate report`."""
    paths = [Path(p) for p in args.results]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"neogate report: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    out = (
        Path(args.out)
        if args.out
        else paths[0].with_suffix("").with_name(paths[0].stem + "-report")
    )
    try:
        report = write_report(paths, out, args.title)
    except ImportError as exc:
        print(
            f"neogate report: needs matplotlib (pip install 'neogate[plots]'): {exc}",
            file=sys.stderr,
        )
        return 2
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtest.report`."""
    p = argparse.ArgumentParser(prog="neogate report")
    configure_parser(p)
    return run_report(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
