"""Mutation testing over the money and safety paths: `make mutation` (mutmut, one module at a time).

Each module is mutated in its own scratch copy under `.mutation/<name>/` and checked only against
the tests that exercise it (the map below), so a module takes minutes, not the whole suite per
mutant. mutmut keeps its results there: a second run re-tests only the functions that changed.

    python -m tests.mutation                 every module, in priority order
    python -m tests.mutation admission relay  just these
    python -m tests.mutation --report         print the scores of the last runs, run nothing

The score per module is killed / (mutants - equivalent). Equivalent mutants (a change no test can
observe because the behaviour is the same) are listed by name in docs/testing.md with the reason;
every other survivor, and every mutant no test reaches, counts against the score.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
PACKAGES = ("gateway", "policies", "adapters", "loadtest")
EQUIVALENT_DOC = ROOT / "docs" / "testing.md"
TARGET = 0.90
# mutmut exit codes that count as a kill (see `score`). -11: the test process died of
# SIGSEGV, the tests did not pass. Seen once (2026-12-06, the ledger writer's `_run` 3, a
# writer task that never yields): run by hand, each of its three test files ends by its
# watchdog (faulthandler, exit 1) after 20-30 s; in mutmut's forked child it was SIGSEGV,
# likely the watchdog's dump of the other threads' stacks while they run.
KILLED = frozenset({1, 3, 37, 36, 24, -24, -11, 152, 255})


@dataclass(frozen=True)
class Target:
    """One module under mutation and the tests that exercise it (fast ones first)."""

    name: str
    files: tuple[str, ...]
    tests: tuple[str, ...]
    # Tests left out: ones that judge timing (a mutant run is traced and slower, and
    # mutmut needs every selected test green before it starts).
    deselect: tuple[str, ...] = ()


# Priority order: the money first (admission, metering, pricing), then the paths that protect
# the client and the keys. Tests are the unit and integration files that reach the module.
TARGETS: tuple[Target, ...] = (
    Target(
        "admission",
        ("gateway/flow/admission.py", "gateway/state/limits.py"),
        (
            "tests/unit/test_admission.py",
            "tests/unit/test_budget_bound.py",
            "tests/integration/test_budgets_e2e.py",
            "tests/integration/test_money_paths.py",
        ),
    ),
    Target(
        "usage",
        (
            "gateway/metering/usage.py",
            "gateway/metering/stream_meter.py",
            "gateway/metering/money.py",
        ),
        (
            "tests/unit/test_usage.py",
            "tests/unit/test_dialects.py",
            "tests/unit/test_budget_bound.py",
            "tests/integration/test_metering_e2e.py",
            "tests/integration/test_money_paths.py",
        ),
    ),
    Target(
        "metering",
        ("gateway/flow/meter.py", "gateway/flow/completion.py", "gateway/metering/prices.py"),
        (
            "tests/unit/test_budget_bound.py",
            "tests/integration/test_metering_e2e.py",
            "tests/integration/test_budgets_e2e.py",
            "tests/integration/test_usage_api.py",
            "tests/integration/test_money_paths.py",
        ),
    ),
    Target(
        "costmodel",
        # The b* search moved out of costmodel.py (ebe0b09); GpuModel.slo_batch delegates to it.
        ("policies/costmodel.py", "policies/batch_search.py"),
        (
            "tests/unit/test_costmodel.py",
            "tests/unit/test_slo_batch.py",
            "tests/unit/test_select.py",
            # The ITL miss probability (5621dbf) and the KV cap (b89b679) are tested here.
            "tests/unit/test_miss_budget.py",
            "tests/unit/test_profile.py",
            "tests/unit/test_worker_signals.py",
        ),
    ),
    Target(
        "forward",
        (
            "gateway/flow/forward.py",
            "gateway/flow/attempt.py",
            "gateway/flow/retryable.py",
            "gateway/flow/first_byte.py",
        ),
        (
            "tests/integration/test_forward_attempts.py",
            "tests/integration/test_money_paths.py",
            "tests/integration/test_faults.py",
        ),
        # test_faults' tests that judge time (breaker windows, queue waits, idle and deadline
        # timeouts, a client that stops reading, a hedge's elapsed time, retry-after rounded
        # from a clock) or traffic ratios: a mutant run is slower on a loaded machine, and
        # mutmut needs every selected test green before it starts. test_forward_attempts
        # covers the same paths without a clock.
        tuple(
            f"tests/integration/test_faults.py::{t}"
            for t in (
                "test_breaker_ejects_then_probes_back_in",
                "test_queue_wait_then_429_with_retry_after",
                "test_queued_request_is_served_when_a_slot_frees",
                "test_idle_gap_timeout_cuts_a_stalled_stream",
                "test_request_timeout_header_bounds_a_long_stream_and_a_whole_answer",
                "test_deadline_bounds_failover",
                "test_client_that_stops_reading_is_cut",
                "test_hedging_of_the_first_byte",
                "test_429_on_the_only_backend_reaches_the_client_with_retry_after",
                "test_no_backend_in_service_answers_503",
                "test_retry_budget_caps_upstream_amplification",
                "test_total_outage_of_one_backend_is_invisible_and_cheap",
                "test_backend_at_capacity_spills_to_the_next",
            )
        ),
    ),
    Target(
        "relay",
        ("gateway/flow/relay.py",),
        (
            "tests/unit/test_relay.py",
            "tests/integration/test_openai_api.py",
            "tests/integration/test_metering_e2e.py",
            "tests/integration/test_money_paths.py",
        ),
    ),
    Target(
        "keymask",
        ("adapters/keymask.py",),
        (
            "tests/unit/test_keymask.py",
            "tests/unit/test_keymask_stream.py",
            "tests/unit/test_keymask_views.py",
            "tests/integration/test_key_canary.py",
            "tests/integration/test_key_split_stream.py",
            "tests/integration/test_money_paths.py",
            "tests/integration/test_security.py",
            "tests/unit/test_fasthttp.py",
            "tests/integration/test_fasthttp.py",
        ),
    ),
    Target(
        "masking_roads",
        ("adapters/backend.py", "adapters/sse.py", "adapters/errors.py"),
        (
            "tests/unit/test_masking_roads.py",
            "tests/unit/test_sse.py",
            "tests/unit/test_transport_errors.py",
            "tests/unit/test_keymask.py",
            "tests/unit/test_fasthttp.py",
            "tests/integration/test_masking_roads.py",
            "tests/integration/test_money_paths.py",
            "tests/integration/test_key_canary.py",
            "tests/integration/test_security.py",
            "tests/integration/test_fasthttp.py",
            "tests/integration/test_sse_transports.py",
            "tests/integration/test_key_split_stream.py",
        ),
        # The pool's own timing (timeouts, waits for a connection, expiry) and its uvloop rerun.
        tuple(
            f"tests/integration/test_fasthttp.py::{t}"
            for t in (
                "test_slow_first_byte_times_out_and_closes_the_socket",
                "test_idle_gap_in_the_body_times_out",
                "test_total_deadline_cuts_a_trickling_body",
                "test_a_slow_consumer_pauses_reading_without_tripping_the_idle_timeout",
                "test_concurrency_beyond_the_pool_waits_for_a_connection",
                "test_waiting_for_a_full_pool_is_bounded_by_the_first_byte_timeout",
                "test_idle_connections_expire_and_close_releases_them",
                "test_on_uvloop",
            )
        ),
    ),
    Target(
        "ledger_writer",
        ("gateway/metering/ledger/writer.py",),
        (
            "tests/unit/test_ledger_writer.py",
            "tests/integration/test_spool_replay.py",
            "tests/integration/test_ledger_sqlite.py",
        ),
        # The store's own timing (checkpoints, the WAL's size under load, a lock held by
        # another process, the WAL switch): they judge sqlite.py, not the writer, and a WAL
        # size check failed mutmut's clean run twice at load 5-9.
        tuple(
            f"tests/integration/test_ledger_sqlite.py::{t}"
            for t in (
                "test_quick_commits_run_on_the_loop_and_checkpoint_on_the_thread",
                "test_a_file_locked_by_another_process_waits_on_the_thread",
                "test_switching_a_new_file_to_wal_waits_for_another_connection",
                "test_checkpoints_follow_what_the_wal_holds_not_its_file_size",
                "test_checkpoints_below_the_cap_never_hold_a_commit",
                "test_a_wal_at_its_cap_without_an_idle_moment_is_restarted",
            )
        ),
    ),
    Target(
        # What a row is (from_usage, the INSERT's values, the spool's line, utc_day) and the
        # SQLite file's schema and multi-row INSERT (insert_sql): ba453a6 rewrote them.
        "ledger_rows",
        ("gateway/metering/ledger/rows.py", "gateway/metering/ledger/sqlite_file.py"),
        (
            "tests/unit/test_ledger_rows.py",
            "tests/unit/test_ledger_writer.py",
            "tests/integration/test_spool_replay.py",
            "tests/integration/test_ledger_sqlite.py",
            "tests/integration/test_ledger_migration.py",
        ),
        # The store's timing tests as in the writer's list, but for the switch to WAL, which
        # is this module's (ensure_wal: a lock released after 0.2 s, 5 s allowed).
        tuple(
            f"tests/integration/test_ledger_sqlite.py::{t}"
            for t in (
                "test_quick_commits_run_on_the_loop_and_checkpoint_on_the_thread",
                "test_a_file_locked_by_another_process_waits_on_the_thread",
                "test_checkpoints_follow_what_the_wal_holds_not_its_file_size",
                "test_checkpoints_below_the_cap_never_hold_a_commit",
                "test_a_wal_at_its_cap_without_an_idle_moment_is_restarted",
            )
        ),
    ),
)


@dataclass(frozen=True)
class Score:
    name: str
    total: int
    killed: int
    survived: list[str]
    equivalent: int
    seconds: float | None

    @property
    def ratio(self) -> float:
        counted = self.total - self.equivalent
        return self.killed / counted if counted else 1.0


def equivalent_names() -> set[str]:
    """Mutant names listed as equivalent in docs/testing.md (a backquoted name in a table row)."""
    if not EQUIVALENT_DOC.exists():
        return set()
    return set(re.findall(r"^\|\s*`([\w.ǁ]+__mutmut_\d+)`", EQUIVALENT_DOC.read_text(), re.M))


def pyproject_for(target: Target) -> str:
    base = (ROOT / "pyproject.toml").read_text()
    files = ", ".join(f'"{f}"' for f in target.files)
    sources = ", ".join(f'"{p}"' for p in PACKAGES)
    tests = ", ".join(f'"{t}"' for t in target.tests)
    args = ", ".join(
        f'"{a}"'
        for a in (
            "-p",
            "no:cacheprovider",
            "-q",
            "-x",
            *(f"--deselect={d}" for d in target.deselect),
        )
    )
    return (
        base
        + f"""
