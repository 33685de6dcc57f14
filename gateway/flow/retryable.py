"""Which upstream failures another attempt may cure, and what the client is told at the end.

Retryable (unreachable, reset, 5xx, 429, 401/403, timeout, broken body): the next backend
may answer; transient (a refused or reset connection, 500/502/503/504): even the same
backend may, a moment later. Anything else (400, 404, 409, 413, 422) is the client's own
mistake, never retried. Once the gateway's own tries are spent the client is told to retry
after a while (`x-should-retry: true`, `retry-after`), except when the backend refused
the gateway's own credentials.
"""

from __future__ import annotations

from gateway.errors import GatewayError, UpstreamError, UpstreamStatus, UpstreamUnavailable

# Upstream statuses that are the gateway's own credentials failing on that backend: another
# backend may well succeed, and the breaker should see the backend as broken.
_CREDENTIAL_STATUSES = frozenset({401, 403})
# Upstream statuses worth one more try on the same backend when it is the only candidate.
_TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})


def is_retryable(exc: GatewayError) -> bool:
    """Whether another backend might succeed where this attempt failed."""
    if isinstance(exc, UpstreamStatus):
        return exc.retryable or exc.upstream_status in _CREDENTIAL_STATUSES
    return isinstance(exc, UpstreamError)


def is_transient(exc: GatewayError) -> bool:
    """A failure that the same backend may well not repeat a moment later."""
    if isinstance(exc, UpstreamStatus):
        return exc.upstream_status in _TRANSIENT_STATUSES
    return isinstance(exc, UpstreamUnavailable)


def advise_client_retry(exc: GatewayError) -> None:
    """Set what the client is told once the gateway's own tries are over.

    Waiting helps after a transient failure (5xx, unreachable, timeout, 429, nothing in
    service): `x-should-retry: true` and a `retry-after`. It does not when the backend
    refuses the gateway's own credentials: `false`, and no `retry-after`.
    """
    if isinstance(exc, UpstreamStatus) and exc.upstream_status in _CREDENTIAL_STATUSES:
        exc.should_retry, exc.retry_after_s = False, None
        return
    exc.should_retry = True
    if exc.retry_after_s is None:
        exc.retry_after_s = 1.0
