"""The client's error tree; a message names the origin, never a header value (the API key travels in one)."""

from __future__ import annotations


class HttpClientError(Exception):
    """A failure of this client; the message names the origin, never a header."""


class ConnectError(HttpClientError):
    pass


class ResponseTimeout(HttpClientError):
    pass


class ConnectionClosed(HttpClientError):
    """Closed before the head; `got_bytes` says whether any response byte had arrived."""

    def __init__(self, message: str, *, got_bytes: bool) -> None:
        super().__init__(message)
        self.got_bytes = got_bytes


class IncompleteBody(HttpClientError):
    pass


class BadResponse(HttpClientError):
    pass


class BadRequestHeader(HttpClientError):
    pass
