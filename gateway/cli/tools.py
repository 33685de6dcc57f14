"""Subcommands beside `serve`: simulated backends, the policy simulator, routing, usage, keys, load tests."""

from __future__ import annotations

import argparse
from typing import Any, TypeAlias

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_tool_parsers(sub: SubParsers) -> None:
    """Register every tool subcommand; each sets `func` on its namespace."""
    from loadtest.sim.cli import add_sim_parser, run_sim

    _hook(sub, add_sim_parser, run_sim, "sim")


def _hook(sub: SubParsers, add: Any, run: Any, name: str) -> None:
    before = set(sub.choices)
    add(sub)
    for added in set(sub.choices) - before:
        sub.choices[added].set_defaults(func=run)
    if name not in sub.choices:
        raise RuntimeError(f"subcommand {name} was not registered")
