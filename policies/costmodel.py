"""The batch-aware GPU cost model: throughput, latency and dollars per token by batch size.

A local worker costs `price_per_hour` whether busy or idle. Its decode throughput
T(b) (output tokens/s across the batch) is interpolated from measured points; the
amortized cost of one output token at batch b is `price_per_hour / 3600 / T(b)`.
For a `reserved` GPU one more request costs ~nothing while the batch is below the
knee (it lowers everyone's per-token cost); past the knee the marginal cost ramps
up to the amortized cost at `max_batch`. An `on_demand` GPU is priced at the
amortized cost of the predicted batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal

from policies.profile import Profile
from policies.spec import GpuSpec, ThroughputProfileSpec

GpuMode = Literal["reserved", "on_demand"]

# A segment whose throughput gain per added request is below this fraction of the
# batch-1 per-request throughput is past the knee.
KNEE_SLOPE_FRACTION = 0.25
# Above this share of GPU time spent prefilling, decoding is predicted as if at this share:
# the worker is saturated and the prediction only needs to say "far too slow".
MAX_PREFILL_LOAD = 0.95


def derive_knee(points: tuple[tuple[int, float], ...], max_batch: int) -> int:
    """Concurrency at which adding a request stops paying: the start of the first flat segment."""
    c0, t0 = points[0]
    per_request = t0 / c0
    for (ca, ta), (cb, tb) in pairwise(points):
        if (tb - ta) / (cb - ca) < KNEE_SLOPE_FRACTION * per_request:
            return min(ca, max_batch)
    # Throughput is flat beyond the last measured point.
    return min(points[-1][0], max_batch)


@dataclass(frozen=True, slots=True)
class GpuModel:
    """One local worker's economics and performance, as a plain immutable value.

    `context` arguments are the mean context length (tokens per sequence) of the batch;
    None means the profile's reference context (see `policies.profile`).
    """

    price_per_hour: float
    mode: GpuMode
    profile: Profile
    knee: int = field(init=False)
    # Throughput at integer batch sizes 0..top at the reference context: the hot path indexes it.
    _table: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.price_per_hour <= 0:
            raise ValueError("price per hour must be positive")
        prof = self.profile
        ref = prof.contexts.index(prof.reference_context)
        object.__setattr__(self, "_table", prof._tables[ref])
        object.__setattr__(self, "knee", derive_knee(prof.curves[ref], prof.max_batch))

    @classmethod
    def from_spec(cls, spec: GpuSpec) -> GpuModel:
        """Build the value once from the YAML spec; the routing hot path never sees pydantic."""
        return cls.from_profile(spec.profile, spec.price_per_hour, spec.mode)

    @classmethod
    def from_profile(
        cls,
        profile: ThroughputProfileSpec | Profile,
        price_per_hour: float,
        mode: GpuMode = "reserved",
    ) -> GpuModel:
        """Build from a throughput profile and a price."""
        prof = profile if isinstance(profile, Profile) else Profile.from_spec(profile)
        return cls(price_per_hour=price_per_hour, mode=mode, profile=prof)

    @property
    def max_batch(self) -> int:
        """Most sequences the worker runs at once."""
        return self.profile.max_batch

    @property
    def points(self) -> tuple[tuple[int, float], ...]:
        """The measured (batch, tokens/s) points at the reference context."""
        prof = self.profile
        return prof.curves[prof.contexts.index(prof.reference_context)]

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prefill speed at a typical prompt (512 tokens); see `profile` for others."""
        return self.profile.prefill_tokens_per_s(512)

    @property
    def price_per_second(self) -> float:
        """Dollars per GPU-second."""
        return self.price_per_hour / 3600.0

    def throughput(self, batch: float, context: float | None = None) -> float:
        """Output tokens/s across the whole batch at `batch` concurrent requests (min 1)."""
        if context is None and isinstance(batch, int) and 1 <= batch < len(self._table):
            return self._table[batch]
        return self.profile.decode_tokens_per_s(batch, context)

    def itl_s(self, batch: float, context: float | None = None) -> float:
        """Inter-token latency seen by each request at this batch."""
        b = batch if batch >= 1 else 1
        return b / self.throughput(b, context)

    def prefill_load(self, prompt_tokens_per_s: float) -> float:
        """Share of GPU time prefill takes at this prompt arrival rate (capped at MAX_PREFILL_LOAD)."""
        rho = prompt_tokens_per_s / self.prefill_tokens_per_s
        return rho if rho < MAX_PREFILL_LOAD else MAX_PREFILL_LOAD

    def itl_under_load_s(self, batch: float, prompt_tokens_per_s: float) -> float:
        """Mean ITL at this batch while prompts arrive at this rate.

        Prefill and decode share the GPU: decoding gets the time prefill leaves, so the
        mean ITL is ITL(b) / (1 - prefill load).
        """
        if prompt_tokens_per_s <= 0:
            return self.itl_s(batch)
        return self.itl_s(batch) / (1.0 - self.prefill_load(prompt_tokens_per_s))

    def cost_per_output_token(self, batch: float) -> float:
        """Amortized USD per output token when the GPU runs this batch."""
        return self.price_per_hour / 3600.0 / self.throughput(batch)

    def prefill_time_s(self, tokens: float) -> float:
        """Seconds of GPU time to prefill a prompt of `tokens` tokens."""
        return self.profile.prefill_time_s(tokens)

    def prefill_cost(self, tokens: float) -> float:
        """Amortized USD of prefilling `tokens` prompt tokens (the GPU does nothing else meanwhile)."""
        return self.prefill_time_s(tokens) * self.price_per_hour / 3600.0

    def amortized_cost(self, prompt_tokens: float, output_tokens: float, batch: float) -> float:
        """USD of a request's prefill plus its output tokens at the amortized rate of `batch`."""
        b = batch if batch <= self.max_batch else self.max_batch
        return self.prefill_cost(prompt_tokens) + output_tokens * self.cost_per_output_token(b)

    def predicted_ttft_s(
        self,
        prompt_tokens: int,
        *,
        load: int,
        queued_prefill_tokens: int,
        expected_output_tokens: int,
    ) -> float:
        """TTFT of one more request given `load` requests already on the worker.

        Queued prefill and our own prefill run at the prefill speed; then one decode step at
        the new batch. Requests beyond `max_batch` wait for slots, which free at the rate
        requests complete (throughput at max_batch / expected output length).
        """
        after = load + 1
        wait = 0.0
        if after > self.max_batch:
            per_completion = max(expected_output_tokens, 1) / self._table[self.max_batch]
            wait = (after - self.max_batch) * per_completion
            after = self.max_batch
        prefill = self.prefill_time_s(queued_prefill_tokens) + self.prefill_time_s(prompt_tokens)
        return wait + prefill + after / self._table[after]

    def ramp(self, batch_after: int) -> float:
        """Fraction of the amortized cost a reserved GPU charges as marginal cost at this batch."""
        if batch_after <= self.knee:
            return 0.0
        span = self.max_batch - self.knee
        if span <= 0:
            return 1.0
        r = (batch_after - self.knee) / span
        return r if r < 1.0 else 1.0

    def marginal_cost(self, prompt_tokens: int, output_tokens: int, batch_after: int) -> float:
        """USD that sending this request here adds, with the batch becoming `batch_after`.

        Reserved: ~0 up to the knee (the GPU is paid anyway), then a linear ramp to the
        amortized cost at max_batch. On-demand: the amortized cost at the predicted batch.
        """
        if self.mode == "reserved":
            r = self.ramp(batch_after)
            if r == 0.0:
                return 0.0
            return r * self.amortized_cost(prompt_tokens, output_tokens, batch_after)
        return self.amortized_cost(prompt_tokens, output_tokens, batch_after)

    def chargeback_cost(
        self, prompt_tokens: int, completion_tokens: int, batch_seen: float
    ) -> float:
        """USD a tenant is charged for local tokens at the batch they actually shared.

        Positive whenever any token was processed: an idle GPU's cost is not hidden (batch 1
        is the most expensive), and a full batch is cheap.
        """
        b = batch_seen if batch_seen >= 1 else 1.0
        return self.amortized_cost(max(prompt_tokens, 0), max(completion_tokens, 0), b)
