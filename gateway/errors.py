"""The typed error tree of the gateway and the one renderer of OpenAI error bodies.

    GatewayError                      500 server_error
    ├── InvalidRequest                400 invalid_request_error
    │   └── InvalidJSON               400 invalid_request_error / invalid_json
    ├── Unauthenticated               401 invalid_request_error / invalid_api_key
    ├── PermissionDenied              403 permission_error
    ├── NotFound                      404 invalid_request_error / not_found
    │   └── ModelNotFound             404 invalid_request_error / model_not_found
    ├── MethodNotAllowed              405 invalid_request_error / method_not_allowed
    ├── RequestTimeout                408 invalid_request_error / request_timeout
    ├── PayloadTooLarge               413 invalid_request_error / request_too_large
    ├── UnsupportedMediaType          415 invalid_request_error / unsupported_content_encoding
    ├── LimitExceeded                 429 rate_limit_exceeded (retry-after where waiting helps)
    │   ├── BudgetExceeded            429 insufficient_quota / budget_exceeded
    │   └── Overloaded                429 rate_limit_exceeded / gateway_overloaded
    ├── UpstreamError                 502 upstream_error (the backend failed us)
    │   ├── UpstreamUnavailable       502 upstream_error / upstream_unreachable
    │   ├── UpstreamStatus            the upstream's own status (a 4xx passes through as sent)
    │   ├── UpstreamProtocolError     502 upstream_error / upstream_bad_response
    │   └── UpstreamTimeout           504 upstream_error / upstream_timeout
    └── NoBackendAvailable            503 service_unavailable / no_backend_available

Everything that reaches a client as an error goes through `render()`; the
`x-should-retry` header is set from `should_retry` (else the class's
`retry_default`) so the OpenAI SDK neither multiplies the gateway's own retries
nor gives up where waiting helps. `retry-after` is only ever sent beside
`x-should-retry: true` (or no verdict): never with `false`.
"""

from __future__ import annotations

from typing import ClassVar

import orjson


class GatewayError(Exception):
    """Root of every error the gateway reports to a client."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"
    retry_default: ClassVar[bool | None] = None  # x-should-retry when `should_retry` is unset

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.retry_after_s = retry_after_s
        self.should_retry = should_retry

    def http_status(self) -> int:
        """The HTTP status this error is sent with."""
        return self.status

    def body(self) -> bytes:
        """The OpenAI-format JSON body."""
        return render_body(self.message, self.error_type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        """Headers that steer the client's own retry logic."""
        out: dict[str, str] = {}
        retry = self.should_retry if self.should_retry is not None else self.retry_default
        if self.retry_after_s is not None and retry is not False:
            out["retry-after"] = str(max(1, round(self.retry_after_s + 0.499)))
            out["retry-after-ms"] = str(max(1, int(self.retry_after_s * 1000)))
        if retry is not None:
            out["x-should-retry"] = "true" if retry else "false"
        return out

    def response_headers(self, request_id: str) -> dict[str, str]:
        """Every header of the error response: retry steering, our request id, JSON."""
        out = self.headers()
        out["x-request-id"] = request_id
        out["Content-Type"] = "application/json"
        return out


def render_body(message: str, error_type: str, param: str | None, code: str | None) -> bytes:
    """The single place the `{"error": {...}}` body is built."""
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    )


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"
    default_code = "invalid_request"
    retry_default = False


class InvalidJSON(InvalidRequest):
    default_code = "invalid_json"


class Unauthenticated(GatewayError):
    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"
    retry_default = False


class PermissionDenied(GatewayError):
    status = 403
    error_type = "permission_error"
    default_code = "permission_denied"
    retry_default = False


class NotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"
    retry_default = False


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"
    retry_default = False


class PayloadTooLarge(GatewayError):
    status = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"
    retry_default = False


class RequestTimeout(GatewayError):
    status = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class UnsupportedMediaType(GatewayError):
    status = 415
    error_type = "invalid_request_error"
    default_code = "unsupported_content_encoding"


class LimitExceeded(GatewayError):
    status = 429
    error_type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"
    retry_default = True  # a rate limit or a full queue: waiting helps


class BudgetExceeded(LimitExceeded):
    error_type = "insufficient_quota"
    default_code = "budget_exceeded"
    retry_default = False  # unless the budget's window ends soon (then should_retry is set)


class Overloaded(LimitExceeded):
    default_code = "gateway_overloaded"


class UpstreamError(GatewayError):
    status = 502
    error_type = "upstream_error"
    default_code = "bad_gateway"


class UpstreamUnavailable(UpstreamError):
    default_code = "upstream_unreachable"


class UpstreamProtocolError(UpstreamError):
    default_code = "upstream_bad_response"


class UpstreamTimeout(UpstreamError):
    status = 504
    default_code = "upstream_timeout"


class UpstreamStatus(UpstreamError):
    """The upstream answered with an error status; its body may pass through (4xx)."""

    def __init__(
        self,
        message: str,
        *,
        upstream_status: int,
        upstream_body: bytes = b"",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, code=f"upstream_{upstream_status}", retry_after_s=retry_after_s)
        self.upstream_status = upstream_status
        self.upstream_body = upstream_body

    @property
    def passes_through(self) -> bool:
        """Client mistakes reported by the upstream are the client's to see, unchanged."""
        return self.upstream_status in (400, 404, 409, 413, 422)

    @property
    def retryable(self) -> bool:
        """Whether another backend might succeed where this one failed."""
        return self.upstream_status in (408, 429) or self.upstream_status >= 500

    def http_status(self) -> int:
        if self.passes_through:
            return self.upstream_status
        if self.upstream_status == 429:
            return 429
        return 502

    def body(self) -> bytes:
        if self.passes_through and _looks_like_openai_error(self.upstream_body):
            return self.upstream_body
        return super().body()


class NoBackendAvailable(GatewayError):
    status = 503
    error_type = "service_unavailable"
    default_code = "no_backend_available"


def _looks_like_openai_error(body: bytes) -> bool:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)
