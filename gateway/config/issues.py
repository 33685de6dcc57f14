"""Where a problem in a policy file is: `ConfigIssue` by field path and line, `ConfigError` with all of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

Loc = tuple[int | str, ...]


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a policy file, located by field path and (where known) line."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.path or '<root>'}: {self.message}"

    def located(self, source: str) -> str:
        """The issue with the file it is in: `policy.yaml, line 9: models.0.backends.1: ...`."""
        return f"{source}, {self}" if self.line else f"{source}: {self}"


class ConfigError(Exception):
    """A policy file that must not start a server; carries every issue found."""

    def __init__(self, source: str, issues: Sequence[ConfigIssue]) -> None:
        self.source = source
        self.issues = list(issues)
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.issues)} error(s)"]
        lines += [f"  {issue.located(self.source)}" for issue in self.issues]
        return "\n".join(lines)


def field_path(loc: Sequence[int | str]) -> str:
    return ".".join(str(p) for p in loc)


def yaml_issue(exc: yaml.YAMLError) -> ConfigIssue:
    """A YAML syntax error by line and column, without PyYAML's `in "<unicode string>"`."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    what = f"{context}, {problem}" if context else problem
    if mark is None:
        return ConfigIssue("", None, f"not valid YAML: {what}")
    return ConfigIssue("", mark.line + 1, f"not valid YAML: {what} (column {mark.column + 1})")


def line_of(node: yaml.Node | None, loc: Sequence[int | str]) -> int | None:
    """Follow a pydantic error location through the YAML node tree to a line number."""
    current = node
    line = current.start_mark.line + 1 if current is not None else None
    for part in loc:
        nxt: Any = None
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                if key.value == str(part):
                    nxt = value
                    line = key.start_mark.line + 1
                    break
        elif (
            isinstance(current, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(current.value)
        ):
            nxt = current.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            break
        current = nxt
    return line
