"""Fault injection, the runtime control endpoint and request statistics of the simulated backends.

A request's fault comes from, in order: the `x-sim-fault` header, a model-name suffix
(`model@cut`), the fault set through `POST /sim/control` (applied with `fault_rate`), the
backend's default `fault` option. Delays come from the `x-sim-delay` header (seconds), else
the control's `delay_s`, else 1 s x time_scale.

Faults:
    error400, error429, error500, error503  the error with an OpenAI body (429: retry-after)
    error401, error403  a revoked key / a model the key may not use (OpenAI bodies)
    hang              never answers (no headers) until the server shuts down
    slow_first_byte   waits `delay` before sending the response headers
    slow              sends headers (streams) then waits `delay` before the first token
    cut               stream: closes the connection after a few tokens, no [DONE];
                      non-stream: closes the connection halfway through the body
    stall             like cut but keeps the connection open and silent
    error_midstream   stream: a few tokens, then `data: {"error": ...}` and the end (no [DONE]);
                      non-stream: error500
    malformed         stream: one event that is not JSON after the first tokens;
                      non-stream: a 200 body that is not JSON
    empty_stream      stream: a 200 event-stream that ends before its first event;
                      non-stream: a 200 with an empty body
    echo_key          a careless provider: after the first tokens, a chunk whose content
                      repeats the Authorization header it got, then an error event carrying it
                      again with no blank line after it; non-stream: error401 repeating it
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from loadtest.sim.common import SHUTDOWN, error_response, json_response
from loadtest.sim.parse import RequestError, load_body

FAULTS = frozenset(
    {
        "error400",
        "error401",
        "error403",
        "error429",
        "error500",
        "error503",
        "hang",
        "slow_first_byte",
        "slow",
        "cut",
        "stall",
        "error_midstream",
        "malformed",
        "empty_stream",
        "echo_key",
    }
)
MIDSTREAM_FAULTS = frozenset({"cut", "stall", "error_midstream", "echo_key"})
TOKENS_BEFORE_MIDSTREAM_FAULT = 3


@dataclass
class Control:
    """Mutable runtime knobs of one backend (set through POST /sim/control)."""

    fault: str | None = None
    fault_rate: float = 1.0
    delay_s: float | None = None


@dataclass
class Stats:
    """Requests seen by one backend, for tests and the soak run."""

    total: int = 0
    in_flight: int = 0
    by_fault: Counter[str] = field(default_factory=Counter)
    by_model: Counter[str] = field(default_factory=Counter)
    by_endpoint: Counter[str] = field(default_factory=Counter)
    by_status: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        """The body of GET /sim/stats."""
        return {
            "total": self.total,
            "in_flight": self.in_flight,
            "by_fault": dict(self.by_fault),
            "by_model": dict(self.by_model),
            "by_endpoint": dict(self.by_endpoint),
            "by_status": dict(self.by_status),
        }


@dataclass
class FaultState:
    """Per-app fault configuration, control knobs, statistics and the fault-rate dice."""

    default_fault: str | None
    time_scale: float
    rng: random.Random
    control: Control = field(default_factory=Control)
    stats: Stats = field(default_factory=Stats)


FAULT_STATE = web.AppKey("sim_faults", FaultState)


def check_fault(name: str | None, where: str) -> str | None:
    """Validate a fault name (None and "" mean no fault)."""
    if not name or name == "none":
        return None
    if name not in FAULTS:
        raise RequestError(f"unknown fault {name!r} in {where}; known: {sorted(FAULTS)}", where)
    return name


def check_fault_option(name: str | None) -> None:
    """Validate a configured default fault (ValueError, for options and the command line)."""
    if name and name != "none" and name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; known: {sorted(FAULTS)}")


def choose_fault(request: web.Request, model_fault: str | None) -> str | None:
    """The fault this request gets (header > model suffix > control > default)."""
    state = request.app[FAULT_STATE]
    header = request.headers.get("x-sim-fault")
    if header:
        return check_fault(header, "x-sim-fault")
    if model_fault:
        return check_fault(model_fault, "model")
    control = state.control
    if control.fault and (control.fault_rate >= 1.0 or state.rng.random() < control.fault_rate):
        return control.fault
    return state.default_fault


def fault_delay(request: web.Request) -> float:
    """Seconds a slow fault waits."""
    header = request.headers.get("x-sim-delay")
    if header:
        try:
            return max(float(header), 0.0)
        except ValueError:
            raise RequestError(
                f"x-sim-delay must be seconds, got {header!r}", "x-sim-delay"
            ) from None
    state = request.app[FAULT_STATE]
    if state.control.delay_s is not None:
        return state.control.delay_s
    return 1.0 * state.time_scale


def record(request: web.Request, endpoint: str, model: str, fault: str | None) -> None:
    """Count one parsed request."""
    stats = request.app[FAULT_STATE].stats
    stats.by_endpoint[endpoint] += 1
    stats.by_model[model] += 1
    stats.by_fault[fault or "none"] += 1


async def wait_for_shutdown(request: web.Request) -> None:
    """Block until the app shuts down (the client's disconnect cancels us earlier)."""
    await request.app[SHUTDOWN].wait()


async def before_headers(
    request: web.Request, fault: str | None, stream: bool
) -> web.Response | None:
    """Apply the faults that act before any byte is sent; a response ends the request."""
    if fault is None:
        return None
    if fault == "error400":
        return error_response(
            400, "Simulated bad request.", "invalid_request_error", "sim_error400"
        )
    if fault == "error401" or (fault == "echo_key" and not stream):
        given = request.headers.get("Authorization", "") if fault == "echo_key" else ""
        return error_response(
            401, f"Invalid API Key {given}".rstrip(), "invalid_request_error", "invalid_api_key"
        )
    if fault == "error403":
        return error_response(
            403, "This key may not use this model.", "permission_denied", "model_forbidden"
        )
    if fault == "error500" or (fault == "error_midstream" and not stream):
        return error_response(
            500, "Simulated internal server error.", "server_error", "sim_error500"
        )
    if fault == "error503":
        return error_response(
            503, "Simulated overload: service unavailable.", "server_error", "sim_error503"
        )
    if fault == "error429":
        delay = fault_delay(request)
        headers = {
            "retry-after": str(max(1, math.ceil(delay))),
            "retry-after-ms": str(math.ceil(delay * 1000)),
        }
        return error_response(
            429, "Simulated rate limit reached.", "requests", "rate_limit_exceeded", headers=headers
        )
    if fault == "hang":
        await wait_for_shutdown(request)
        return error_response(503, "Server shutting down.", "server_error", "shutdown")
    if fault == "slow_first_byte":
        await asyncio.sleep(fault_delay(request))
    return None


async def count_request(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: count statuses of API responses."""
    if request.path.startswith("/v1/"):
        request.app[FAULT_STATE].stats.by_status[str(response.status)] += 1


@web.middleware
async def track_requests(request: web.Request, handler: Any) -> web.StreamResponse:
    """Count API requests and those in flight."""
    if not request.path.startswith("/v1/") or request.method != "POST":
        return await handler(request)  # type: ignore[no-any-return]
    stats = request.app[FAULT_STATE].stats
    stats.total += 1
    stats.in_flight += 1
    try:
        return await handler(request)  # type: ignore[no-any-return]
    finally:
        stats.in_flight -= 1


def apply_control(state: FaultState, body: dict[str, Any]) -> dict[str, Any]:
    """Apply the common control keys; return the keys left for the backend."""
    rest = dict(body)
    control = state.control
    if "fault" in rest:
        value = rest.pop("fault")
        if value is not None and not isinstance(value, str):
            raise RequestError("'fault' must be a string or null", "fault")
        control.fault = check_fault(value, "fault")
    if "fault_rate" in rest:
        rate = rest.pop("fault_rate")
        if not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise RequestError("'fault_rate' must be between 0 and 1", "fault_rate")
        control.fault_rate = float(rate)
    if "delay_s" in rest:
        delay = rest.pop("delay_s")
        if delay is not None and (not isinstance(delay, int | float) or delay < 0):
            raise RequestError("'delay_s' must be >= 0 or null", "delay_s")
        control.delay_s = None if delay is None else float(delay)
    if rest.pop("reset_stats", False):
        stats = state.stats
        stats.total = 0
        for counter in (stats.by_fault, stats.by_model, stats.by_endpoint, stats.by_status):
            counter.clear()
    if rest.pop("reset", False):
        state.control = Control()
    return rest


def control_json(state: FaultState) -> dict[str, Any]:
    """The common part of the control state."""
    c = state.control
    return {
        "fault": c.fault,
        "fault_rate": c.fault_rate,
        "delay_s": c.delay_s,
        "default_fault": state.default_fault,
    }


async def read_control(request: web.Request) -> dict[str, Any]:
    """Parse a control body and apply the common keys (400 on errors)."""
    return apply_control(request.app[FAULT_STATE], load_body(await request.read()))


async def stats_handler(request: web.Request) -> web.Response:
    """GET /sim/stats."""
    return json_response(request.app[FAULT_STATE].stats.as_json())


def install(app: web.Application, default_fault: str | None, time_scale: float, seed: int) -> None:
    """Attach fault state, request counting and GET /sim/stats to `app`."""
    app[FAULT_STATE] = FaultState(
        default_fault=check_fault(default_fault, "fault"),
        time_scale=time_scale,
        rng=random.Random(seed),
    )
    app.middlewares.append(track_requests)
    app.on_response_prepare.append(count_request)
    app.router.add_get("/sim/stats", stats_handler)
