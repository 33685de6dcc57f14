"""The runtime of one gateway app: every part built from the config, held under one AppKey."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import web

from adapters.base import Backend
from gateway.config import BackendSpec, GatewayConfig, ModelSpec
from gateway.flow.forward import Attempt
from gateway.http.auth import Authenticator, Tenant
from gateway.http.client_headers import TIMEOUT_HEADER
from gateway.metrics import GatewayMetrics
from gateway.state.limits import LimitStore

if TYPE_CHECKING:
    from gateway.flow.estimate import Estimator
    from gateway.flow.routing import Router
    from gateway.metering.meter import Completion, Meter
    from gateway.state.background import Background
    from gateway.state.keys import KeyStore

__all__ = [
    "REQUEST_IDS",
    "RUNTIME",
    "AppOptions",
    "RequestIds",
    "Runtime",
    "RuntimeRef",
    "Tenant",
]

# Client headers that may reach an upstream; everything else (Authorization,
# cookies, hop-by-hop headers) stays at the gateway.
FORWARDED_CLIENT_HEADERS: Final = ("traceparent", "tracestate", "user-agent", "openai-beta")


@dataclass
class Runtime:
    """Everything the request path needs, built once per app."""

    config: GatewayConfig
    backends: dict[str, Backend]
    specs: dict[str, BackendSpec]
    models: dict[str, ModelSpec]
    metrics: GatewayMetrics
    auth: Authenticator
    estimator: Estimator
    router: Router
    meter: Meter
    keys: KeyStore
    background: Background | None = None
    retired: list[Backend] = field(default_factory=list)  # adapters a reload replaced
    extra_forward_headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def forward_headers(self, h: Mapping[str, str], rid: str) -> dict[str, str]:
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

    def request_deadline_s(self, tenant: Tenant, headers: Mapping[str, str]) -> float:
        """The overall budget of a request: the longest backend total, shortened by the client."""
        ceiling = max(s.timeouts.total_s for s in self.specs.values())
        asked = headers.get(TIMEOUT_HEADER)
        if asked:
            try:
                return max(0.001, min(ceiling, float(asked)))
            except ValueError:
                return ceiling
        return ceiling

    def answer_headers(
        self, completion: Completion, attempt: Attempt, content_type: str | None
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


@dataclass(frozen=True)
class AppOptions:
    """How this app is run, beyond the policy file."""

    anonymous_allowed: bool = False
    admin_key: str | None = None
    server_secret: str | None = None
    ledger: bool = True  # off only for the metering-off comparison benchmark
    limit_store: LimitStore | None = None  # shared (Redis) limits; None: in-process
    config_path: str | None = None  # the file SIGHUP and POST /admin/reload read again
    # Which worker of `serve --workers N` this is (None: a single process). Worker i > 0
    # spools to its own file; an admin reload in one worker reloads them all.
    worker_index: int | None = None
    workers: int = 1  # how many `serve --workers N` runs: worker 0 adopts the spools of the rest
    # Backends the file lists as `sim:worker` / `sim:provider` -> the URL of the simulation
    # the command line started for them: a reload puts the same URLs in again.
    simulated: Mapping[str, str] = field(default_factory=dict)


class RuntimeRef:
    """The runtime in force; a reload replaces `current` in one step."""

    __slots__ = ("_reload_waiters", "_reloads", "current", "keys_changed", "options", "session")

    def __init__(
        self, current: Runtime, options: AppOptions, session: aiohttp.ClientSession
    ) -> None:
        self.current = current
        self.options = options
        self.session = session
        # Called after this process creates or revokes a key; shared state (Redis)
        # sets it so other replicas refresh at once instead of at their next poll.
        self.keys_changed: Callable[[], None] = _nothing
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


def _nothing() -> None:
    return None


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
