"""Per-request load-test records: saving and loading (JSON Lines or CSV) and the summary statistics.

JSON Lines files hold the run's metadata on their first line as `{"meta": {...}}` and one request
per following line. CSV files hold the requests only; their metadata sits beside them in
`<file>.meta.json`.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

FIELDS = (
    "start",
    "end",
    "ttft",
    "itl",
    "status",
    "error",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "events",
    "backend",
    "tenant",
    "lag",
    "detail",
)


@dataclass(slots=True)
class RequestRecord:
    """One request. Times are seconds; `start`/`end` count from the run's start.

    `start` is the scheduled start (open loop) or the send time (closed loop), so open-loop
    latency includes any time the request waited for the client: no coordinated omission.
    `ttft` counts from `start` to the first streamed event; `itl` is the mean gap between content
    events; `lag` is how late the request was actually sent; `status` 0 means no HTTP response.
    """

    start: float
    end: float = 0.0
    ttft: float | None = None
    itl: float | None = None
    status: int = 0
    error: str | None = None
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    events: int = 0
    backend: str | None = None
    tenant: str = ""
    lag: float = 0.0
    detail: str | None = None  # a failed request: the error message the server gave

    @property
    def latency(self) -> float:
        """End-to-end seconds."""
        return self.end - self.start

    @property
    def ok(self) -> bool:
        """Completed with a 2xx status and no error."""
        return self.error is None and 200 <= self.status < 300

    def as_dict(self) -> dict[str, Any]:
        """Plain dict in FIELDS order."""
        return {f: getattr(self, f) for f in FIELDS}


@dataclass(frozen=True, slots=True)
class Results:
    """A saved run: its metadata and its requests."""

    meta: dict[str, Any]
    records: list[RequestRecord] = field(default_factory=list)


def meta_path_for(path: Path) -> Path:
    """Where a CSV file's metadata lives."""
    return path.with_name(path.name + ".meta.json")


