"""The SQLite ledger through LedgerWriter: group commit, idempotency, WAL, kill -9 durability."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.cli.usage import add_usage_parser, run_usage
from gateway.metering.ledger import DEFAULT_LEDGER_PATH, LedgerRow, LedgerStore, LedgerWriter, Spool
from gateway.metering.ledger.reports import (
    TenantSpend,
    pricing_sheet,
    spend_by_tenant,
    usage_report,
)
from gateway.metering.ledger.sqlite import SqliteLedger
from gateway.metering.money import UnitPrices
from gateway.metering.usage import Usage
from tests.watchdog import watchdog_after

REPO = Path(__file__).resolve().parents[2]


def make_row(i: int, *, attempt: int = 0, tenant: str = "acme") -> LedgerRow:
    return LedgerRow.from_usage(
        request_id=f"req-{i}",
        attempt=attempt,
        ts=1_750_000_000.0 + i,
        tenant=tenant,
        model="llama-8b",
        backend="groq",
        backend_model="llama-3.1-8b-instant",
        usage=Usage(100, 20, cached_tokens=40, source="reported"),
        prices=UnitPrices.of(0.05, 0.08, cached_input_per_m=0.025, version="groq@1"),
        ttft_s=0.1,
        total_s=0.5,
        stream=True,
        outcome="ok",
    )


# Each test here takes well under a second: a writer that stops answering fails in 30 s.
watchdog = watchdog_after(30)


def count_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM ledger").fetchone()[0])


async def test_rows_round_trip_with_exact_cost(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    writer = LedgerWriter(SqliteLedger(db), Spool(tmp_path / "spool"))
    await writer.start()
    row = make_row(1)
    await writer.record(row)
    got = await writer.store.fetch(
        "SELECT request_id, attempt, day, cost_nusd, price_in_nusd_per_m, token_source, stream "
        "FROM ledger"
    )
    await writer.close()
    # 60 uncached x 0.05 + 40 cached x 0.025 + 20 x 0.08 = 5.6 $/M-units -> 5.6e-6 USD.
    assert row.cost_usd == Decimal("0.0000056")
    assert got == [("req-1", 0, "2025-06-15", 5600, 50_000_000, "reported", 1)]


async def test_same_request_and_attempt_is_recorded_once(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    writer = LedgerWriter(SqliteLedger(db))
    await writer.start()
    await asyncio.gather(writer.record(make_row(1)), writer.record(make_row(1)))
    await writer.record(make_row(1))
    await writer.record(make_row(1, attempt=1))
    await writer.close()
    assert count_rows(db) == 2


async def test_concurrent_records_are_group_committed(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    registry = CollectorRegistry()
    writer = LedgerWriter(SqliteLedger(db), registry=registry)
    await writer.start()
    await asyncio.gather(*(writer.record(make_row(i)) for i in range(3000)))
    stats = writer.stats()
    await writer.close()
    assert count_rows(db) == 3000
    assert stats.rows_written == 3000
    assert stats.batches < 100  # thousands of rows, a handful of transactions
    assert registry.get_sample_value("neogate_ledger_rows_written_total") == 3000
    assert registry.get_sample_value("neogate_ledger_batch_rows_count") == stats.batches
    assert registry.get_sample_value("neogate_ledger_up") == 1.0


async def test_a_batch_is_inserted_whole_across_statements_duplicates_skipped(
    tmp_path: Path,
) -> None:
    """A commit's rows go in several-row INSERTs (`ROWS_PER_INSERT` each, then the rest):
    a batch longer than one statement, repeating rows inside a statement, across statements
    and already in the file, leaves each (request_id, attempt) once with its own values."""
    db = tmp_path / "ledger.db"
    store = SqliteLedger(db)
    await store.open()
    await store.write([make_row(0), make_row(1)])
    batch = [make_row(i) for i in range(40)] + [make_row(5), make_row(39), make_row(7, attempt=1)]
    await store.write(batch)
    got = await store.fetch("SELECT request_id, attempt, cost_nusd, day FROM ledger ORDER BY rowid")
    await store.close()
    want = [make_row(i) for i in range(40)] + [make_row(7, attempt=1)]
    assert got == [(r.request_id, r.attempt, r.cost_nusd, r.day) for r in want]


async def test_a_lookup_by_client_id_uses_its_index(tmp_path: Path) -> None:
    """The index holds only rows with a client id (most have none: no entry written for
    them); a lookup by id still finds it, and finds the rows."""
    db = tmp_path / "ledger.db"
    writer = LedgerWriter(SqliteLedger(db))
    await writer.start()
    await writer.record(make_row(1)._replace(client_request_id="c-1"))
    await writer.record(make_row(2))
    store = writer.store
    plan = await store.fetch(
        "EXPLAIN QUERY PLAN SELECT request_id FROM ledger WHERE client_request_id = ?", ("c-1",)
    )
    got = await store.fetch("SELECT request_id FROM ledger WHERE client_request_id = ?", ("c-1",))
    (index,) = await store.fetch(
        "SELECT sql FROM sqlite_master WHERE name = 'ledger_client_request_id'"
    )
    await writer.close()
    assert any("USING INDEX ledger_client_request_id" in str(step) for step in plan), plan
    assert got == [("req-1",)]
    assert str(index[0]).endswith("WHERE client_request_id IS NOT NULL"), index


async def test_wal_mode_and_synchronous_normal(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    store = SqliteLedger(db)
    await store.open()
    assert await store.fetch("PRAGMA journal_mode") == [("wal",)]
    assert await store.fetch("PRAGMA synchronous") == [(1,)]  # NORMAL
    await store.close()


async def test_a_new_file_has_small_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    """A one-row commit writes a page per b-tree it touches (the table, four indexes): at
    1024-byte pages about a third of the WAL of SQLite's default 4096 (~22 KB), so a third
    of the checkpoints for the same traffic."""
    new = SqliteLedger(tmp_path / "new.db")
    writer = LedgerWriter(new)
    await writer.start()
    await writer.record(make_row(0))  # the table's and indexes' first pages
    ((_, before, _),) = await new.fetch("PRAGMA wal_checkpoint(PASSIVE)")
    for i in range(1, 201):
        await writer.record(make_row(i))
    wal = (tmp_path / "new.db-wal").stat().st_size
    assert await new.fetch("PRAGMA page_size") == [(1024,)]
    await writer.close()
    assert count_rows(tmp_path / "new.db") == 201
    # 200 one-row commits after the first: at most 8 frames of 1024 + 24 bytes each (5 b-tree
    # leaves, now and then a split's parent); at 4096 they would take ~4.4 MB.
    assert wal <= 32 + (before + 200 * 8) * (1024 + 24), wal

    old = tmp_path / "old.db"
    with sqlite3.connect(old) as conn:  # made before this change: SQLite's default pages
        conn.execute("PRAGMA page_size = 4096")
        conn.execute("CREATE TABLE other (x)")
    store = SqliteLedger(old)
    writer = LedgerWriter(store)
    await writer.start()
    await writer.record(make_row(0))
    assert await store.fetch("PRAGMA page_size") == [(4096,)]
    assert await store.fetch("PRAGMA journal_mode") == [("wal",)]
    await writer.close()
    assert count_rows(old) == 1


async def test_quick_commits_run_on_the_loop_and_checkpoint_on_the_thread(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    store = SqliteLedger(db, checkpoint_bytes=1 << 20)
    writer = LedgerWriter(store, Spool(tmp_path / "spool"))
    await writer.start()
    for i in range(1000):  # one row per commit: the most WAL per row (~7 KB)
        await writer.record(make_row(i))
        if i % 50 == 0:
            await asyncio.sleep(0.01)  # let a running checkpoint finish
    # A few commits met a checkpoint's last moment and waited for it on the thread.
    assert store.inline_commits + store.thread_commits == 1000
    assert store.inline_commits > 900
    assert store.checkpoints > 0
    # Without checkpoints the WAL holds every commit (~7 MB); with them it starts over, at
    # the latest when it reaches wal_cap_bytes (4 x 1 MB) plus what comes in during the
    # RESTART's rounds (on a loaded machine the pauses can be too short for an idle one).
    wal = db.with_name(db.name + "-wal")
    assert wal.stat().st_size < 8 << 20, wal.stat().st_size
    await writer.close()
    assert count_rows(db) == 1000


async def test_a_file_locked_by_another_process_waits_on_the_thread(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    store = SqliteLedger(db, busy_timeout_s=5.0)
    writer = LedgerWriter(store, Spool(tmp_path / "spool"))
    await writer.start()
    await writer.record(make_row(0))
    other = sqlite3.connect(db, isolation_level=None)  # another writer, e.g. a second worker
    other.execute("BEGIN IMMEDIATE")
    pending = asyncio.create_task(writer.record(make_row(1)))
    await asyncio.sleep(0.2)
    assert not pending.done()  # waiting for the lock, without blocking the loop
    other.execute("ROLLBACK")
    other.close()
    await asyncio.wait_for(pending, 5.0)
    assert store.thread_commits == 1 and writer.stats().spool_rows == 0
    await writer.close()
    assert count_rows(db) == 2


async def test_cancelled_caller_still_gets_its_row_written(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    writer = LedgerWriter(SqliteLedger(db))
    await writer.start()
    await asyncio.sleep(0)  # the writer task waits for rows
    first = asyncio.create_task(writer.record(make_row(6)))  # idle writer: committed at once
    task = asyncio.create_task(writer.record(make_row(7)))  # the same turn: queued
    await asyncio.sleep(0)  # let both start
    assert first.done() and not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await writer.close()
    assert count_rows(db) == 2


async def test_an_idle_writer_commits_a_row_in_the_callers_own_step(tmp_path: Path) -> None:
    """No hop through the writer task: record() returns without suspending once, committed.

    Rows recorded in the same turn of the loop after it still go to the writer as one
    batch (group commit); the next turn commits directly again.
    """
    db = tmp_path / "ledger.db"
    registry = CollectorRegistry()
    writer = LedgerWriter(SqliteLedger(db), registry=registry)
    await writer.start()
    await asyncio.sleep(0)  # the writer task waits for rows
    step = writer.record(make_row(1))
    with pytest.raises(StopIteration):
        step.send(None)  # done in one step: it never waited on the writer task
    assert count_rows(db) == 1  # committed: another connection sees it
    burst = [asyncio.create_task(writer.record(make_row(i))) for i in range(2, 12)]
    await asyncio.gather(*burst)
    assert count_rows(db) == 11
    stats = writer.stats()
    # 1 + (row 2 at once, rows 3-11 as one batch)
    assert (stats.batches, stats.last_batch_rows) == (3, 9)
    step = writer.record(make_row(12))  # a later turn: at once again
    with pytest.raises(StopIteration):
        step.send(None)
    assert writer.stats().batches == 4
    assert registry.get_sample_value("neogate_ledger_rows_written_total") == 12
    assert registry.get_sample_value("neogate_ledger_batch_rows_count") == 4
    await writer.close()
    assert count_rows(db) == 12


async def test_with_company_a_row_waits_for_the_group_commit(tmp_path: Path) -> None:
    """While other requests are in flight (`alone` false) no row commits on its own turn:
    each goes to the writer task, which commits every row of a turn as one transaction.
    Measured (bench_core, c=32): one commit per row on the loop cost ~10% of throughput."""
    db = tmp_path / "ledger.db"
    company = [3]
    writer = LedgerWriter(SqliteLedger(db), alone=lambda: company[0] <= 1)
    await writer.start()
    await asyncio.sleep(0)  # the writer task waits for rows
    burst = [asyncio.create_task(writer.record(make_row(i))) for i in range(1, 6)]
    await asyncio.gather(*burst)
    stats = writer.stats()
    # Alone, row 1 would have committed by itself first: (2 batches, the last of 4 rows).
    assert count_rows(db) == 5 and (stats.batches, stats.last_batch_rows) == (1, 5)
    company[0] = 1  # alone again: the next row commits in its caller's own step
    step = writer.record(make_row(6))
    with pytest.raises(StopIteration):
        step.send(None)
    assert count_rows(db) == 6 and writer.stats().batches == 2
    await writer.close()


async def test_record_after_close_is_refused(tmp_path: Path) -> None:
    writer = LedgerWriter(SqliteLedger(tmp_path / "ledger.db"))
    await writer.start()
    await writer.close()
    with pytest.raises(Exception, match="not running"):
        await writer.record(make_row(1))


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.metering.ledger import LedgerRow, LedgerWriter, Spool
    from gateway.metering.ledger.sqlite import SqliteLedger
    from gateway.metering.money import UnitPrices
    from gateway.metering.usage import Usage

    async def one(writer, i):
        row = LedgerRow.from_usage(
            request_id=f"req-{i}", attempt=0, ts=1.75e9, tenant="t", model="m",
            backend="b", backend_model="bm", usage=Usage(10, 5), prices=UnitPrices.of(1, 2),
            ttft_s=None, total_s=0.1, stream=False, outcome="ok")
        await writer.record(row)
        sys.stdout.write(f"{i}\\n")
        sys.stdout.flush()

    async def main():
        writer = LedgerWriter(SqliteLedger(sys.argv[1]), Spool(sys.argv[2]))
        await writer.start()
        i = 0
        while True:
            await asyncio.gather(*(one(writer, i + k) for k in range(50)))
            i += 50

    asyncio.run(main())
    """
)


