"""aiohttp's answer to a request it cannot read, as an OpenAI error that quotes nothing of it.

aiohttp answers a head its parser refuses (malformed, too many or too long
headers, two `Host`s...) through `RequestHandler.handle_error`, with plain
text that quotes the bytes it read: a tenant's key and the start of the body
among them. The guard in front of aiohttp (`gateway.http.conn_deadlines`)
answers a connection's first malformed head itself; a later one, on a
keep-alive connection, is aiohttp's to answer, in order behind the answers to
the requests before it. `OpenAIErrors` is aiohttp's request handler (the
protocol of one connection, `web.RequestHandler`, public) with that one method
in our words: an OpenAI error body with aiohttp's status (400 for every parse
error in aiohttp 3.14; it never sends 431), `Connection: close`, our request
id, and one line to the server log (`gateway.http.server_log.ServerLog`:
rate-limited, never the request's bytes). The rest of aiohttp's behaviour,
pipelining order included, is unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, InvalidURLError, LineTooLong

from gateway.errors import GatewayError, InvalidRequest
from gateway.runtime import RequestIds

# The keyword arguments of every request handler of an app (its `handler_args`, plus
# `access_log=None`: the gateway keeps no aiohttp access log), kept where the listening
# socket can read them: aiohttp's server does not say what it was given.
SERVER_ARGS: Final = web.AppKey("server_args", dict[str, Any])

# What was wrong, by the kind of aiohttp's error; never its text (which quotes the bytes).
_KINDS: Final[tuple[tuple[type[Exception], str], ...]] = (
    (BadHttpMethod, "an invalid method"),
    (InvalidURLError, "an invalid request target"),
    (LineTooLong, "a request line or header over the size limit"),
)


class OpenAIErrors(web.RequestHandler):
    """aiohttp's protocol for one connection, answering what it cannot read as OpenAI JSON."""

    __slots__ = ("_ids",)

    def __init__(self, manager: web.Server, *, ids: RequestIds, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._ids = ids

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        error = _error(status, exc)
        # One line, through the ServerLog: the exception's type and status, never its text.
        what = "Bad request" if error.http_status() < 500 else "Error handling a request"
        self.log_exception(f"{what} from %s", request.remote, exc_info=exc)
        if request.writer.output_size > 0:
            # An answer is under way: it cannot become an error (as aiohttp says it).
            raise ConnectionError("the response is under way: no error response can follow")
        resp = web.Response(
            status=error.http_status(),
            body=error.body(),
            headers=error.response_headers(self._ids.next()),
        )
        resp.headers["Connection"] = "close"  # aiohttp answers as HTTP/1.0 and leaves it out
        resp.force_close()
        return resp


def _error(status: int, exc: BaseException | None) -> GatewayError:
    if status >= 500 or not isinstance(exc, HttpProcessingError):
        return GatewayError("internal error in the gateway")
    kind = next((k for cls, k in _KINDS if isinstance(exc, cls)), "a malformed head")
    # aiohttp says 400 for every head it cannot read (and 500 for a failure of its own).
    return InvalidRequest(f"the request is not valid HTTP/1.1: {kind}", code="malformed_request")


def handler_factory(runner: web.AppRunner, ids: RequestIds) -> Callable[[], asyncio.Protocol]:
    """The protocol factory of the connections `runner`'s app reads with aiohttp."""
    server = runner.server
    app = runner.app
    if server is None:
        raise RuntimeError("the runner is not set up")
    kwargs: dict[str, Any] = {"access_log": None}
    if SERVER_ARGS in app:
        args: dict[str, Any] = app[SERVER_ARGS]
        kwargs = args
    loop = asyncio.get_running_loop()

    def make() -> asyncio.Protocol:
        return OpenAIErrors(server, loop=loop, ids=ids, **kwargs)

    return make
