"""Rendering of the side-by-side benchmark: per-cell medians, tables with ratios, goals, Markdown."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from loadtest.compare_procs import git_commit
from loadtest.loadgen import machine_info

MODES = ("buffered", "streamed")
WRK_MODE = "buffered-wrk"  # maximum throughput, measured with wrk


@dataclass
class Cell:
    """Results of one (mode, level, target) over the repeats."""

    req_per_s: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    ttft_p50: list[float] = field(default_factory=list)
    errors: int = 0
    requests: int = 0
    cpu_ms_per_req: list[float] = field(default_factory=list)

    def med(self, name: str) -> float | None:
        vals: list[float] = getattr(self, name)
        return statistics.median(vals) if vals else None


def fmt_ms(v: float | None) -> str:
    return f"{v * 1e3:8.2f}" if v is not None else "       -"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3g}x" if a and b else "-"


def _added(c: Cell, direct: Cell | None, attr: str) -> str:
    """What a gateway adds over the direct path, in ms (blank for the direct path itself)."""
    a, b = c.med(attr), direct.med(attr) if direct is not None else None
    return f"{(a - b) * 1e3:+.2f}" if a is not None and b is not None and c is not direct else ""


def render_tables(
    cells: dict[tuple[str, int, str], Cell], names: list[str], modes: list[str], levels: list[int]
) -> list[str]:
    """Markdown tables: per mode, per level, per target, with ratios to LiteLLM."""
    md: list[str] = []
    for mode in modes:
        first = "TTFT p50" if mode == "streamed" else "p50"
        md += [
            f"### {mode}",
            "",
            "| conc | target | req/s | p50 ms | p99 ms | TTFT p50 ms "
            f"| {first} added vs direct ms | server CPU ms/req "
            "| errors | req/s vs LiteLLM | p99 vs LiteLLM |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for level in levels:
            ref = cells.get((mode, level, "litellm"))
            direct = cells.get((mode, level, "direct"))
            for name in names:
                c = cells.get((mode, level, name))
                if c is None:
                    continue
                rps, p99 = c.med("req_per_s"), c.med("p99")
                ttft = fmt_ms(c.med("ttft_p50")).strip() if mode == "streamed" else "-"
                cpu = c.med("cpu_ms_per_req")
                added = _added(c, direct, "ttft_p50" if mode == "streamed" else "p50")
                ratio_rps = _ratio(rps, ref.med("req_per_s")) if ref and name != "litellm" else ""
                ratio_p99 = _ratio(p99, ref.med("p99")) if ref and name != "litellm" else ""
                md.append(
                    f"| {level} | {name} | {rps or 0:.1f} | {fmt_ms(c.med('p50')).strip()} "
                    f"| {fmt_ms(p99).strip()} | {ttft} | {added} "
                    f"| {f'{cpu:.3f}' if cpu is not None else '-'} | {c.errors}/{c.requests} "
                    f"| {ratio_rps} | {ratio_p99} |"
                )
        md.append("")
    return md


def goals(cells: dict[tuple[str, int, str], Cell], levels: list[int]) -> list[str]:
    """The issue's three goals, checked against this run."""

    def med(mode: str, level: int, name: str, attr: str) -> float | None:
        c = cells.get((mode, level, name))
        return c.med(attr) if c else None

    def best(name: str) -> tuple[float, str] | None:
        """The highest error-free median throughput (wrk runs where there are any)."""
        got: list[tuple[float, str]] = []
        for (mode, lv, n), c in cells.items():
            v = c.med("req_per_s")
            if n == name and mode in (WRK_MODE, "buffered") and c.errors == 0 and v:
                got.append((v, f"{mode} c={lv}"))
        wrk = [g for g in got if g[1].startswith(WRK_MODE)]
        return max(wrk or got) if got else None

    out: list[str] = []
    ng, ll = best("neogate"), best("litellm")
    if ng and ll:
        r = ng[0] / ll[0]
        out.append(
            f"- max buffered throughput without errors: neogate {ng[0]:.0f} req/s ({ng[1]}), "
            f"LiteLLM {ll[0]:.0f} req/s ({ll[1]}): {r:.1f}x "
            f"(goal >= 30x: {'met' if r >= 30 else 'NOT met'})"
        )
    ok_levels = [
        lv
        for lv in levels
        for m in MODES
        if (c := cells.get((m, lv, "litellm"))) and c.errors == 0 and c.requests
    ]
    worse = [
        (m, lv)
        for m in MODES
        for lv in sorted(set(ok_levels))
        if (a := med(m, lv, "neogate", "p99")) and (b := med(m, lv, "litellm", "p99")) and a >= b
    ]
    if ok_levels and any(("buffered", lv, "neogate") in cells for lv in levels):
        out.append(
            "- p99 below LiteLLM's at every level LiteLLM sustains without errors: "
            + ("met" if not worse else f"NOT met at {worse}")
        )
    d, n = med("streamed", 1, "direct", "ttft_p50"), med("streamed", 1, "neogate", "ttft_p50")
    if d is not None and n is not None:
        added = (n - d) * 1e3
        out.append(
            f"- streaming TTFT p50 added by neogate at concurrency 1: {added:.3f} ms "
            f"(goal < 1 ms: {'met' if added < 1 else 'NOT met'})"
        )
    return out or ["- (needs neogate and LiteLLM in the run)"]


