"""Reading a policy file: the one validator of check-config, serve and reload.

Schema, cross-references and (on request) unset secrets in one pass, every problem
with its field path and line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import ValidationError

from gateway.config.env import env_problems
from gateway.config.issues import ConfigError, ConfigIssue, field_path, line_of, yaml_issue
from gateway.config.references import reference_problems
from gateway.config.schema import GatewayConfig


def load_config(
    path: str | Path, env: Mapping[str, str] | None = None, *, require_env: bool = False
) -> GatewayConfig:
    """Read and validate a policy file; raise ConfigError listing every problem.

    `require_env` (check-config, serve, reload) also refuses `env:` secrets whose
    variable is unset, in the same pass as every other problem.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [ConfigIssue("", None, f"cannot read file: {exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(p), [ConfigIssue("", None, f"not UTF-8 text: {exc}")]) from exc
    return parse_config(text, source=str(p), env=env, require_env=require_env, base_dir=p.parent)


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    require_env: bool = False,
    base_dir: Path | None = None,
) -> GatewayConfig:
    """Validate policy YAML text: schema, cross-references and (with `require_env`) secrets,
    every problem in one pass, each with its field path and line.

    `base_dir` is where relative paths in the file (profile files) are looked up.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [yaml_issue(exc)]) from exc
    if not isinstance(data, dict):
        raise ConfigError(source, [ConfigIssue("", 1, "the file must be a YAML mapping")])
    issues: list[ConfigIssue] = []
    config: GatewayConfig | None = None
    try:
        config = GatewayConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        issues += [
            ConfigIssue(field_path(err["loc"]), line_of(node, err["loc"]), err["msg"])
            for err in exc.errors()
        ]
    located = reference_problems(data)
    if require_env:
        located += env_problems(data, env)
    issues += [ConfigIssue(field_path(loc), line_of(node, loc), msg) for loc, msg in located]
    if issues or config is None:
        raise ConfigError(source, sorted(issues, key=lambda i: (i.line or 0, i.path)))
    return config