def test_every_acknowledged_row_survives_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db), str(tmp_path / "spool")],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None
    acked: list[str] = []
    for line in child.stdout:
        acked.append(line.decode().strip())
        if len(acked) >= 2000:
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    acked += child.stdout.read().decode().split()
    child.stdout.close()
    with sqlite3.connect(db) as conn:
        stored = {r[0] for r in conn.execute("SELECT request_id FROM ledger")}
    missing = [i for i in acked if f"req-{i}" not in stored]
    assert len(acked) >= 2000
    assert missing == []


# --- reports and `neogate usage` on this ledger ----------------------------------------

DAY1 = 1_749_988_800.0  # 2025-06-15 12:00 UTC
DAY2 = DAY1 + 86_400.0
# (request, attempt, ts, tenant, model, backend, batch, prompt, completion, in $/M, out $/M, outcome)
DATASET = [
    ("req-1", 0, DAY1, "acme", "llama-8b", "groq", None, 1000, 500, "0.05", "0.08", "ok"),
    ("req-1", 1, DAY1, "acme", "llama-8b", "groq", None, 1000, 0, "0.05", "0.08", "upstream_cut"),
    ("req-2", 0, DAY2, "acme", "llama-8b", "groq", None, 1000, 500, "0.05", "0.08", "ok"),
    ("req-3", 0, DAY1, "beta", "llama-8b", "local-h100", 1, 100, 1000, "0.1", "3.82", "ok"),
    ("req-4", 0, DAY1, "beta", "llama-8b", "local-h100", 3, 100, 1000, "0.05", "1.0", "ok"),
    ("req-5", 0, DAY2, "beta", "llama-70b", "local-h100", 40, 100, 1000, "0.01", "0.1", "ok"),
]