def save_results(path: Path, meta: dict[str, Any], records: Iterable[RequestRecord]) -> None:
    """Write results as JSON Lines (default) or CSV (by `.csv` suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(FIELDS)
            for r in records:
                w.writerow(["" if v is None else v for v in (getattr(r, k) for k in FIELDS)])
        meta_path_for(path).write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        return
    with path.open("wb") as f:
        f.write(orjson.dumps({"meta": meta}) + b"\n")
        for r in records:
            f.write(orjson.dumps(r.as_dict()) + b"\n")


def _opt_float(s: str) -> float | None:
    return float(s) if s != "" else None


def _opt_int(s: str) -> int | None:
    return int(s) if s != "" else None


def _record_from_csv(row: dict[str, str]) -> RequestRecord:
    return RequestRecord(
        start=float(row["start"]),
        end=float(row["end"]),
        ttft=_opt_float(row["ttft"]),
        itl=_opt_float(row["itl"]),
        status=int(row["status"] or 0),
        error=row["error"] or None,
        stream=row["stream"] == "True",
        prompt_tokens=_opt_int(row["prompt_tokens"]),
        completion_tokens=_opt_int(row["completion_tokens"]),
        events=int(row["events"] or 0),
        backend=row["backend"] or None,
        tenant=row["tenant"],
        lag=float(row["lag"] or 0.0),
        detail=row.get("detail") or None,
    )


def load_results(path: Path) -> Results:
    """Read a file written by `save_results`."""
    if path.suffix.lower() == ".csv":
        mp = meta_path_for(path)
        csv_meta = orjson.loads(mp.read_bytes()) if mp.exists() else {}
        with path.open(newline="") as f:
            return Results(csv_meta, [_record_from_csv(row) for row in csv.DictReader(f)])
    meta: dict[str, Any] = {}
    records: list[RequestRecord] = []
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            obj = orjson.loads(line)
            if "meta" in obj and "start" not in obj:
                meta = obj["meta"]
                continue
            records.append(RequestRecord(**{k: obj.get(k) for k in FIELDS if k in obj}))
    return Results(meta, records)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class Dist:
    """p50/p90/p99, mean and max of one latency metric, in seconds."""

    n: int
    p50: float
    p90: float
    p99: float
    mean: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Dist | None:
        """None when there are no values."""
        v = sorted(values)
        if not v:
            return None
        return cls(
            len(v), percentile(v, 50), percentile(v, 90), percentile(v, 99), sum(v) / len(v), v[-1]
        )


@dataclass(frozen=True, slots=True)
class Summary:
    """What a run achieved."""

    requests: int
    ok: int
    errors: dict[str, int]
    window_s: float
    req_per_s: float
    output_tokens: int
    prompt_tokens: int
    output_tokens_per_s: float
    e2e: Dist | None
    e2e_stream: Dist | None
    e2e_nonstream: Dist | None
    ttft: Dist | None
    itl: Dist | None
    backends: dict[str, int]
    max_lag_s: float
    # The most frequent error: (kind, count, one message the server gave for it).
    dominant_error: tuple[str, int, str | None] | None = None

    @property
    def mostly_failed(self) -> bool:
        """No request was sent, or more than half of them failed."""
        return self.requests == 0 or (self.requests - self.ok) * 2 > self.requests


def summarize(records: Sequence[RequestRecord]) -> Summary:
    """Throughput over the window from the first start to the last end; latencies of OK requests."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.error or f"http_{r.status}" for r in records if not r.ok)
    dominant: tuple[str, int, str | None] | None = None
    if errors:
        kind, count = errors.most_common(1)[0]
        detail = next(
            (
                r.detail
                for r in records
                if not r.ok and (r.error or f"http_{r.status}") == kind and r.detail
            ),
            None,
        )
        dominant = (kind, count, detail)
    window = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    # Streams without usage still produced events: count those as output tokens (approximation).
    out_tokens = sum(
        r.completion_tokens if r.completion_tokens is not None else r.events for r in ok
    )
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    per_s = (lambda n: n / window) if window > 0 else (lambda n: 0.0)
    return Summary(
        requests=len(records),
        ok=len(ok),
        errors=dict(errors.most_common()),
        window_s=window,
        req_per_s=per_s(len(ok)),
        output_tokens=out_tokens,
        prompt_tokens=in_tokens,
        output_tokens_per_s=per_s(out_tokens),
        e2e=Dist.of(r.latency for r in ok),
        e2e_stream=Dist.of(r.latency for r in ok if r.stream),
        e2e_nonstream=Dist.of(r.latency for r in ok if not r.stream),
        ttft=Dist.of(r.ttft for r in ok if r.ttft is not None),
        itl=Dist.of(r.itl for r in ok if r.itl is not None),
        backends=dict(Counter(r.backend or "-" for r in ok).most_common()),
        max_lag_s=max((r.lag for r in records), default=0.0),
        dominant_error=dominant,
    )


def _ms(d: Dist | None) -> str:
    if d is None:
        return "    -         -         -         -"
    return f"{d.p50 * 1e3:9.2f} {d.p90 * 1e3:9.2f} {d.p99 * 1e3:9.2f} {d.mean * 1e3:9.2f}"


def format_summary(s: Summary) -> str:
    """Human-readable summary table."""
    lines = [
        f"requests      {s.requests}  ok {s.ok}  errors {s.requests - s.ok}"
        f"  window {s.window_s:.2f}s",
        f"throughput    {s.req_per_s:.1f} req/s   {s.output_tokens_per_s:.1f} output tokens/s"
        f"   (tokens in {s.prompt_tokens}, out {s.output_tokens})",
        "latency (ms)        p50       p90       p99      mean",
        f"  end-to-end  {_ms(s.e2e)}",
        f"    streamed  {_ms(s.e2e_stream)}",
        f"    buffered  {_ms(s.e2e_nonstream)}",
        f"  TTFT        {_ms(s.ttft)}",
        f"  ITL         {_ms(s.itl)}",
    ]
    if s.errors:
        lines.append("errors        " + ", ".join(f"{k}: {v}" for k, v in s.errors.items()))
    if s.dominant_error is not None:
        kind, count, detail = s.dominant_error
        lines.append(
            f"most common   {kind} ({count} of {s.requests})" + (f": {detail}" if detail else "")
        )
    if len(s.backends) > 1 or "-" not in s.backends:
        lines.append("backends      " + ", ".join(f"{k}: {v}" for k, v in s.backends.items()))
    if s.max_lag_s > 0.05:
        lines.append(
            f"note          the client sent some requests up to {s.max_lag_s * 1e3:.0f} ms late;"
            " latencies include that wait (no coordinated omission)"
        )
    return "\n".join(lines)