[tool.mutmut]
source_paths = [{sources}]
only_mutate = [{files}]
pytest_add_cli_args_test_selection = [{tests}]
pytest_add_cli_args = [{args}]
"""
    )


# Appended to the scratch copy's tests/conftest.py: every failing test of a run, with the
# mutant it ran against, goes to the file `run` names (mutmut keeps only each mutant's exit
# code, so a kill by a test that failed for another reason could not be traced).
FAILURE_LOG_ENV = "NEOGATE_MUTATION_FAILURES"
_FAILURE_HOOK = f"""


def pytest_runtest_logreport(report):  # added by tests/mutation.py to its scratch copy only
    import os

    path = os.environ.get("{FAILURE_LOG_ENV}")
    if path and report.failed:
        with open(path, "a") as log:
            mutant = os.environ.get("MUTANT_UNDER_TEST", "")
            log.write(f"{{mutant}}\\t{{report.nodeid}}\\t{{report.when}}\\n")
"""


def sync(target: Target) -> Path:
    """Refresh the scratch copy: sources and tests as they are now; mutmut's cache stays."""
    work = WORK / target.name
    work.mkdir(parents=True, exist_ok=True)
    for package in (*PACKAGES, "tests"):
        dst = work / package
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / package, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    conftest = work / "tests" / "conftest.py"
    conftest.write_text(conftest.read_text() + _FAILURE_HOOK)
    (work / "pyproject.toml").write_text(pyproject_for(target))
    return work


