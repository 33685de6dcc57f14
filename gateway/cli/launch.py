"""What `neogate serve` and its worker processes share: the options, the embedded policy, the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class ServeOptions:
    config_path: str | None
    host: str | None = None
    port: int | None = None
    workers: int = 1
    drain_timeout_s: float = 30.0
    worker_index: int | None = None  # set in each worker of `--workers N`


def default_policy_text() -> str:
    """The embedded default policy (its backends are `sim:` simulations)."""
    return resources.files("policies").joinpath("examples/default.yaml").read_text("utf-8")


def run_async(coro_factory: Callable[[], object]) -> None:
    """Run a coroutine on uvloop where available."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(coro_factory())  # type: ignore[arg-type]
