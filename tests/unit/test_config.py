"""Policy YAML validation: good files load, bad files name the field and line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, is_loopback, missing_env, parse_config

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
backends:
  - name: gpu-a
    kind: vllm
    base_url: http://127.0.0.1:8001/v1
    models: {llama: meta-llama/Llama-3.1-8B-Instruct}
    gpu: {price_per_hour: 2.95}
  - name: groq
    kind: groq
    base_url: https://api.groq.com/openai/v1
    api_key: env:GROQ_API_KEY
    models: {llama: llama-3.1-8b-instant}
    price: {input_per_million: 0.05, output_per_million: 0.08}
models:
  - name: llama
    backends: [gpu-a, groq]
tenants:
  - name: acme
    api_keys: [env:ACME_KEY]
"""


def test_good_file_loads_with_defaults() -> None:
    cfg = parse_config(GOOD)
    assert [b.name for b in cfg.backends] == ["gpu-a", "groq"]
    assert cfg.backends[0].is_local and not cfg.backends[1].is_local
    assert cfg.models[0].policy.kind == "cost"
    assert set(cfg.slo_classes) >= {"interactive", "batch"}
    assert cfg.listen.port == 8080


def test_unknown_field_names_path_and_line() -> None:
    text = GOOD.replace(
        "    gpu: {price_per_hour: 2.95}", "    gpu: {price_per_hour: 2.95}\n    colour: red"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    [issue] = info.value.issues
    assert issue.path == "backends.0.colour"
    assert issue.line == 8  # GOOD starts with a blank line
    assert "Extra inputs" in issue.message


def test_every_error_is_reported() -> None:
    text = GOOD.replace("price_per_hour: 2.95", "price_per_hour: -1").replace(
        "backends: [gpu-a, groq]", "backends: [gpu-a, nope]"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    paths = [i.path for i in info.value.issues]
    assert "backends.0.gpu.price_per_hour" in paths


def test_unknown_backend_reference_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(GOOD.replace("backends: [gpu-a, groq]", "backends: [gpu-a, nope]"))
    assert "unknown backend 'nope'" in info.value.render()


def test_plaintext_secret_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(GOOD.replace("env:GROQ_API_KEY", "gsk_live_abcdef"))
    assert "env:NAME" in info.value.render()
    assert "gsk_live_abcdef" not in info.value.render()


def test_policy_kind_is_a_discriminated_union() -> None:
    text = GOOD.replace(
        "    backends: [gpu-a, groq]", "    backends: [gpu-a, groq]\n    policy: {kind: cheapest}"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.issues[0].path.startswith("models.0.policy")


def test_yaml_syntax_error_has_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("backends: [\n  - a\nmodels: ]")
    assert info.value.issues[0].line is not None


def test_missing_env_is_listed() -> None:
    cfg = parse_config(GOOD)
    missing = missing_env(cfg, env={"ACME_KEY": "x"})
    assert [m.path for m in missing] == ["backends.1.api_key"]


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (ROOT / "policies" / "examples").glob("*.yaml"))
)
def test_shipped_examples_are_valid(name: str, tmp_path: Path) -> None:
    """Each shipped file as it is, with the secrets it references set."""
    path = ROOT / "policies" / "examples" / name
    env = dict(os.environ)
    env.update(
        {ref: "set-for-the-test" for ref in re.findall(r"env:([A-Z0-9_]+)", path.read_text())}
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{path}: ok")


def test_check_config_cli_fails_with_location(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("kind: groq", "kind: grok"))
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "line 9" in proc.stderr and "backends.1.kind" in proc.stderr


def _check(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if k not in ("GROQ_API_KEY", "ACME_KEY")}
        | (env or {}),
    )


MANY_WRONG = """
backends:
  - name: gpu-a
    kind: vllm
    base_url: http://127.0.0.1:8001/v1
    models: {llama: meta-llama/Llama-3.1-8B-Instruct}
    gpu: {price_per_hour: 2.95}
  - name: groq
    kind: grok
    base_url: https://api.groq.com/openai/v1
    api_key: env:GROQ_API_KEY
    models: {llama: llama-3.1-8b-instant}
    price: {input_per_million: 0.05, output_per_million: 0.08}
models:
  - name: llama
    backends: [gpu-a, nope]
  - name: llama
    backends: [gpu-a]
tenants:
  - name: acme
    api_keys: [env:ACME_KEY]
    allowed_models: [llama, zzz]
    slo_class: fastest
"""


def test_every_error_in_one_pass_with_file_path_and_line(tmp_path: Path) -> None:
    """Schema, cross-references, duplicates and unset secrets together, each located."""
    path = tmp_path / "many.yaml"
    path.write_text(MANY_WRONG)
    proc = _check(path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == f"{path}: 7 error(s)", proc.stderr
    expected = [
        (9, "backends.1.kind", "'vllm', 'sglang'"),
        (11, "backends.1.api_key", "environment variable GROQ_API_KEY is not set"),
        (16, "models.0.backends.1", "unknown backend 'nope' (backends: gpu-a, groq)"),
        (17, "models.1.name", "model 'llama' is defined twice (models.0)"),
        (21, "tenants.0.api_keys.0", "environment variable ACME_KEY is not set"),
        (22, "tenants.0.allowed_models.1", "unknown model 'zzz' (models: llama)"),
        (23, "tenants.0.slo_class", "unknown slo_class 'fastest' (known: batch, interactive)"),
    ]
    for line, (no, field, message) in zip(lines[1:], expected, strict=True):
        assert line.startswith(f"  {path}, line {no}: {field}: "), line
        assert message in line, line


def test_check_config_and_serve_agree(tmp_path: Path) -> None:
    """The same validator and exit status: a missing secret is an error in both."""
    path = tmp_path / "secret.yaml"
    path.write_text(GOOD.replace("listen:", "") + "listen: {port: 0}\n")
    check = _check(path, {"ACME_KEY": "x"})
    serve = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "GROQ_API_KEY"} | {"ACME_KEY": "x"},
    )
    assert check.returncode == serve.returncode == 2
    message = f"{path}, line 11: backends.1.api_key: environment variable GROQ_API_KEY is not set"
    assert message in check.stderr and message in serve.stderr
    assert _check(path, {"ACME_KEY": "x", "GROQ_API_KEY": "y"}).returncode == 0


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("backends:\n  - name: a\n    models: {x: y\n")
    proc = _check(path)
    assert proc.returncode == 2
    assert f"{path}, line " in proc.stderr and "not valid YAML" in proc.stderr
    assert "<unicode string>" not in proc.stderr


def test_check_config_help_explains_path() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "PATH" in proc.stdout and "the policy YAML file" in proc.stdout
    assert "exit" in proc.stdout.lower()


def test_sim_base_urls_are_validated() -> None:
    cfg = parse_config(GOOD.replace("http://127.0.0.1:8001/v1", "sim:worker"))
    assert cfg.backends[0].simulated == "worker"
    with pytest.raises(ConfigError) as info:
        parse_config(GOOD.replace("http://127.0.0.1:8001/v1", "sim:gpu"))
    assert "sim:worker / sim:provider" in info.value.render()