def dataset_rows() -> list[LedgerRow]:
    return [
        LedgerRow.from_usage(
            request_id=rid,
            attempt=attempt,
            ts=ts,
            tenant=tenant,
            model=model,
            backend=backend,
            backend_model=model,
            usage=Usage(prompt, completion),
            prices=UnitPrices.of(p_in, p_out, version=f"{backend}@1"),
            ttft_s=0.1,
            total_s=1.0,
            stream=True,
            outcome=outcome,
            batch_size=batch,
            is_local=batch is not None,
        )
        for rid, attempt, ts, tenant, model, backend, batch, prompt, completion, p_in, p_out, outcome in DATASET
    ]


async def check_reports(store: LedgerStore) -> None:
    """The same expectations hold on every store (SQLite here, PostgreSQL in its own test)."""
    rows = await usage_report(store, ["day", "model"])
    assert [(dict(r.group)["day"], dict(r.group)["model"]) for r in rows] == [
        ("2025-06-15", "llama-8b"),
        ("2025-06-16", "llama-70b"),
        ("2025-06-16", "llama-8b"),
    ]
    first = rows[0]
    assert (first.requests, first.attempts) == (3, 4)
    assert (first.prompt_tokens, first.completion_tokens) == (2200, 2500)
    assert first.cost_nusd == 90_000 + 50_000 + 3_830_000 + 1_005_000
    by_tenant = await usage_report(store, ["tenant"], since=DAY2 - 3600)
    assert [(dict(r.group)["tenant"], r.cost_nusd) for r in by_tenant] == [
        ("acme", 90_000),
        ("beta", 101_000),
    ]
    only = await usage_report(store, [], tenant="acme", until=DAY1 + 1)
    assert [(r.requests, r.attempts, r.cost_nusd) for r in only] == [(1, 2, 140_000)]
    assert await usage_report(store, ["backend"], since=DAY2 + 86_400) == []
    with pytest.raises(ValueError, match="cannot group"):
        await usage_report(store, ["request_id; DROP TABLE ledger"])

    sheet = await pricing_sheet(store)
    assert [(p.backend, p.batch, p.requests) for p in sheet] == [
        ("groq", "-", 2),
        ("local-h100", "1", 1),
        ("local-h100", "2-4", 1),
        ("local-h100", "33-64", 1),
    ]
    groq, b1, _, b40 = sheet
    assert groq.effective_usd_per_m == pytest.approx(0.0575)  # 230_000 nUSD over 4000 tokens
    assert (groq.charged_in_usd_per_m, groq.charged_out_usd_per_m) == (0.05, 0.08)
    assert (groq.list_in_usd_per_m, groq.list_out_usd_per_m) == (0.05, 0.08)
    assert b1.is_local and b1.charged_out_usd_per_m == pytest.approx(3.82)
    assert b1.effective_usd_per_m == pytest.approx(3830 / 1100)
    assert b40.effective_usd_per_m == pytest.approx(101 / 1100)
    assert b1.list_out_usd_per_m == pytest.approx(0.1)  # the latest price on that backend

    spend = await spend_by_tenant(store, DAY2 + 60)
    assert spend["acme"] == TenantSpend(90_000, 1500, 230_000, 4000, 230_000, 4000)
    assert spend["beta"] == TenantSpend(101_000, 1100, 4_936_000, 3300, 4_936_000, 3300)
    # A Redis rebuild counts only what finished before its cut-off: here the first day.
    early = await spend_by_tenant(store, DAY2 + 60, before=DAY2)
    assert early["acme"] == TenantSpend(0, 0, 140_000, 2500, 140_000, 2500)


