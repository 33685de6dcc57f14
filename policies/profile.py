"""Measured GPU performance profiles: decode tokens/s by batch x context length, prefill by prompt.

A profile is what was measured on one model / GPU / serving-stack combination; its file
says where the figures come from and when. The routing hot path reads it as a `Profile`,
a plain frozen value that interpolates between the measured points:

- in batch, per measured context length: piecewise-linear between measured batches;
  below the first point each request decodes at that point's per-request speed
  (T(b) = T(b0) * b / b0); past the last point throughput stays flat;
- in context length: linear between the two measured context lengths around it, at the
  same batch; clamped to the nearest measured curve outside the measured range;
- prefill tokens/s by prompt length: piecewise-linear, clamped outside the measured range.

Reading a profile file is the caller's business (`gateway.profiles`); `parse_profile`
validates YAML text it is given.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from policies.spec import ThroughputProfileSpec


def _curve_table(points: tuple[tuple[int, float], ...], top: int) -> tuple[float, ...]:
    """Throughput at integer batch sizes 0..top from one measured curve."""
    xs = [c for c, _ in points]
    out = [0.0]
    for b in range(1, top + 1):
        out.append(_interp_batch(points, xs, float(b)))
    return tuple(out)


def _interp_batch(points: tuple[tuple[int, float], ...], xs: list[int], batch: float) -> float:
    c0, t0 = points[0]
    if batch <= c0:
        return t0 * batch / c0
    if batch >= points[-1][0]:
        return points[-1][1]
    i = bisect_right(xs, batch)
    (ca, ta), (cb, tb) = points[i - 1], points[i]
    return ta + (tb - ta) * (batch - ca) / (cb - ca)


@dataclass(frozen=True, slots=True)
class Profile:
    """Decode throughput T(batch, context) and prefill speed of one worker, as a plain value."""

    # Measured context lengths (ascending) and, for each, its (batch, tokens/s) points.
    contexts: tuple[int, ...]
    curves: tuple[tuple[tuple[int, float], ...], ...]
    # (prompt tokens, prefill tokens/s), ascending.
    prefill: tuple[tuple[int, float], ...]
    max_batch: int
    name: str = ""
    source: str = ""
    measured: str = ""
    # Tokens per step of chunked prefill (see `ThroughputProfileSpec.step_token_budget`).
    step_token_budget: int = 2048
    # KV cache tokens across all sequences (see `ThroughputProfileSpec.kv_capacity_tokens`).
    kv_capacity_tokens: int | None = None
    # Throughput by integer batch 0..top for each measured context: the hot path indexes it.
    _tables: tuple[tuple[float, ...], ...] = field(init=False, repr=False, compare=False)
    _ref: int = field(init=False, repr=False, compare=False)
    _prefill_xs: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be positive")
        if not self.contexts or len(self.contexts) != len(self.curves):
            raise ValueError("every measured context length needs one throughput curve")
        if list(self.contexts) != sorted(set(self.contexts)) or self.contexts[0] < 0:
            raise ValueError("context lengths must be distinct, ascending and non-negative")
        for curve in self.curves:
            _check_points(curve, "throughput")
        _check_points(self.prefill, "prefill")
        top = max(self.max_batch, *(c[-1][0] for c in self.curves))
        object.__setattr__(self, "_tables", tuple(_curve_table(c, top) for c in self.curves))
        ref = min(self.contexts, key=lambda c: (abs(c - 1024), c))
        object.__setattr__(self, "_ref", self.contexts.index(ref))
        object.__setattr__(self, "_prefill_xs", tuple(x for x, _ in self.prefill))

    @classmethod
    def from_spec(cls, spec: ThroughputProfileSpec) -> Profile:
        """The plain value of a validated profile spec (once, at config load)."""
        contexts = tuple(sorted(spec.decode_tokens_per_s))
        curves = tuple(
            tuple(sorted((int(b), float(t)) for b, t in spec.decode_tokens_per_s[c].items()))
            for c in contexts
        )
        prefill = tuple(sorted((int(n), float(t)) for n, t in spec.prefill_tokens_per_s.items()))
        return cls(
            contexts,
            curves,
            prefill,
            spec.max_batch,
            spec.name or "",
            spec.source or "",
            spec.measured or "",
            spec.step_token_budget,
            spec.kv_capacity_tokens,
        )

    @property
    def reference_context(self) -> int:
        """The measured context length used when a caller gives none (the one nearest 1024)."""
        return self.contexts[self._ref]

    def tables_at(
        self, context: float | None
    ) -> tuple[tuple[float, ...], tuple[float, ...], float]:
        """(table a, table b, weight): T(b) at `context` is a[b] + (b[b] - a[b]) * weight for
        integer b up to max_batch (the hot path's form of `decode_tokens_per_s`)."""
        t = self._tables
        ctxs = self.contexts
        if len(t) == 1 or context is None:
            ref = t[self._ref]
            return ref, ref, 0.0
        if context <= ctxs[0]:
            return t[0], t[0], 0.0
        if context >= ctxs[-1]:
            return t[-1], t[-1], 0.0
        j = bisect_right(ctxs, context)
        return t[j - 1], t[j], (context - ctxs[j - 1]) / (ctxs[j] - ctxs[j - 1])

    def decode_tokens_per_s(self, batch: float, context: float | None = None) -> float:
        """Output tokens/s across the batch at `batch` requests (min 1) of mean `context` tokens."""
        batch = max(batch, 1)
        ctxs = self.contexts
        if len(ctxs) == 1 or context is None:
            return self._at(self._ref, batch)
        if context <= ctxs[0]:
            return self._at(0, batch)
        if context >= ctxs[-1]:
            return self._at(len(ctxs) - 1, batch)
        j = bisect_right(ctxs, context)
        ta, tb = self._at(j - 1, batch), self._at(j, batch)
        ca, cb = ctxs[j - 1], ctxs[j]
        return ta + (tb - ta) * (context - ca) / (cb - ca)

    def _at(self, i: int, batch: float) -> float:
        table = self._tables[i]
        if isinstance(batch, int) and batch < len(table):
            return table[batch]
        curve = self.curves[i]
        return _interp_batch(curve, [c for c, _ in curve], float(batch))

    def prefill_tokens_per_s(self, prompt_tokens: float) -> float:
        """Prefill speed for a prompt of this many tokens."""
        pts = self.prefill
        if prompt_tokens <= pts[0][0]:
            return pts[0][1]
        if prompt_tokens >= pts[-1][0]:
            return pts[-1][1]
        i = bisect_right(self._prefill_xs, prompt_tokens)
        (xa, ya), (xb, yb) = pts[i - 1], pts[i]
        return ya + (yb - ya) * (prompt_tokens - xa) / (xb - xa)

    def prefill_time_s(self, prompt_tokens: float) -> float:
        """Seconds of GPU time to prefill one prompt of this many tokens (0 for none)."""
        if prompt_tokens <= 0:
            return 0.0
        return prompt_tokens / self.prefill_tokens_per_s(prompt_tokens)


def _check_points(points: tuple[tuple[int, float], ...], what: str) -> None:
    if not points or any(x < 1 or y <= 0 for x, y in points):
        raise ValueError(f"{what} points must be positive")
    xs = [x for x, _ in points]
    if xs != sorted(set(xs)):
        raise ValueError(f"{what} points must be sorted by distinct size")


def parse_profile(text: str) -> ThroughputProfileSpec:
    """Validate a profile file's YAML text; raise ValueError naming what is wrong."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ValueError("a profile file must be a YAML mapping")
    return ThroughputProfileSpec.model_validate(dict(data))
