"""A new user's first hour: every shipped example serves, and the README's snippets run.

Each file in policies/examples/ is served exactly as shipped by `neogate serve --config`
(a real process on a real port); the README's Python and curl snippets are cut out of
README.md and run, as written, against the served default.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.served import secrets_env, serve, stop

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "policies" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_serves_as_shipped(path: Path, tmp_path: Path) -> None:
    proc, url = serve(path, tmp_path)
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
            assert r.status in (200, 503)  # up; ready depends on backends it can reach
        check = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "check-config", str(path)],
            capture_output=True,
            text=True,
            env=secrets_env(path),
            check=False,
        )
        assert check.returncode == 0, check.stderr
    finally:
        stop(proc)


def readme_block(language: str, after: str) -> str:
    """The first fenced block of `language` after the heading `after` in README.md."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(after) :]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match is not None, f"no {language} block after {after!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def default_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The default example, served as `make run` serves it (but on a free port)."""
    proc, url = serve(ROOT / "policies" / "examples" / "default.yaml", tmp_path_factory.mktemp("d"))
    try:
        yield url
    finally:
        stop(proc)


def test_readme_python_snippet_runs(default_gateway: str, tmp_path: Path) -> None:
    code = readme_block("python", "## Use it")
    assert "http://127.0.0.1:8080/v1" in code
    script = tmp_path / "snippet.py"
    script.write_text(code.replace("http://127.0.0.1:8080", default_gateway))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "prompt_tokens=" in proc.stdout and "completion_tokens=" in proc.stdout
    assert proc.stdout.count("CompletionUsage(") == 2, "usage of the answer and of the stream"


def test_readme_curl_snippet_runs(default_gateway: str) -> None:
    command = readme_block("sh", "## Use it")
    assert command.startswith("curl ") and "http://127.0.0.1:8080" in command
    proc = subprocess.run(
        ["sh", "-c", command.replace("http://127.0.0.1:8080", default_gateway)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    head, _, body = proc.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200"), head
    assert "x-neogate-backend:" in head.lower() and '"choices"' in body
