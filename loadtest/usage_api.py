"""Reading cost out of a gateway's `GET /v1/usage` answers, taken before and after a run.

The endpoint's exact shape is the gateway's business; this reader is tolerant: it accepts
totals at the top level or under `total(s)`, and rows (per backend, or per backend and more)
under `data`/`rows`/`items`/`groups`/`by_backend`/`backends`, as a list or a name -> row map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

_COST = ("cost_usd", "total_cost_usd", "cost", "spend_usd", "spend", "usd")
_PROMPT = ("prompt_tokens", "input_tokens")
_COMPLETION = ("completion_tokens", "output_tokens")
_REQUESTS = ("requests", "request_count", "count", "n")
_ROWS = ("data", "rows", "items", "groups", "by_backend", "backends", "usage")
_NAME = ("backend", "backend_name", "name", "group", "key")


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Cost and tokens of one group (a backend, or "*" for everything)."""

    cost_usd: float = 0.0
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    requests: float = 0.0

    def __sub__(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(
            self.cost_usd - other.cost_usd,
            self.prompt_tokens - other.prompt_tokens,
            self.completion_tokens - other.completion_tokens,
            self.requests - other.requests,
        )

    def __add__(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(
            self.cost_usd + other.cost_usd,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.requests + other.requests,
        )

    @property
    def tokens(self) -> float:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    @property
    def usd_per_million_tokens(self) -> float | None:
        """Cost per million tokens (prompt + completion), None without tokens."""
        return self.cost_usd / self.tokens * 1e6 if self.tokens > 0 else None

    @property
    def usd_per_million_output(self) -> float | None:
        """Cost per million completion tokens, None without them."""
        return self.cost_usd / self.completion_tokens * 1e6 if self.completion_tokens > 0 else None


def _first_num(row: dict[str, Any], names: tuple[str, ...]) -> float | None:
    for n in names:
        v = row.get(n)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                continue
    return None


def _row(row: dict[str, Any]) -> UsageTotals | None:
    cost = _first_num(row, _COST)
    pt = _first_num(row, _PROMPT)
    ct = _first_num(row, _COMPLETION)
    if cost is None and pt is None and ct is None:
        return None
    return UsageTotals(cost or 0.0, pt or 0.0, ct or 0.0, _first_num(row, _REQUESTS) or 0.0)


def parse_usage(body: Any) -> dict[str, UsageTotals]:
    """Group name -> totals; "*" is the overall total. Empty when nothing is recognised."""
    if not isinstance(body, dict):
        return {}
    groups: dict[str, UsageTotals] = {}
    # neogate's own shape: {"object": "usage", "data": [{"backend": ..., "cost_usd": ...}]};
    # an empty `data` is a run that cost nothing (every request failed), not an unknown shape.
    known = body.get("object") == "usage" and isinstance(body.get("data"), list)
    for key in _ROWS:
        rows = body.get(key)
        items: list[tuple[str | None, Any]] = []
        if isinstance(rows, list):
            items = [(None, r) for r in rows]
        elif isinstance(rows, dict):
            items = list(rows.items())
        for name, r in items:
            if not isinstance(r, dict):
                continue
            t = _row(r)
            if t is None:
                continue
            label = name
            if label is None:
                label = next((str(r[n]) for n in _NAME if isinstance(r.get(n), str)), "?")
            groups[label] = groups.get(label, UsageTotals()) + t
        if groups:
            break
    total = _row(body)
    for key in ("total", "totals", "summary"):
        if total is None and isinstance(body.get(key), dict):
            total = _row(body[key])
    if total is None and (groups or known):
        total = UsageTotals()
        for t in groups.values():
            total = total + t
    if total is not None:
        groups["*"] = total
    return groups


def usage_delta(before: Any, after: Any) -> dict[str, UsageTotals]:
    """What a run added, per group, from two `fetch_usage` answers ({"status", "body"})."""
    b = parse_usage(before.get("body")) if isinstance(before, dict) else {}
    a = parse_usage(after.get("body")) if isinstance(after, dict) else {}
    return {k: v - b.get(k, UsageTotals()) for k, v in a.items()}


def describe_usage(meta: dict[str, Any]) -> str:
    """One paragraph on cost per million tokens, or why there is none."""
    after = meta.get("usage_after")
    if after is None:
        return "cost: usage API not queried"
    if not isinstance(after, dict) or after.get("status") != 200:
        status = after.get("status") if isinstance(after, dict) else None
        why = after.get("error") if isinstance(after, dict) and after.get("error") else status
        return f"cost: no usage API at this URL (GET /v1/usage -> {why})"
    run = meta.get("usage_run")
    if isinstance(run, dict) and run.get("status") == 200 and parse_usage(run.get("body")):
        delta = parse_usage(run.get("body"))
    else:
        delta = usage_delta(meta.get("usage_before"), after)
    total = delta.get("*")
    if total is None:
        return "cost: GET /v1/usage answered, but in a shape without cost or token totals"
    lines = [
        f"cost          ${total.cost_usd:.6f} for {total.tokens:.0f} tokens"
        f" ({total.prompt_tokens:.0f} in, {total.completion_tokens:.0f} out)"
    ]
    per_m, per_out = total.usd_per_million_tokens, total.usd_per_million_output
    if per_m is not None:
        out = f"; ${per_out:.4f} of cost per million output tokens" if per_out is not None else ""
        lines.append(f"              ${per_m:.4f} per million tokens (in + out){out}")
    for name, t in sorted(delta.items()):
        if name == "*" or t.tokens <= 0:
            continue
        pm = t.usd_per_million_tokens
        lines.append(
            f"  {name:<20} ${t.cost_usd:.6f}  {t.tokens:.0f} tokens"
            + (f"  ${pm:.4f}/M" if pm is not None else "")
        )
    return "\n".join(lines)


async def fetch_usage(
    origin: str, key: str | None, query: str = "by=backend", limit_s: float = 5.0
) -> dict[str, Any]:
    """GET {origin}/v1/usage?{query}; tolerant: returns status and JSON (or an error note)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = origin + "/v1/usage" + (f"?{query}" if query else "")
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=limit_s)) as s,
            s.get(url, headers=headers) as resp,
        ):
            raw = await resp.read()
            try:
                body: Any = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = raw[:200].decode("utf-8", "replace")
            return {"status": resp.status, "body": body}
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return {"status": 0, "error": f"{type(exc).__name__}: {exc}"}
