"""Header policy of the request path: which client headers reach an upstream, the request's
deadline from the client's header, and the headers that explain an answer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from gateway.flow.attempt import Attempt
from gateway.flow.completion import Completion
from gateway.http.client_headers import TIMEOUT_HEADER

# Client headers that may reach an upstream; everything else (Authorization,
# cookies, hop-by-hop headers) stays at the gateway.
FORWARDED_CLIENT_HEADERS: Final = ("traceparent", "tracestate", "user-agent", "openai-beta")


def forward_headers(h: Mapping[str, str], rid: str) -> dict[str, str]:
    """The allow-listed client headers plus our request id.

    A value that is not printable ASCII (obs-text bytes such as `caf\xff`, or control
    characters) is dropped: it cannot be written to an upstream as it came.
    """
    out = {"X-Request-Id": rid}
    for name in FORWARDED_CLIENT_HEADERS:
        value = h.get(name)
        if value is not None and value.isascii() and value.isprintable():
            out[name] = value
    return out


def request_deadline_s(ceiling_s: float, headers: Mapping[str, str]) -> float:
    """The overall budget of a request: `ceiling_s` (the longest backend total), shortened
    by the client's timeout header."""
    asked = headers.get(TIMEOUT_HEADER)
    if asked:
        try:
            return max(0.001, min(ceiling_s, float(asked)))
        except ValueError:
            return ceiling_s
    return ceiling_s


def answer_headers(
    completion: Completion, attempt: Attempt, content_type: str | None
) -> dict[str, str]:
    """Headers that explain the decision: which backend, why, and at what predicted cost."""
    out = {"x-request-id": completion.rid, "x-neogate-backend": attempt.backend}
    if completion.client_request_id is not None:
        out["x-client-request-id"] = completion.client_request_id
    decision = completion.decision
    if decision is not None:
        out["x-neogate-route-reason"] = decision.reason
        cand = next((c for c in decision.candidates if c.backend == attempt.backend), None)
        if cand is not None:
            # docs/economics.md: what serving it here costs at the margin (0 on a local
            # GPU with headroom under b*; list price x expected tokens outside), and what
            # the cheapest external candidate meeting the SLO would have cost.
            out["x-neogate-marginal-cost-usd"] = f"{cand.predicted_cost_usd:.8f}"
        if decision.alternative_cost_usd is not None:
            out["x-neogate-alternative-cost-usd"] = f"{decision.alternative_cost_usd:.8f}"
        out["x-neogate-price-version"] = str(decision.price_version)
    if attempt.number:
        out["x-neogate-attempts"] = str(attempt.number + 1)
    if content_type:
        out["Content-Type"] = content_type
    return out