async def write_dataset(db: Path) -> None:
    writer = LedgerWriter(SqliteLedger(db))
    await writer.start()
    await asyncio.gather(*(writer.record(r) for r in dataset_rows()))
    await writer.close()


async def test_reports_on_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await write_dataset(db)
    store = SqliteLedger(db, create=False)
    await check_reports(store)
    await store.close()


def usage_cli(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_usage_parser(parser.add_subparsers(dest="command"))
    out = io.StringIO()
    code = run_usage(parser.parse_args(["usage", *argv]), out)
    return code, out.getvalue()


async def test_usage_cli_reads_the_default_ledger_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    await write_dataset(tmp_path / DEFAULT_LEDGER_PATH)
    code, out = await asyncio.to_thread(usage_cli)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "day", "model", "requests", "attempts", "prompt_tokens", "completion_tokens",
        "cached_tokens", "reasoning_tokens", "cost_usd",
    ]  # fmt: skip
    assert lines[1].split() == [
        "2025-06-15",
        "llama-8b",
        "3",
        "4",
        "2200",
        "2500",
        "0",
        "0",
        "0.004975",
    ]
    assert lines[-1].split()[0] == "TOTAL"


async def test_usage_cli_formats_filters_and_pricing(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere.db"
    await write_dataset(db)
    code, out = await asyncio.to_thread(
        usage_cli,
        "--ledger",
        str(db),
        "--by",
        "tenant",
        "--since",
        "2025-06-16",
        "--format",
        "json",
    )
    assert code == 0
    assert [(r["tenant"], r["cost_nusd"]) for r in json.loads(out)] == [
        ("acme", 90_000),
        ("beta", 101_000),
    ]
    code, out = await asyncio.to_thread(
        usage_cli,
        "--ledger",
        str(db),
        "--by",
        "backend",
        "--until",
        "2025-06-15",
        "--format",
        "csv",
    )
    assert code == 0
    assert next(iter(csv.DictReader(io.StringIO(out))))["backend"] == "groq"
    code, out = await asyncio.to_thread(usage_cli, "--ledger", str(db), "--pricing")
    assert code == 0
    assert "33-64" in out and "local-h100" in out


async def test_usage_cli_with_config_reads_its_ledger_section(tmp_path: Path) -> None:
    db = tmp_path / "configured" / "ledger.db"
    await write_dataset(db)
    config = tmp_path / "policy.yaml"
    config.write_text(
        "backends:\n"
        "  - name: groq\n"
        "    kind: groq\n"
        "    base_url: http://127.0.0.1:9/v1\n"
        "    models: {llama-8b: llama-3.1-8b-instant}\n"
        "    price: {input_per_million: 0.05, output_per_million: 0.08}\n"
        "models:\n"
        "  - name: llama-8b\n"
        "    backends: [groq]\n"
        "ledger:\n"
        f"  path: {db}\n"
    )
    code, out = await asyncio.to_thread(usage_cli, "--config", str(config), "--format", "json")
    assert code == 0
    assert len(json.loads(out)) == 3


def test_usage_cli_without_a_ledger_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _ = usage_cli()
    assert code == 1
    assert "no ledger at neogate-data/ledger.db" in capsys.readouterr().err
    assert not (tmp_path / "neogate-data").exists()  # reading never creates a ledger
    code, _ = usage_cli("--ledger", str(tmp_path / "x.db"), "--since", "yesterday")
    assert code == 1


def test_switching_a_new_file_to_wal_waits_for_another_connection(tmp_path: Path) -> None:
    """Two processes opening a new file together: the switch to WAL is retried, not fatal."""
    import threading

    from gateway.metering.ledger.sqlite_file import ensure_wal

    db = tmp_path / "new.db"
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN")
    other.execute("SELECT * FROM t").fetchall()  # holds a shared lock: no mode switch now
    conn = sqlite3.connect(db, timeout=0.0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        conn.execute("PRAGMA journal_mode = WAL")
    releaser = threading.Timer(0.2, lambda: other.execute("COMMIT"))
    releaser.start()
    ensure_wal(conn, 5.0)
    releaser.join()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    other.close()


async def test_checkpoints_follow_what_the_wal_holds_not_its_file_size(tmp_path: Path) -> None:
    """Checkpoints per `checkpoint_bytes` of commits, not one per size check after the first.

    The WAL file keeps its size when a checkpoint restarts it; judged by that size alone,
    every 32 commits after the first checkpoint started another, and each one's fsync held
    a commit (one request in ~80: the ledger's p99 at concurrency 1).
    """
    db = tmp_path / "ledger.db"
    store = SqliteLedger(db, checkpoint_bytes=4 << 20)
    writer = LedgerWriter(store)
    await writer.start()
    n = 3000  # one row per commit, ~7 KB of WAL each: ~20 MB, ~5 checkpoints' worth
    for i in range(n):
        await writer.record(make_row(i))
        if i % 100 == 0:
            await asyncio.sleep(0.02)  # let a running checkpoint finish
    wal = db.with_name(db.name + "-wal").stat().st_size
    await writer.close()
    assert count_rows(db) == n
    # Measured ~7 KB per one-row commit: per ~4 MB of them at most one checkpoint as the
    # WAL passes 4 MB and one in the pause after (the idle one, which lets it start over).
    assert 3 <= store.checkpoints <= 2 * (n * 7_000 // (4 << 20)) + 5, store.checkpoints
    assert store.thread_commits <= store.checkpoints  # at most one commit meets each
    assert wal <= 8 << 20, wal  # the file is cut back after a checkpoint


async def wait_checkpoints_settled(store: SqliteLedger) -> None:
    """Until no checkpoint runs or is owed (the idle one has copied all of the WAL)."""
    for _ in range(1000):  # real fsyncs on a shared disk: up to 10 s
        if not store._checkpointing and not store._owed:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the idle checkpoint never caught up")


async def test_checkpoints_below_the_cap_never_hold_a_commit(tmp_path: Path) -> None:
    """Back-to-back commits past checkpoint_bytes: PASSIVE checkpoints copy the WAL while
    commits go on (no commit finds the file locked); the WAL starts over after an idle one.

    Before, every checkpoint ended in a RESTART, which holds the write lock through its
    fsyncs: a commit meeting it waited on the thread (one request in ~800 at c=1).
    """
    db = tmp_path / "ledger.db"
    store = SqliteLedger(db, checkpoint_bytes=1 << 20, wal_cap_bytes=64 << 20)
    writer = LedgerWriter(store)
    await writer.start()
    for i in range(600):  # one row per commit, ~7 KB of WAL each: ~4 MB, back to back
        await writer.record(make_row(i))
    assert store.checkpoints >= 1  # PASSIVE ones, one per another 1 MB of WAL
    await wait_checkpoints_settled(store)  # idle now: a PASSIVE round copies everything
    wal = db.with_name(db.name + "-wal")
    await writer.record(make_row(600))  # this commit starts the WAL over and cuts the file
    # Cut to journal_size_limit (a quarter of 1 MB); or, if a PASSIVE round caught up
    # during the run (the loop lost the core long enough), less than the 1 MB that makes
    # the size check owe a checkpoint plus one check's worth of commits since. Without
    # checkpoints: ~4 MB.
    assert wal.stat().st_size <= (1 << 20) + 32 * 25_000, wal.stat().st_size
    assert store.restarts == 0
    assert store.thread_commits == 0  # no commit waited behind a checkpoint
    assert store.inline_commits == 601
    await writer.close()
    assert count_rows(db) == 601


async def test_a_wal_at_its_cap_gets_a_restart(tmp_path: Path) -> None:
    """Without a quiet moment the WAL grows for as long as commits come back to back; the
    size check that finds it at wal_cap_bytes starts a RESTART, the one checkpoint that may
    hold a commit, and the WAL starts over at the next commit."""
    db = tmp_path / "ledger.db"
    store = SqliteLedger(db, checkpoint_bytes=1 << 40)  # no checkpoint while the WAL fills
    writer = LedgerWriter(store)
    await writer.start()
    for i in range(300):  # ~2 MB of WAL
        await writer.record(make_row(i))
    assert store.checkpoints == 0
    store.checkpoint_bytes, store.wal_cap_bytes = 1 << 19, 1 << 20
    store._maybe_checkpoint()  # what the size check after every 32nd commit does
    await wait_checkpoints_settled(store)
    assert (store.checkpoints, store.restarts) == (1, 1)
    await writer.record(make_row(300))  # starts the WAL over: it holds this commit only
    ((busy, frames, _),) = await store.fetch("PRAGMA wal_checkpoint(PASSIVE)")
    assert busy == 0 and 0 < frames <= 10, frames  # ~5 pages per one-row commit
    await writer.close()
    assert count_rows(db) == 301
