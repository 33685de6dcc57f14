"""A lean HTTP/1.1 client for the hot path: keep-alive connection pools on asyncio Protocols.

One `ConnectionPool` per origin (plain http only). A request is one `transport.write`; the
answer is parsed as it arrives and the connection goes back to the pool the moment the body's
last byte arrived (see exchange.py).

    errors.py      the error tree below
    wire.py        response heads and chunked bodies (pure parsing)
    connection.py  one TCP connection (an asyncio Protocol)
    exchange.py    one request/response exchange on it: `Response`
    pool.py        `ConnectionPool`

    HttpClientError
    ├── ConnectError        the TCP connect failed (refused, unreachable)
    ├── ResponseTimeout     connect, pool wait, first byte, idle gap or total deadline passed
    ├── ConnectionClosed    the server closed or reset before the response head was complete
    ├── IncompleteBody      the server closed or reset before the body's framed end
    ├── BadResponse         not HTTP/1.x, broken framing, oversized head or body
    └── BadRequestHeader    a header name or value would break the request framing

Messages name the origin, never a header value (the API key travels in one).
"""

from adapters.fasthttp.connection import Connection
from adapters.fasthttp.errors import (
    BadRequestHeader,
    BadResponse,
    ConnectError,
    ConnectionClosed,
    HttpClientError,
    IncompleteBody,
    ResponseTimeout,
)
from adapters.fasthttp.exchange import Response
from adapters.fasthttp.pool import ConnectionPool
from adapters.fasthttp.wire import ChunkedDecoder, Head, parse_head

__all__ = [
    "BadRequestHeader",
    "BadResponse",
    "ChunkedDecoder",
    "ConnectError",
    "Connection",
    "ConnectionClosed",
    "ConnectionPool",
    "Head",
    "HttpClientError",
    "IncompleteBody",
    "Response",
    "ResponseTimeout",
    "parse_head",
]
