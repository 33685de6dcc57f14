"""The log of aiohttp's server protocol: one short line per bad request, rate-limited, no request bytes.

aiohttp logs a request it cannot parse at ERROR with a traceback whose message
holds the raw bytes it read: headers (`Authorization` among them) and body.
Any client can write that into the log, as often as it likes. `ServerLog`
takes the place of aiohttp's `aiohttp.server` logger (`handler_args["logger"]`
in `gateway.http.app`): it writes the message template, the exception's type and
the HTTP status aiohttp answered, never the exception's text, arguments other
than the peer address, or a traceback; and at most `burst` lines per `window_s`,
then one line saying how many it left out.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """A stand-in for aiohttp's server logger that never writes what a client sent."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        burst: int = 10,
        window_s: float = 10.0,
    ) -> None:
        super().__init__(logger or logging.getLogger("neogate.http"), {})
        self._burst = burst
        self._window_s = window_s
        self._window_at = 0.0
        self._written = 0
        self._dropped = 0

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        exc = kwargs.get("exc_info")
        if exc is True:
            exc = sys.exc_info()[1]
        now = time.monotonic()
        if now - self._window_at >= self._window_s:
            if self._dropped:
                self.logger.warning(
                    "%d more server log lines left out in the last %.0fs",
                    self._dropped,
                    self._window_s,
                )
            self._window_at, self._written, self._dropped = now, 0, 0
        if self._written >= self._burst:
            self._dropped += 1
            return
        self._written += 1
        # The template only: aiohttp's arguments (other than a peer address) and every
        # exception text can carry request bytes.
        text = str(msg)
        if args:
            with contextlib.suppress(TypeError, ValueError):  # a template of its own kind
                text = text % _peer_only(args)
        if isinstance(exc, BaseException):
            text += f" ({_describe(exc)})"
            if isinstance(exc, HttpProcessingError):
                level = min(level, logging.WARNING)  # a client's mistake, not ours
            else:
                level = max(level, logging.ERROR)  # not a client's mistake: worth a look
        self.logger.log(level, "%s", text)

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return msg, kwargs  # `log` does all the work


def _peer_only(args: tuple[object, ...]) -> tuple[object, ...]:
    """Keep an argument only when it looks like a peer address; blank the rest."""
    out: list[object] = []
    for arg in args:
        if isinstance(arg, str) and len(arg) <= 64 and all(c in _ADDRESS for c in arg):
            out.append(arg)
        else:
            out.append("-")
    return tuple(out)


_ADDRESS = frozenset("0123456789abcdefABCDEF.:[]%")


def _describe(exc: BaseException) -> str:
    """The exception's type, aiohttp's status for it, and where it was raised; never its text."""
    parts = [type(exc).__name__]
    if isinstance(exc, HttpProcessingError):
        parts.append(f"answered {exc.code}")
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        code = tb.tb_frame.f_code
        parts.append(f"at {code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} in {code.co_name}")
    return ", ".join(parts)
