"""`neogate loadtest` and `neogate route --url` against a served gateway (a real process).

The load test must not mislead: its default model is one the gateway serves, a run
that mostly failed names the error and exits non-zero, every schedule form runs or
is refused with a reason, and the cost line reads what `GET /v1/usage` serves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.served import serve, stop

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "ng-admin-key-for-the-cli-test"


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = serve(
        ROOT / "policies" / "examples" / "default.yaml",
        tmp_path_factory.mktemp("lt"),
        env={"NEOGATE_ADMIN_KEY": ADMIN},
    )
    try:
        yield url
    finally:
        stop(proc)


def neogate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "NEOGATE_ADMIN_KEY"},
    )


def loadtest(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return neogate("loadtest", "--url", url + "/v1", "--no-progress", *args)


def test_default_model_is_the_first_the_gateway_lists(gateway_url: str) -> None:
    run = loadtest(gateway_url, "--duration", "1", "--concurrency", "2")
    assert run.returncode == 0, run.stderr
    assert "model         llama-3.1-8b (the first of GET /v1/models)" in run.stderr
    assert " errors 0 " in run.stdout
    cost = next(line for line in run.stdout.splitlines() if line.startswith("cost"))
    assert cost.startswith("cost          $") and "shape" not in cost, run.stdout


def test_mostly_failed_run_names_the_error_and_exits_non_zero(gateway_url: str) -> None:
    run = loadtest(gateway_url, "--model", "nope", "--requests", "5", "--concurrency", "1")
    assert run.returncode == 1, run.stdout
    assert "most common   http_404:model_not_found (5 of 5): The model `nope` does not" in (
        run.stdout
    )
    assert "5 of 5 requests failed; most with http_404:model_not_found (5)" in run.stderr
    assert "does not exist" in run.stderr
    # Nothing was served, and the cost line says so instead of blaming the shape.
    assert "cost          $0.000000 for 0 tokens" in run.stdout


@pytest.mark.parametrize(
    ("schedule", "requests"),
    [("burst:40", 40), ("1:1s,burst:5", None), ("0:500ms,burst:3", 3), ("1-2:1s", None)],
)
def test_every_schedule_form_runs(gateway_url: str, schedule: str, requests: int | None) -> None:
    run = loadtest(gateway_url, "--schedule", schedule)
    assert run.returncode == 0, run.stderr + run.stdout
    line = next(x for x in run.stdout.splitlines() if x.startswith("requests"))
    sent = int(line.split()[1])
    if requests is not None:
        assert sent == requests, line
    else:
        assert sent > 5 if "burst" in schedule else sent > 0, line
    assert " errors 0 " in line


@pytest.mark.parametrize(
    ("schedule", "extra", "reason"),
    [
        ("2.5:1s", (), "closed-loop levels are concurrency"),
        ("0:1s", (), "the schedule sends nothing"),
        ("burst:0", (), "must be a positive integer"),
        ("5:0s", (), "duration must be > 0"),
        ("fast", (), "expected LEVEL:DURATION or burst:N"),
        ("2:1s", ("--rate", "3"), "drop --rate/--concurrency"),
    ],
)
def test_schedules_that_cannot_run_are_refused_with_a_reason(
    gateway_url: str, schedule: str, extra: tuple[str, ...], reason: str
) -> None:
    run = loadtest(gateway_url, "--schedule", schedule, *extra)
    assert run.returncode == 2 and reason in run.stderr, run.stderr


def test_open_loop_fractional_rate_runs(gateway_url: str) -> None:
    run = loadtest(gateway_url, "--schedule", "20.5:1s", "--mode", "open")
    assert run.returncode == 0, run.stderr


def test_route_url_asks_the_running_gateway(gateway_url: str) -> None:
    ok = neogate("route", "--url", gateway_url, "--model", "llama-3.1-8b", "--admin-key", ADMIN)
    assert ok.returncode == 0, ok.stderr
    assert '"candidates"' in ok.stdout or '"chosen"' in ok.stdout, ok.stdout
    bad = neogate("route", "--url", gateway_url, "--model", "llama-3.1-8b", "--admin-key", "no")
    assert bad.returncode == 1 and "HTTP 403: this endpoint needs the admin key" in bad.stderr
    down = neogate("route", "--url", "http://127.0.0.1:9", "--model", "m", "--admin-key", "k")
    assert down.returncode == 1 and "route: http://127.0.0.1:9/admin/route:" in down.stderr
