"""One request head at the edge, parsed by llhttp (httptools) as its bytes arrive.

`HeadReader.feed(buf)` is given the connection's unread bytes, from the first
byte of the request in progress, each time more arrive. It feeds llhttp (in its
strict mode) only up to the head's blank line, so the body and any pipelined
request stay in the buffer, and answers `None` (the head is not whole yet), a
`Head` the edge serves itself, or raises `HandOver`: the head is malformed,
outside the edge's subset, or near aiohttp's limits, and the connection goes,
with every unanswered byte, to aiohttp, which answers it as on its own road.

The subset: `POST` to one of the three inference paths, `HTTP/1.1`, exactly
one `Content-Length`, no `Transfer-Encoding`, `Expect` or `Upgrade`, one
`Host`, no second copy of a header aiohttp takes once (nor of `Connection`),
at most 100 headers of at most 8190 bytes each.
"""

from __future__ import annotations

from typing import Final, NamedTuple

import httptools
from multidict import CIMultiDict

from gateway.http.inbound import Endpoint

_ROUTES: Final[dict[bytes, Endpoint]] = {
    b"/v1/chat/completions": "chat",
    b"/v1/completions": "completions",
    b"/v1/embeddings": "embeddings",
}
_HAND_OVER_HEADERS: Final = ("transfer-encoding", "expect", "upgrade")
# Headers aiohttp refuses to see twice (its singletons; two Content-Length never get this
# far, llhttp refuses them) and Connection, which the edge reads as one value: a head with
# two goes to aiohttp, which answers it.
_AT_MOST_ONCE: Final = (
    "connection",
    "content-type",
    "user-agent",
    "content-location",
    "content-range",
    "etag",
    "max-forwards",
    "server",
)
MAX_HEAD: Final = 65536  # a longer head goes to aiohttp, whose limits answer it
# aiohttp's limits (set in `gateway.http.app`); a head near them is handed over, so the two
# roads refuse the same requests with the same status.
MAX_HEADERS: Final = 128
MAX_FIELD_SIZE: Final = 16384
_EDGE_MAX_HEADERS: Final = 100
_EDGE_MAX_LINE: Final = 8190


class HandOver(Exception):
    """The head is aiohttp's to answer."""


class Head(NamedTuple):
    """A whole head the edge serves itself."""

    endpoint: Endpoint
    headers: CIMultiDict[str]
    length: int  # of the body
    keep_alive: bool
    end: int  # where the body starts in the buffer


class HeadReader:
    """The head in progress on one connection: llhttp's state and what it has read."""

    __slots__ = ("_done", "_fed", "_keep_alive", "_pairs", "_parser", "_post_1_1", "_url")

    _parser: httptools.HttpRequestParser
    _fed: int  # bytes of the buffer fed to llhttp
    _url: bytes
    _pairs: list[tuple[bytes, bytes]]
    _done: bool
    _keep_alive: bool
    _post_1_1: bool

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._fed = 0
        self._url = b""
        self._pairs = []
        self._done = False
        self._keep_alive = False
        self._post_1_1 = False

    def feed(self, buf: bytes) -> Head | None:
        """Read on in `buf` (the bytes so far, from the request's first byte)."""
        fed = self._fed
        end = buf.find(b"\r\n\r\n", max(fed - 3, 0))
        stop = end + 4 if end >= 0 else len(buf)
        if stop > MAX_HEAD:
            raise HandOver("a head this long meets aiohttp's limits")
        try:
            self._parser.feed_data(buf if fed == 0 and stop == len(buf) else buf[fed:stop])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            raise HandOver("malformed, or an upgrade") from None
        self._fed = stop
        if end < 0:
            return None
        if not self._done:
            raise HandOver("llhttp did not end the head at its blank line")
        head = self._head(stop)
        self._reset()  # the next head starts afresh (this parser expects the body next)
        return head

    def _head(self, end: int) -> Head:
        endpoint = _ROUTES.get(self._url)
        pairs = self._pairs
        if endpoint is None or not self._post_1_1 or len(pairs) > _EDGE_MAX_HEADERS:
            raise HandOver("another request")
        # A head shorter than the longest field allowed cannot hold one that is too long.
        if end > _EDGE_MAX_LINE and any(
            len(name) + len(value) + 2 > _EDGE_MAX_LINE for name, value in pairs
        ):
            raise HandOver("a field near aiohttp's limit")
        headers: CIMultiDict[str] = CIMultiDict(
            [
                (name.decode("latin-1"), value.rstrip(b" \t").decode("utf-8", "surrogateescape"))
                for name, value in pairs
            ]
        )
        length = _content_length(headers)
        # llhttp's strict mode takes only ASCII token characters in a name, so names that
        # differ once lowercased differ for the case-insensitive headers too: without a
        # repeated name (the usual head), no header can be there twice.
        names = {name.lower() for name, _ in pairs}
        once = len(names) == len(pairs)
        if length is None or (  # HTTP/1.1 needs one Host
            b"host" not in names if once else len(headers.getall("host", ())) != 1
        ):
            raise HandOver("no single length or Host")
        for name in _HAND_OVER_HEADERS:
            if name in headers:
                raise HandOver(name)
        if not once:
            for name in _AT_MOST_ONCE:
                if len(headers.getall(name, ())) > 1:
                    raise HandOver(f"two {name}")
        return Head(endpoint, headers, length, self._keep_alive, end)

    # -- llhttp callbacks (httptools) --

    def on_url(self, url: bytes) -> None:
        self._url += url  # in pieces when the request line arrives in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        self._pairs.append((name, value))

    def on_headers_complete(self) -> None:
        self._done = True
        # Read now: without a body, llhttp ends the message at once and forgets its flags.
        parser = self._parser
        self._keep_alive = parser.should_keep_alive()
        self._post_1_1 = parser.get_method() == b"POST" and parser.get_http_version() == "1.1"


def _content_length(headers: CIMultiDict[str]) -> int | None:
    values = headers.getall("content-length", None)
    if values is None or len(values) != 1:
        return None
    value = values[0]
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        return None
    return int(value)
