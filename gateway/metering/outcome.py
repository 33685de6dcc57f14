"""How the attempt that answered a request ended: one value, recorded by the meter and learned from by routing."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.metering.usage import UpstreamTimings
from policies.types import Candidate


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """The answering attempt's end, as measured once (the meter's row and routing's feedback).

    Times are seconds since the request arrived; `ttft_s` is None when no byte reached
    the client. `prompt_tokens` is the estimate routing used (the TTFT fit's x).
    """

    backend: str
    model: str
    status: str  # the ledger's outcome: "ok", "upstream_cut", "client_disconnect", ...
    ttft_s: float | None
    total_s: float
    prompt_tokens: int
    completion_tokens: int = 0
    timings: UpstreamTimings | None = None  # the provider's own (Groq's usage timings)
    predicted: Candidate | None = None  # routing's candidate for this backend
