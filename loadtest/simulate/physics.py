"""What a simulated GPU really does: measured decode and prefill rates, and how a step is timed.

This is the referee's model of the hardware, kept apart from the router's cost model
(`policies.costmodel`) on purpose: the router plans with its own belief (the config's
`gpu.profile`), the simulated worker runs on this, and a wrong belief shows up as SLO
misses or money, as it would in production. Nothing here imports the router's code.

- Decode: total output tokens/s T(b, context) from measured tables, one table per
  context length; piecewise linear in the batch (proportional below the first point,
  flat past the last), linear in log(context) between measured contexts.
- Prefill: tokens/s by prompt length (attention grows with the prompt), same interpolation.
- A step of a continuously batching worker (vLLM-style chunked prefill): every running
  request decodes one token and a prefill chunk fills the rest of the step's token
  budget. The step takes the longer of its memory-bound part (the measured decode step,
  b / T(b, context)) and its compute-bound part (all tokens of the step at prefill
  speed): a roofline. Without a prefill the step is the measured decode step.
- KV cache: a worker admits a request only while the prompt + output tokens of everything
  it holds fit in `kv_capacity_tokens` (None: only `max_batch` limits it).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass

# vLLM's chunked-prefill token budget per step (`max_num_batched_tokens`) for online serving.
DEFAULT_STEP_TOKEN_BUDGET = 2048

Table = tuple[tuple[float, float], ...]


def _table(points: Mapping[int, float] | Mapping[float, float], what: str) -> Table:
    out = tuple(sorted((float(k), float(v)) for k, v in points.items()))
    if not out or any(k <= 0 or v <= 0 for k, v in out):
        raise ValueError(f"{what}: needs positive points, got {dict(points)}")
    return out


def _interp(table: Table, x: float, *, proportional_below: bool) -> float:
    """Piecewise linear; below the first point proportional (or flat), flat past the last."""
    x0, y0 = table[0]
    if x <= x0:
        return y0 * x / x0 if proportional_below else y0
    if x >= table[-1][0]:
        return table[-1][1]
    i = bisect_right([p[0] for p in table], x)
    (xa, ya), (xb, yb) = table[i - 1], table[i]
    return ya + (yb - ya) * (x - xa) / (xb - xa)


@dataclass(frozen=True, slots=True)
class GpuPhysics:
    """One GPU worker's measured behaviour (see the module docstring)."""

    # (context length, ((batch, total decode tokens/s), ...)), sorted by context.
    decode: tuple[tuple[float, Table], ...]
    # ((prompt tokens, prefill tokens/s), ...).
    prefill: Table
    max_batch: int = 256
    step_token_budget: int = DEFAULT_STEP_TOKEN_BUDGET
    kv_capacity_tokens: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not self.decode or not self.prefill:
            raise ValueError("physics needs decode and prefill points")
        if self.max_batch < 1 or self.step_token_budget <= self.max_batch:
            raise ValueError("step_token_budget must exceed max_batch (vLLM requires it too)")

    @classmethod
    def from_tables(
        cls,
        decode: Mapping[int, Mapping[int, float]],
        prefill: Mapping[int, float],
        *,
        max_batch: int = 256,
        step_token_budget: int = DEFAULT_STEP_TOKEN_BUDGET,
        kv_capacity_tokens: int | None = None,
        source: str = "",
    ) -> GpuPhysics:
        """Build from {context: {batch: tokens/s}} and {prompt tokens: tokens/s}."""
        rows = tuple(
            (float(ctx), _table(points, f"decode at context {ctx}"))
            for ctx, points in sorted(decode.items())
        )
        return cls(
            rows,
            _table(prefill, "prefill"),
            max_batch,
            step_token_budget,
            kv_capacity_tokens,
            source,
        )

    def decode_tokens_per_s(self, batch: float, context: float) -> float:
        """Total decode tokens/s at this batch and mean context length."""
        rows = self.decode
        if len(rows) == 1 or context <= rows[0][0]:
            return _interp(rows[0][1], batch, proportional_below=True)
        if context >= rows[-1][0]:
            return _interp(rows[-1][1], batch, proportional_below=True)
        i = bisect_right([c for c, _ in rows], context)
        (ca, ta), (cb, tb) = rows[i - 1], rows[i]
        w = (math.log(context) - math.log(ca)) / (math.log(cb) - math.log(ca))
        ya = _interp(ta, batch, proportional_below=True)
        yb = _interp(tb, batch, proportional_below=True)
        return ya + (yb - ya) * w

    def decode_step_s(self, batch: int, context: float) -> float:
        """Seconds of one decode step of `batch` requests (their inter-token latency)."""
        return batch / self.decode_tokens_per_s(batch, context)

    def prefill_tokens_per_s(self, prompt_tokens: float) -> float:
        """Prefill speed for a prompt of this length (whole GPU)."""
        return _interp(self.prefill, prompt_tokens, proportional_below=False)

    def mixed_step(self, batch: int, context: float, prompt_tokens: float) -> tuple[float, float]:
        """(step seconds, prefill tokens per step) while a prompt is being prefilled.

        Decodes go first; the prefill chunk takes the rest of the token budget.
        """
        chunk = float(self.step_token_budget - batch)
        compute = (chunk + batch) / self.prefill_tokens_per_s(prompt_tokens)
        memory = self.decode_step_s(batch, context) if batch else 0.0
        return max(memory, compute), chunk
