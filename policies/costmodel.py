"""The batch-aware GPU cost model: throughput, latency and the dollar numbers of a local GPU.

A local worker costs `price_per_hour` while it is held, busy or idle (reserved: the whole
period; on_demand: the hours it is up). Its decode throughput T(b, context) comes from a
measured profile (`policies.profile`). The numbers (docs/economics.md):

- attributed cost (ledger): prefill of the uncached prompt at the prefill speed plus each
  output token at `price_per_hour / 3600 / T(b)` of the batch b the request shared;
- marginal cost (routing): the hour is sunk while the GPU is up (reserved or on_demand
  alike), so one more request costs only the work it may displace: nothing while the
  batch stays well under the SLO-feasible batch b* (the largest batch whose predicted ITL
  meets the class's target), rising linearly to the displaced work's price at b*
  (`marginal_cost`, `opportunity_share`, `slo_batch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from policies.batch_search import ItlCurve, itl_curves
from policies.batch_search import slo_batch as search_slo_batch
from policies.profile import Profile
from policies.spec import GpuSpec, ThroughputProfileSpec

GpuMode = Literal["reserved", "on_demand"]

# Above this share of GPU time spent prefilling, decoding is predicted as if at this share:
# the worker is saturated and the prediction only needs to say "far too slow".
MAX_PREFILL_LOAD = 0.95
# The marginal cost starts rising this share of b* below b* (at least one request below).
RAMP_FRACTION = 0.25
# The quantile at which a request's prefill interference is predicted (2.33: 99%, the
# interactive SLO target).
TAIL_Z = 2.33
# Phi(-TAIL_Z): the miss probability one request may carry with no population budget.
TAIL_P = 0.5 * math.erfc(TAIL_Z / math.sqrt(2.0))


def opportunity_share(batch_after: int, slo_batch: int) -> float:
    """Share of the displaced work's price that one more request costs (0..1).

    With `load = batch_after - 1` requests already there and band = max(1, ceil(RAMP_FRACTION
    * b*)): 0 while load <= b* - band, then linear in load up to 1 at load = b*; 1 once the
    batch would pass b* (or when b* is 0: no batch meets the SLO).
    """
    if batch_after > slo_batch:
        return 1.0
    band = max(1, math.ceil(slo_batch * RAMP_FRACTION))
    start = slo_batch - band
    load = batch_after - 1
    if load <= start:
        return 0.0
    return (load - start) / band


@dataclass(frozen=True, slots=True)
class GpuModel:
    """One local worker's economics and performance, as a plain immutable value.

    `context` arguments are the mean context length (tokens per sequence) of the batch;
    None means the profile's reference context (see `policies.profile`).
    """

    price_per_hour: float
    mode: GpuMode
    profile: Profile
    # Throughput at integer batch sizes 0..top at the reference context: the hot path indexes it.
    _table: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _one_curve: bool = field(init=False, repr=False, compare=False)
    _prefill_ref: float = field(init=False, repr=False, compare=False)
    _mixed_step_s: float = field(init=False, repr=False, compare=False)
    # Per measured context: (its throughput table, its ITL by batch, m): `slo_batch`'s fast path.
    _itl_curves: tuple[ItlCurve, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.price_per_hour <= 0:
            raise ValueError("price per hour must be positive")
        prof = self.profile
        object.__setattr__(self, "_table", prof.tables_at(None)[0])
        object.__setattr__(self, "_one_curve", len(prof.contexts) == 1)
        object.__setattr__(self, "_prefill_ref", prof.prefill_tokens_per_s(512))
        object.__setattr__(self, "_mixed_step_s", prof.step_token_budget / self._prefill_ref)
        object.__setattr__(self, "_itl_curves", itl_curves(prof))

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

    def batch_cap(self, tokens_per_sequence: float) -> int:
        """Most sequences of this many tokens (prompt + output, what each holds by its end)
        the worker runs at once: max_batch, or fewer when the KV cache holds fewer (>= 1)."""
        kv = self.profile.kv_capacity_tokens
        if kv is None or tokens_per_sequence <= 0:
            return self.max_batch
        fit = int(kv // tokens_per_sequence)
        return max(1, fit if fit < self.max_batch else self.max_batch)

    @property
    def points(self) -> tuple[tuple[int, float], ...]:
        """The measured (batch, tokens/s) points at the reference context."""
        prof = self.profile
        return prof.curves[prof.contexts.index(prof.reference_context)]

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prefill speed at a typical prompt (512 tokens); see `profile` for others."""
        return self._prefill_ref

    @property
    def price_per_second(self) -> float:
        """Dollars per GPU-second."""
        return self.price_per_hour / 3600.0

    def throughput(self, batch: float, context: float | None = None) -> float:
        """Output tokens/s across the whole batch at `batch` concurrent requests (min 1)."""
        if (
            (context is None or self._one_curve)
            and isinstance(batch, int)
            and 1 <= batch < len(self._table)
        ):
            return self._table[batch]
        return self.profile.decode_tokens_per_s(batch, context)

    def itl_s(self, batch: float, context: float | None = None) -> float:
        """Inter-token latency seen by each request at this batch."""
        b = batch if batch >= 1 else 1
        return b / self.throughput(b, context)

    def prefill_load(self, prompt_tokens_per_s: float) -> float:
        """Share of GPU time prefill takes at this prompt arrival rate (capped at MAX_PREFILL_LOAD)."""
        rho = prompt_tokens_per_s / self._prefill_ref
        return rho if rho < MAX_PREFILL_LOAD else MAX_PREFILL_LOAD

    def tail_prompt_rate(
        self, prompt_tokens_per_s: float, burst_s: float, horizon_s: float
    ) -> float:
        """The prompt rate whose prefill load is the TAIL_Z quantile of the load one request
        sees over its decode (see docs/economics.md, "prefill interference").

        Prompts arrive one by one and each stalls every running decode for its whole
        prefill (`burst_s`, one prompt's prefill time): over a decode lasting `horizon_s`
        the share of time spent prefilling is a compound-Poisson count with mean `load`
        and variance `load x burst_s / horizon_s`. The SLO is judged per request, so the
        ITL is predicted at that share's upper quantile, not at its mean.
        """
        if prompt_tokens_per_s <= 0 or burst_s <= 0 or horizon_s <= 0:
            return prompt_tokens_per_s
        load = prompt_tokens_per_s / self._prefill_ref
        tail = load + TAIL_Z * math.sqrt(load * burst_s / horizon_s)
        return tail * self._prefill_ref

    def itl_miss_probability(
        self,
        itl_s: float,
        max_itl_s: float,
        prompt_tokens_per_s: float,
        burst_s: float,
        horizon_s: float,
        extra_s: float = 0.0,
    ) -> float:
        """Probability that a request's mean ITL misses `max_itl_s` under prefill interference.

        `itl_s` is the batch's decode-only ITL. The request misses when the share of its
        decode spent in chunked-prefill steps passes the share at which `mixed_itl` reaches
        the target, rho_max = (1/itl - 1/target) / (1/itl - 1/step); that share is the
        compound-Poisson count of `tail_prompt_rate` (mean `load`, variance load x burst_s /
        horizon_s), taken as normal, plus `extra_s / horizon_s` when a prefill of `extra_s`
        seconds is known to fall inside the decode (a prompt about to be sent there:
        `policies.predict.stall_misses`). 1 when the decode step alone misses; 0 when even a
        mixed step meets the target or nothing is prefilled.
        """
        if itl_s >= max_itl_s:
            return 1.0
        step = self._mixed_step_s if self._mixed_step_s > itl_s else itl_s
        if step <= max_itl_s or (prompt_tokens_per_s <= 0 and extra_s <= 0):
            return 0.0
        rho_max = (1.0 / itl_s - 1.0 / max_itl_s) / (1.0 / itl_s - 1.0 / step)
        if extra_s > 0 and horizon_s > 0:
            rho_max -= extra_s / horizon_s
        load = self.prefill_load(prompt_tokens_per_s)
        if load <= 0 or burst_s <= 0 or horizon_s <= 0:
            return 1.0 if load > rho_max else 0.0
        sd = math.sqrt(load * burst_s / horizon_s)
        return 0.5 * math.erfc((rho_max - load) / (sd * math.sqrt(2.0)))

    def itl_under_load_s(
        self, batch: float, prompt_tokens_per_s: float, context: float | None = None
    ) -> float:
        """Mean ITL at this batch while prompts arrive at this rate (`mixed_itl`)."""
        itl = self.itl_s(batch, context)
        if prompt_tokens_per_s <= 0:
            return itl
        return self.mixed_itl(itl, self.prefill_load(prompt_tokens_per_s))

    @property
    def mixed_step_s(self) -> float:
        """Seconds of one chunked-prefill step: the step token budget at the prefill speed."""
        return self._mixed_step_s

    def mixed_itl(self, itl: float, load: float) -> float:
        """Mean ITL when a share `load` of the time goes to chunked prefill.

        Under chunked prefill the running requests keep decoding while a prompt is
        prefilled, one token per mixed step (`mixed_step_s`, or the decode step if that is
        longer); the rest of the time one token per decode step `itl`. Tokens per second
        per request: load / mixed step + (1 - load) / itl; the mean ITL is its inverse. It
        never exceeds the mixed step, however loaded the worker.
        """
        step = self._mixed_step_s if self._mixed_step_s > itl else itl
        return 1.0 / (load / step + (1.0 - load) / itl)

    def slo_batch(
        self,
        max_itl_s: float | None,
        prompt_tokens_per_s: float = 0.0,
        context: float | None = None,
    ) -> int:
        """b*: the largest batch whose predicted ITL (at this context and prefill load) meets
        `max_itl_s`; `max_batch` without a target, 0 when not even batch 1 meets it.

        The search itself is `policies.batch_search.slo_batch`.
        """
        if max_itl_s is None:
            return self.max_batch
        load = self.prefill_load(prompt_tokens_per_s) if prompt_tokens_per_s > 0 else 0.0
        return search_slo_batch(
            max_itl_s,
            load,
            self.profile.tables_at(context),
            self._itl_curves,
            self.max_batch,
            self._mixed_step_s,
        )

    def cost_per_output_token(self, batch: float, context: float | None = None) -> float:
        """USD per output token when the GPU runs this batch: price per second / T(b)."""
        return self.price_per_hour / 3600.0 / self.throughput(batch, context)

    def prefill_time_s(self, tokens: float) -> float:
        """Seconds of GPU time to prefill a prompt of `tokens` tokens."""
        return self.profile.prefill_time_s(tokens)

    def prefill_cost(self, tokens: float) -> float:
        """USD of prefilling `tokens` prompt tokens (the GPU does nothing else meanwhile)."""
        return self.prefill_time_s(tokens) * self.price_per_hour / 3600.0

    def amortized_cost(
        self,
        prompt_tokens: float,
        output_tokens: float,
        batch: float,
        context: float | None = None,
    ) -> float:
        """USD of a request's prefill plus its output tokens at the rate of `batch`."""
        b = batch if batch <= self.max_batch else self.max_batch
        return self.prefill_cost(prompt_tokens) + output_tokens * self.cost_per_output_token(
            b, context
        )

    def predicted_ttft_s(
        self,
        prompt_tokens: int,
        *,
        load: int,
        queued_prefill_tokens: int,
        expected_output_tokens: int,
        slots: int | None = None,
        own_prefill_s: float | None = None,
    ) -> float:
        """TTFT of one more request given `load` requests already on the worker.

        Queued prefill and our own prefill run at the prefill speed; then one decode step at
        the new batch. Requests beyond the worker's slots (`max_batch`, or `slots` when the
        KV cache holds fewer: `batch_cap`) wait for one, and slots free at the rate requests
        complete (throughput at that batch / expected output length). `own_prefill_s`: the
        prompt's prefill time when the caller has it already (`prefill_time_s`).
        """
        top = self.max_batch if slots is None or slots > self.max_batch else max(slots, 1)
        after = load + 1
        wait = 0.0
        if after > top:
            per_completion = max(expected_output_tokens, 1) / self._table[top]
            wait = (after - top) * per_completion
            after = top
        own = self.prefill_time_s(prompt_tokens) if own_prefill_s is None else own_prefill_s
        prefill = self.prefill_time_s(queued_prefill_tokens) + own
        return wait + prefill + after / self._table[after]

    def most_per_token(self) -> tuple[float, float]:
        """(USD per prompt token, USD per output token) no request is attributed more than.

        The slowest measured prefill speed and batch-1 decode at the slowest measured
        context: interpolation never goes below them (it is clamped outside the measured
        range), so a budget reservation at these prices is an upper bound.
        """
        per_s = self.price_per_hour / 3600.0
        slowest_prefill = min(t for _, t in self.profile.prefill)
        slowest_decode = min(self.profile.decode_tokens_per_s(1, c) for c in self.profile.contexts)
        return per_s / slowest_prefill, per_s / slowest_decode

    def marginal_cost(self, batch_after: int, slo_batch: int, displaced_usd: float) -> float:
        """USD that sending one more request here costs the operator (routing).

        The GPU's hour is paid while it is up, reserved or on_demand, so the only cost is
        the work this request may displace: `displaced_usd` (what that work pays at the
        cheapest external candidate) times `opportunity_share(batch_after, b*)`.
        """
        share = opportunity_share(batch_after, slo_batch)
        return share * displaced_usd if share > 0.0 else 0.0

    def attributed_cost(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        batch_seen: float,
        *,
        cached_tokens: int = 0,
        context: float | None = None,
    ) -> float:
        """USD a tenant is charged for local tokens (ledger chargeback).

        The prefill of the uncached prompt (prefix-cache hits cost no prefill time) plus
        each output token at `price / T(b)` of the batch b it shared. Positive whenever any
        token was processed: batch 1 is the dearest, a full batch cheap. Idle time is not
        in it (see `idle_cost` in docs/economics.md).
        """
        b = batch_seen if batch_seen >= 1 else 1.0
        uncached = max(prompt_tokens - max(cached_tokens, 0), 0)
        return self.amortized_cost(uncached, max(completion_tokens, 0), b, context)
