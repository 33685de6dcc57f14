"""The `x-neogate-*` request headers a client may send, checked before a request is admitted.

A value the gateway cannot use is a 400 naming the header and what it accepts:
silently ignoring `x-neogate-timeout: abc` or an unknown SLO class would serve the
request under limits the client did not ask for.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Final

from gateway.errors import InvalidRequest

SLO_HEADER: Final = "x-neogate-slo-class"
DEADLINE_HEADER: Final = "x-neogate-deadline-s"
TIMEOUT_HEADER: Final = "x-neogate-timeout"
_PREFIX: Final = "x-neogate-"


_READ: Final = (SLO_HEADER, TIMEOUT_HEADER, DEADLINE_HEADER)


def check_client_headers(headers: Mapping[str, str], slo_classes: Collection[str]) -> None:
    """Raise InvalidRequest for an `x-neogate-*` header whose value the gateway cannot use."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        # A case-insensitive multidict (both roads): look up the three names the gateway
        # reads, every copy of each, instead of lowercasing every header of every request.
        for name in _READ:
            if name in headers:
                for value in getall(name):
                    _check(name, value, slo_classes)
        return
    for name in headers:
        if len(name) <= len(_PREFIX) or name[: len(_PREFIX)].lower() != _PREFIX:
            continue
        _check(name.lower(), headers[name], slo_classes)
    # Other x-neogate-* names pass unread: clients and proxies echo the gateway's own
    # response headers (x-neogate-backend, ...), and those must not fail a request.


def _check(lower: str, value: str, slo_classes: Collection[str]) -> None:
    if lower == SLO_HEADER and value not in slo_classes:
        raise _bad(lower, f"unknown SLO class {value!r}", ", ".join(sorted(slo_classes)))
    if lower == TIMEOUT_HEADER and _seconds(value, allow_zero=False) is None:
        raise _bad(lower, f"{value!r} is not a number of seconds", "a number > 0")
    if lower == DEADLINE_HEADER and _seconds(value, allow_zero=True) is None:
        raise _bad(lower, f"{value!r} is not a number of seconds", "a number >= 0")


def _bad(header: str, problem: str, accepted: str) -> InvalidRequest:
    return InvalidRequest(
        f"header {header}: {problem}; accepted: {accepted}", param=header, code="invalid_header"
    )


def _seconds(value: str, *, allow_zero: bool) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        return None
    return seconds
