"""The values routing works on: a request, snapshots of backends, ranked candidates, a decision.

All frozen and slotted; built by the gateway (or the simulator) and handed to
`policies.select.select`, which reads them and never mutates or stores them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from policies.costmodel import GpuModel
from policies.headroom import Headroom
from policies.spec import SloClassSpec

# What a backend that sends no rate-limit headers has: nothing known, nothing near.
NO_HEADROOM = Headroom()
# No population miss budget known: every request is judged at its own tail alone.
NO_BUDGETS: Mapping[str, float] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Slo:
    """A latency promise as a plain value; None means no bound on that dimension."""

    max_ttft_s: float | None = None
    max_itl_s: float | None = None
    max_total_s: float | None = None
    # How long a request of this class may wait in the gateway queue for local headroom.
    max_queue_wait_s: float = 0.0

    @classmethod
    def from_spec(cls, spec: SloClassSpec) -> Slo:
        """Convert the config model once, at config load, not per request."""
        return cls(spec.max_ttft_s, spec.max_itl_s, spec.max_total_s, spec.max_queue_wait_s)


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What routing needs to know about one request."""

    model: str
    prompt_tokens: int
    max_output_tokens: int
    expected_output_tokens: int
    stream: bool
    slo_class: str
    slo: Slo
    # Absolute time (same clock as `now`) by which the answer must be complete; None: no deadline.
    deadline: float | None = None
    tenant: str = ""
    # Per SLO class: SLO misses the class can still afford in its window (the target miss
    # share x requests routed - misses measured - miss probabilities of local requests in
    # flight; `policies.budget`). A local worker may then take a request whose predicted
    # ITL miss probability is above TAIL_P, up to this. Empty: each request on its own.
    miss_budgets: Mapping[str, float] = field(default_factory=lambda: NO_BUDGETS, compare=False)


@dataclass(frozen=True, slots=True)
class BackendSnapshot:
    """One candidate backend for the request's model, as the gateway sees it right now.

    For local workers (`gpu` set) the cost and latency come from the cost model over
    the load fields, and `ttft_spread_s` / `itl_spread_s` are the spread of the model's
    prediction error (or of measured latency: more conservative). For everything else
    the price fields and the measured latency estimates are used.
    """

    name: str
    backend_model: str
    is_local: bool = False
    healthy: bool = True
    # Price in force, USD per token (ignored for local workers with a `gpu`).
    price_in_per_token: float = 0.0
    price_out_per_token: float = 0.0
    price_cached_in_per_token: float | None = None
    price_version: int = 0
    # Latency estimates (EWMA) and their spread (EW standard deviation), seconds. The
    # predicted TTFT is ttft_s + ttft_per_prompt_token_s * prompt tokens (0: prompt-blind).
    ttft_s: float = 0.5
    ttft_spread_s: float = 0.0
    ttft_per_prompt_token_s: float = 0.0
    itl_s: float = 0.02
    itl_spread_s: float = 0.0
    # Local workers: the cost model's relative prediction error (`RelativeError.spread`):
    # the margin is spread x (prediction + REL_FLOOR_S) for TTFT, spread x prediction for ITL.
    ttft_rel_spread: float = 0.0
    itl_rel_spread: float = 0.0
    # Rate-limit headroom and 429 cool-down from the provider's headers.
    headroom: Headroom = NO_HEADROOM
    # Worker metrics (scraped; trusted only when `metrics_fresh`).
    running: int = 0
    queued: int = 0
    kv_usage: float | None = None
    metrics_fresh: bool = False
    # Scraped between the last two scrapes: the mean wait before prefill (vLLM, SGLang) and
    # whether the worker preempts or queues for lack of KV room (policies.worker_signals).
    queue_wait_s: float | None = None
    preempting: bool = False
    # What the gateway itself knows instantly: its in-flight requests on this backend and
    # the prompt tokens it sent there that have not produced a first token yet.
    inflight: int = 0
    pending_prefill_tokens: int = 0
    # Prompt tokens per second the gateway sent this worker recently (a decaying average):
    # prefill steals GPU time from decoding, so it raises everyone's ITL.
    recent_prompt_tokens_per_s: float = 0.0
    # Requests per second the gateway sent this worker recently (the same decaying average):
    # how many arrivals a long prefill holds up (`policies.predict`, the protected TTFT).
    recent_requests_per_s: float = 0.0
    # The squared prompt sizes of those requests per second (the same decaying average): over
    # the prompt rate, the size-biased mean prompt E[x^2] / E[x] of the prompts that stall a
    # decode (`policies.predict.prefill_burst_s`). 0: not known.
    recent_prompt_sq_tokens_per_s: float = 0.0
    # Gateway-side cap on in-flight requests; None: no cap.
    max_concurrency: int | None = None
    gpu: GpuModel | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    """One usable backend with what sending the request there is predicted to cost and take."""

    backend: str
    predicted_cost_usd: float
    predicted_ttft_s: float
    predicted_itl_s: float
    predicted_total_s: float
    meets_slo: bool
    # Why it is where it is in the ranking when that is not obvious ("" when it meets the SLO).
    reason: str = ""
    # Batch size on a local worker once this request joins it (0 for remote backends).
    predicted_batch: int = 0
    # b*: the largest batch on this local worker whose predicted ITL meets the request's
    # ITL target (the protected class's for guarded work); 0 for remote backends.
    slo_batch: int = 0
    # Local workers: the predicted probability that the request (or, for guarded work, a
    # protected request in its place) misses the ITL target; 0 for remote backends.
    miss_probability: float = 0.0


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The ranked fallback order plus the explanation the gateway puts in headers."""

    candidates: tuple[Candidate, ...]
    reason: str
    price_version: int
    policy: str
    rejected: tuple[tuple[str, str], ...] = ()
    # Seconds worth waiting in the gateway queue for local headroom before using
    # `candidates` (which then start with an external backend); None: go now.
    wait_for_local: float | None = None
    # The cheapest external candidate that meets the SLO (else the cheapest external) and
    # its predicted cost for the expected tokens: the alternative to serving locally.
    alternative: str | None = None
    alternative_cost_usd: float | None = None
    # The SLO class whose miss budget judged the local workers (the request's own, or the
    # protected class's for guarded work); "" when the policy keeps no budget (not cost).
    budget_class: str = ""
    # The request's own SLO class, and its public model (budgets are kept per model).
    slo_class: str = ""
    model: str = ""

    @property
    def chosen(self) -> Candidate | None:
        """The first choice, or None when no backend is usable."""
        return self.candidates[0] if self.candidates else None