def _source_hash(target: Target) -> str:
    digest = hashlib.sha256()
    for f in target.files:
        digest.update((ROOT / f).read_bytes())
    return digest.hexdigest()


def _last_source_hash(target: Target) -> str | None:
    saved = WORK / target.name / "source.sha256"
    return saved.read_text().strip() if saved.exists() else None


def not_killed(target: Target) -> list[str]:
    """Mutants of the last run that no test killed (survived, untested, timed out)."""
    names: list[str] = []
    for f in target.files:
        meta = WORK / target.name / "mutants" / f"{f}.meta"
        if meta.exists():
            codes = json.loads(meta.read_text())["exit_code_by_key"]
            names += [k for k, c in codes.items() if c not in KILLED]
    return names


def run(target: Target, children: int) -> float:
    """mutmut over one module: new or changed functions are mutated and tested (earlier
    verdicts of unchanged ones are kept), then, unless this was the first run, every
    earlier survivor is tested again, since the tests may have grown since."""
    fresh = not (WORK / target.name / "mutants").exists()
    source_changed = _source_hash(target) != _last_source_hash(target)
    work = sync(target)
    if source_changed and not fresh:
        # mutmut maps a new or changed function only to the tests added since its last
        # stats pass, so a survivor of changed code would be tested against too few tests:
        # drop the map and let it trace the whole test list again (verdicts are kept).
        (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    log = work / "mutmut.log"
    started = time.monotonic()
    mutmut = Path(sys.executable).with_name("mutmut")
    with log.open("w") as out:
        for again in (False, True):
            names = not_killed(target) if again else []
            if again and (fresh or not names):
                break  # a first run just tested every mutant against these very tests
            with (work / "failures.log").open("a") as failures:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
                failures.write(f"# {stamp} UTC: mutmut run, {len(names) or 'all'} mutants\n")
            proc = subprocess.run(
                [str(mutmut), "run", "--max-children", str(children), *names],
                cwd=work,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
                env={
                    **os.environ,
                    "PYTHONDONTWRITEBYTECODE": "1",
                    FAILURE_LOG_ENV: str(work / "failures.log"),
                },
            )
            if proc.returncode != 0:
                break
    elapsed = time.monotonic() - started
    (work / "seconds").write_text(f"{elapsed:.0f}\n")
    if proc.returncode == 0:
        (work / "source.sha256").write_text(_source_hash(target) + "\n")
    if proc.returncode != 0:
        print(f"{target.name}: mutmut exited {proc.returncode}, see {log}", file=sys.stderr)
    return elapsed


def score(target: Target, equivalent: set[str]) -> Score | None:
    work = WORK / target.name
    codes: dict[str, int | None] = {}
    for f in target.files:
        meta = work / "mutants" / f"{f}.meta"
        if not meta.exists():
            return None
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    # mutmut's exit codes: 1 and 3 are a kill, 37 a kill by the type checker, a timeout (36,
    # or the CPU-limit signals) too: the tests did not pass. The rest count against the
    # score (0 survived, 33/5 no test reached it, None not run).
    killed = sum(1 for c in codes.values() if c in KILLED)
    not_killed = sorted(k for k, c in codes.items() if c not in KILLED)
    eq = sum(1 for k in not_killed if k in equivalent)
    seconds_file = work / "seconds"
    seconds = float(seconds_file.read_text()) if seconds_file.exists() else None
    survived = [k for k in not_killed if k not in equivalent]
    return Score(target.name, len(codes), killed, survived, eq, seconds)


def report(targets: list[Target], verbose: bool) -> bool:
    equivalent = equivalent_names()
    ok = True
    print(
        f"{'module':<15}{'mutants':>8}{'killed':>8}{'equiv':>7}{'left':>6}{'score':>8}{'time':>8}"
    )
    for target in targets:
        s = score(target, equivalent)
        if s is None:
            print(f"{target.name:<15}  not run")
            ok = False
            continue
        took = f"{s.seconds:.0f}s" if s.seconds is not None else "-"
        print(
            f"{s.name:<15}{s.total:>8}{s.killed:>8}{s.equivalent:>7}{len(s.survived):>6}"
            f"{s.ratio:>8.1%}{took:>8}"
        )
        ok = ok and s.ratio >= TARGET
        if verbose:
            for name in s.survived:
                print(f"    {name}")
    print(f"target: >= {TARGET:.0%} of non-equivalent mutants killed in every module")
    print("a surviving mutant: `cd .mutation/<module> && ../../.venv/bin/mutmut show <name>`")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="module names (default: all, in order)")
    parser.add_argument("--report", action="store_true", help="only print the last scores")
    parser.add_argument("--survivors", action="store_true", help="list surviving mutants")
    parser.add_argument("--children", type=int, default=2, help="mutants tested at once")
    args = parser.parse_args(argv)
    by_name = {t.name: t for t in TARGETS}
    unknown = [m for m in args.modules if m not in by_name]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; known: {list(by_name)}")
    targets = [by_name[m] for m in args.modules] if args.modules else list(TARGETS)
    if not args.report:
        for target in targets:
            took = run(target, args.children)
            print(f"{target.name}: {took:.0f}s", flush=True)
    return 0 if report(targets, args.survivors) else 1


if __name__ == "__main__":
    sys.exit(main())
