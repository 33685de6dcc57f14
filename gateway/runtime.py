"""The runtime of one config: every config-lifetime part of the request path, never changed once built.

A reload builds a new `Runtime` beside the running one and swaps `RuntimeRef.current`
in one step; what outlives a config is in `gateway.process.Process`.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from adapters.base import Backend
from gateway.config import BackendSpec, GatewayConfig, ModelSpec
from gateway.flow.estimate import Estimator
from gateway.flow.feedback import Feedback
from gateway.flow.meter import Meter
from gateway.flow.reliability import ReliabilitySettings
from gateway.flow.routing import Router
from gateway.http.auth import Authenticator, Tenant
from gateway.process import Process
from gateway.state.live import LiveState

__all__ = [
    "REQUEST_IDS",
    "RUNTIME",
    "RequestIds",
    "Runtime",
    "RuntimeRef",
    "Tenant",
]


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything the request path needs under one config (`gateway.wiring.build_runtime`)."""

    config: GatewayConfig
    process: Process
    backends: Mapping[str, Backend]
    specs: Mapping[str, BackendSpec]
    models: Mapping[str, ModelSpec]
    auth: Authenticator
    estimator: Estimator
    live: LiveState
    router: Router
    feedback: Feedback
    meter: Meter
    settings: ReliabilitySettings
    deadline_ceiling_s: float  # the longest backend total: a request's budget at most


class RuntimeRef:
    """The runtime in force over the process; a reload replaces `current` in one step."""

    __slots__ = ("_reload_waiters", "_reloads", "current", "process")

    def __init__(self, current: Runtime, process: Process) -> None:
        self.current = current
        self.process = process
        self._reloads = 0  # reloads from the policy file started so far
        self._reload_waiters: list[tuple[int, asyncio.Future[Runtime]]] = []

    def next_reload(self) -> asyncio.Future[Runtime]:
        """The outcome of the first reload from the file that starts after this call."""
        fut: asyncio.Future[Runtime] = asyncio.get_running_loop().create_future()
        self._reload_waiters.append((self._reloads + 1, fut))
        return fut

    def reload_started(self) -> int:
        self._reloads += 1
        return self._reloads

    def reload_ended(self, number: int, new: Runtime | None, exc: BaseException | None) -> None:
        """Tell the waiters whose reload this was: the new runtime, or why it was refused."""
        keep: list[tuple[int, asyncio.Future[Runtime]]] = []
        for first, fut in self._reload_waiters:
            if first > number:
                keep.append((first, fut))
            elif not fut.done():
                if new is not None:
                    fut.set_result(new)
                else:
                    fut.set_exception(exc or RuntimeError("reload failed"))
        self._reload_waiters = keep


RUNTIME: Final = web.AppKey("runtime", RuntimeRef)


class RequestIds:
    """Unique request ids without a syscall per request: a random per-process prefix and a counter."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(6)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"req_{self._prefix}{next(self._counter):010x}"


REQUEST_IDS: Final = web.AppKey("request_ids", RequestIds)