def plots(out: Path, names: list[str], modes: list[str], level: int) -> list[str]:
    """A `neogate report` per mode over the targets at the top level (first repeat)."""
    from loadtest.report import write_report

    md = ["## Plots", ""]
    for mode in modes:
        files = [out / "runs" / f"{n}-{mode}-c{level}-r0.jsonl" for n in names]
        files = [f for f in files if f.exists()]
        if not files:
            continue
        try:
            rep = write_report(
                files, out / f"report-{mode}-c{level}", f"{mode}, concurrency {level}"
            )
        except ImportError:
            return ["(plots need matplotlib)"]
        md.append(
            f"- {mode}, concurrency {level}: [{rep.relative_to(out)}]({rep.relative_to(out)})"
        )
    return [*md, ""]


def write_markdown(
    path: Path,
    args: argparse.Namespace,
    litellm_version: str | None,
    body: list[str],
    argv: list[str],
) -> None:
    m = machine_info()
    version = litellm_version
    md = [
        "# neogate vs LiteLLM proxy vs direct",
        "",
        f"Date: {datetime.now(UTC).isoformat(timespec='seconds')}; machine: {m['cpus']} CPUs, "
        f"{m['processor']}, {m['platform']}, Python {m['python']}; neogate commit "
        f"{git_commit()}; LiteLLM {version or '-'}.",
        "",
        f"Command: `python -m loadtest.compare_litellm {' '.join(argv)}`",
        "",
        "## Settings",
        "",
        f"- upstream: `neogate sim static` (fixed answers, {args.completion_tokens} completion "
        "tokens), one process"
        if not args.upstream_cmd
        else f"- upstream: `{args.upstream_cmd}`",
        "- neogate: `neogate serve --config neogate.yaml`, one process, one OpenAI-compatible "
        "backend, tenant-key auth, metering on, "
        + (
            "the SQLite ledger on"
            if args.neogate_ledger == "sqlite"
            else "no ledger (`ledger.kind: none`, like LiteLLM without a database)"
        ),
        "- LiteLLM: `pip install 'litellm[proxy]'` as its installer does it, then `litellm "
        "--config litellm.yaml --num_workers 1` (uvicorn's HTTP parser and loop: see the "
        "LiteLLM version above), master-key auth, no database (so no spend tracking), "
        "`openai/<model>` with `api_base`",
        f"- logging: both at {args.log_level.upper()} (LiteLLM's uvicorn access log off)",
        f"- load: closed loop, {args.duration:g} s per cell after {args.warmup:g} s warm-up per "
        f"target, levels {args.levels}, prompt {args.prompt_tokens} tokens, max_tokens "
        f"{args.max_tokens}, medians of {args.repeats} repeat(s); the load generator ("
        f"{args.client} HTTP client) runs in this script's process, on the same machine",
        "- server CPU ms/req: CPU time of the target's process tree over the cell / OK requests",
        "- isolation: before every cell the script waits (up to 20 s) until each server process "
        "uses under 3% of a core over 1 s, so no target is measured while another still works "
        "off the previous cell's queue; cells measured without that quiet are counted below",
        "",
        "## Results",
        "",
        *body,
    ]
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
