"""LedgerRow: every field lands where its name says, in the INSERT's order and the spool's;
the SQLite file's schema and statements built from it (`sqlite_file`)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.metering.ledger import sqlite_file
from gateway.metering.ledger.rows import COLUMNS, LedgerRow, LedgerUnavailable, utc_day
from gateway.metering.ledger.sqlite import SqliteLedger
from gateway.metering.ledger.sqlite_file import SCHEMA, column_sql, ensure_wal, insert_sql, is_busy
from gateway.metering.money import UnitPrices
from gateway.metering.usage import Usage


def test_from_usage_puts_each_value_in_its_field() -> None:
    # Every value distinct, so a field built from the wrong argument shows.
    prices = UnitPrices.of("0.5", "1.5", "0.25", version="v7")
    alt = UnitPrices.of(2, 4, version="v7")
    usage = Usage(
        1000,
        200,
        cached_tokens=300,
        reasoning_tokens=40,
        source="counted",
        counted_prompt_tokens=1001,
        counted_completion_tokens=201,
    )
    row = LedgerRow.from_usage(
        request_id="req-1",
        attempt=3,
        ts=1_750_000_000.5,
        tenant="acme",
        model="m",
        backend="b",
        backend_model="bm",
        usage=usage,
        prices=prices,
        ttft_s=0.125,
        total_s=0.75,
        stream=True,
        outcome="upstream_cut",
        divergent=True,
        batch_size=6,
        is_local=True,
        client_request_id="client-9",
        marginal_cost_usd=0.000123,
        counterfactual=("alt", alt),
    )
    # 700 uncached x 0.5 + 300 cached x 0.25 + 200 x 1.5 = 725 micro-dollars
    assert row._asdict() == {
        "request_id": "req-1",
        "attempt": 3,
        "ts": 1_750_000_000.5,
        "tenant": "acme",
        "model": "m",
        "backend": "b",
        "backend_model": "bm",
        "prompt_tokens": 1000,
        "completion_tokens": 200,
        "cached_tokens": 300,
        "reasoning_tokens": 40,
        "token_source": "counted",
        "counted_prompt_tokens": 1001,
        "counted_completion_tokens": 201,
        "divergent": True,
        "price_in_nusd_per_m": 500_000_000,
        "price_out_nusd_per_m": 1_500_000_000,
        "price_cached_nusd_per_m": 250_000_000,
        "price_version": "v7",
        "cost_nusd": 725_000,
        "ttft_s": 0.125,
        "total_s": 0.75,
        "stream": True,
        "outcome": "upstream_cut",
        "batch_size": 6,
        "is_local": True,
        "client_request_id": "client-9",
        "marginal_cost_nusd": 123_000,
        # 1000 x 2 + 200 x 4 = 2800 micro-dollars (no cached price: input price)
        "counterfactual_cost_nusd": 2_800_000,
        "counterfactual_backend": "alt",
    }
    values = dict(zip(COLUMNS, row.as_tuple(), strict=True))
    assert values == {**row._asdict(), "day": "2025-06-15"}
    assert LedgerRow.from_json(row.to_json()) == row


@pytest.mark.parametrize(
    "ts", [0.0, 86_399.999, 86_400.0, 951_782_400.0, 1_750_000_000.5, 4_102_444_799.9, -0.5]
)
def test_utc_day_is_gmtimes_day(ts: float) -> None:
    assert utc_day(ts) == time.strftime("%Y-%m-%d", time.gmtime(ts))


# --- pinned by mutation testing (make mutation MODULES=ledger_rows) ------------------------


async def test_a_new_sqlite_file_declares_each_columns_type_and_nullability(tmp_path: Path) -> None:
    """What a new ledger file declares, column by column (SQLite would take any type name,
    so only the schema shows it): ints and booleans INTEGER, times REAL, text TEXT; the
    optional fields (`| None` in LedgerRow) nullable, the rest NOT NULL; the key is
    (request_id, attempt). Written out by hand from LedgerRow's annotations."""
    db = tmp_path / "ledger.db"
    store = SqliteLedger(db)
    await store.open()
    await store.close()
    with sqlite3.connect(db) as conn:
        got = [(r[1], r[2], r[3], r[5]) for r in conn.execute("PRAGMA table_info(ledger)")]
    want = [
        # (name, declared type, NOT NULL, position in the primary key)
        ("request_id", "TEXT", 1, 1),
        ("attempt", "INTEGER", 1, 2),
        ("ts", "REAL", 1, 0),
        ("day", "TEXT", 1, 0),
        ("tenant", "TEXT", 1, 0),
        ("model", "TEXT", 1, 0),
        ("backend", "TEXT", 1, 0),
        ("backend_model", "TEXT", 1, 0),
        ("prompt_tokens", "INTEGER", 1, 0),
        ("completion_tokens", "INTEGER", 1, 0),
        ("cached_tokens", "INTEGER", 1, 0),
        ("reasoning_tokens", "INTEGER", 1, 0),
        ("token_source", "TEXT", 1, 0),
        ("counted_prompt_tokens", "INTEGER", 0, 0),
        ("counted_completion_tokens", "INTEGER", 0, 0),
        ("divergent", "INTEGER", 1, 0),
        ("price_in_nusd_per_m", "INTEGER", 1, 0),
        ("price_out_nusd_per_m", "INTEGER", 1, 0),
        ("price_cached_nusd_per_m", "INTEGER", 0, 0),
        ("price_version", "TEXT", 1, 0),
        ("cost_nusd", "INTEGER", 1, 0),
        ("ttft_s", "REAL", 0, 0),
        ("total_s", "REAL", 1, 0),
        ("stream", "INTEGER", 1, 0),
        ("outcome", "TEXT", 1, 0),
        ("batch_size", "INTEGER", 0, 0),
        ("is_local", "INTEGER", 1, 0),
        ("client_request_id", "TEXT", 0, 0),
        ("marginal_cost_nusd", "INTEGER", 0, 0),
        ("counterfactual_cost_nusd", "INTEGER", 0, 0),
        ("counterfactual_backend", "TEXT", 0, 0),
    ]
    assert got == want


def test_a_spool_line_that_is_not_an_object_is_refused_by_name() -> None:
    # The spool logs this message when it skips the line (`Spool.read`).
    with pytest.raises(ValueError, match=r"^a spool line must be a JSON object$"):
        LedgerRow.from_json(b"[1, 2]")


def test_from_usage_defaults_leave_the_optional_columns_empty() -> None:
    row = LedgerRow.from_usage(
        request_id="r",
        attempt=0,
        ts=0.0,
        tenant="t",
        model="m",
        backend="b",
        backend_model="bm",
        usage=Usage(10, 5),
        prices=UnitPrices.of(1, 2),
        ttft_s=None,
        total_s=1.0,
        stream=False,
        outcome="ok",
    )
    # 10 x $1/M + 5 x $2/M = $0.00002 = 20,000 nano-dollars.
    assert row.cost_nusd == 20_000
    assert (row.divergent, row.batch_size, row.is_local, row.client_request_id) == (
        False,
        None,
        False,
        None,
    )
    assert (row.marginal_cost_nusd, row.counterfactual_cost_nusd) == (None, None)
    assert row.counterfactual_backend is None


def test_the_sql_helpers_build_what_the_file_holds(tmp_path: Path) -> None:
    # column_sql and insert_sql run at import (SCHEMA, INSERTS); called here, so a change to
    # them shows in this process too. Declared as in the table above, written out by hand.
    assert [column_sql(c) for c in ("request_id", "attempt", "ts", "ttft_s", "batch_size")] == [
        "request_id TEXT NOT NULL",
        "attempt INTEGER NOT NULL",
        "ts REAL NOT NULL",
        "ttft_s REAL",
        "batch_size INTEGER",
    ]
    assert column_sql("client_request_id") == "client_request_id TEXT"
    db = tmp_path / "ledger.db"
    with sqlite3.connect(db) as conn:
        for stmt in SCHEMA:
            conn.execute(stmt)
        rows = [_row(1), _row(2), _row(3)]
        conn.execute(insert_sql(2), [v for r in rows[:2] for v in r.as_tuple()])
        # Three rows in one statement, one of them already there: skipped, not an error.
        conn.execute(insert_sql(3), [v for r in (rows[1], rows[2], _row(4)) for v in r.as_tuple()])
        got = conn.execute("SELECT request_id, cost_nusd FROM ledger ORDER BY rowid").fetchall()
    assert got == [("r1", 20_000), ("r2", 20_000), ("r3", 20_000), ("r4", 20_000)]


def _row_args(i: int) -> dict[str, Any]:
    return {
        "request_id": f"r{i}",
        "attempt": 0,
        "ts": 0.0,
        "tenant": "t",
        "model": "m",
        "backend": "b",
        "backend_model": "bm",
        "usage": Usage(10, 5),
        "ttft_s": None,
        "total_s": 1.0,
        "stream": False,
        "outcome": "ok",
    }


def _row(i: int) -> LedgerRow:
    return LedgerRow.from_usage(**_row_args(i), prices=UnitPrices.of(1, 2))


def test_a_real_lock_is_busy_and_other_errors_are_not(tmp_path: Path) -> None:
    db = tmp_path / "busy.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("PRAGMA journal_mode = WAL")
    holder.execute("CREATE TABLE t (x)")
    waiter = sqlite3.connect(db, isolation_level=None, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError) as locked:
        waiter.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError) as missing:
        waiter.execute("SELECT x FROM nowhere")
    holder.execute("ROLLBACK")
    holder.close()
    waiter.close()
    assert locked.value.sqlite_errorcode == sqlite3.SQLITE_BUSY
    assert is_busy(locked.value)
    assert not is_busy(missing.value)


@pytest.mark.parametrize(
    ("code", "message", "busy"),
    [
        (517, "x", True),  # SQLITE_BUSY_SNAPSHOT: 5 | 2 << 8
        (262, "x", True),  # SQLITE_LOCKED_SHAREDCACHE: 6 | 1 << 8
        (1, "table locked_rows is busy", False),  # a code decides, whatever the words
        # Raised by hand (no code): the words decide.
        (None, "database is locked", True),
        (None, "busy", True),
        (None, "disk I/O error", False),
    ],
)
def test_is_busy_reads_the_code_and_else_the_message(
    code: int | None, message: str, busy: bool
) -> None:
    exc = sqlite3.OperationalError(message)
    if code is not None:
        exc.sqlite_errorcode = code  # type: ignore[attr-defined]
    assert is_busy(exc) is busy


def test_a_counterfactual_at_the_rows_own_prices_costs_what_the_row_costs() -> None:
    prices = UnitPrices.of(1, 2)
    # The same prices object (one cache entry): 10 x $1/M + 5 x $2/M = 20,000 nano-dollars.
    row = LedgerRow.from_usage(**_row_args(1), prices=prices, counterfactual=("alt", prices))
    assert (row.counterfactual_cost_nusd, row.counterfactual_backend) == (20_000, "alt")


class _Counting:
    """A connection that keeps the statements it was given."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.statements: list[str] = []

    def execute(self, sql: str) -> sqlite3.Cursor:
        self.statements.append(sql)
        return self.conn.execute(sql)


def test_the_switch_to_wal_is_not_retried_after_an_error_other_than_busy(
    tmp_path: Path,
) -> None:
    db = tmp_path / "ro.db"
    with sqlite3.connect(db) as made:
        made.execute("CREATE TABLE t (x)")
    ro = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, isolation_level=None)
    conn = _Counting(ro)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ensure_wal(conn, 0.5)  # type: ignore[arg-type]
    ro.close()
    switches = [
        s for s in conn.statements if s.replace(" ", "").upper() == "PRAGMAJOURNAL_MODE=WAL"
    ]
    assert len(switches) == 1


def test_a_switch_refused_without_an_error_is_named() -> None:
    # An in-memory database answers "memory" to the switch, every time.
    conn = sqlite3.connect(":memory:", isolation_level=None)
    with pytest.raises(LedgerUnavailable) as refused:
        ensure_wal(conn, 0.05)
    conn.close()
    assert str(refused.value) == "could not put the file in WAL mode (still memory)"


def test_a_new_file_switches_to_wal_with_no_time_to_wait(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "new.db", isolation_level=None)
    ensure_wal(conn, 0.0)  # nothing in the way: done on the first try
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    assert mode == "wal"


class _Clock:
    """sqlite_file's `time`: monotonic() reads the given times, then one second more each
    call; sleep() only records."""

    def __init__(self, *times: float) -> None:
        self.times = list(times)
        self.slept: list[float] = []

    def monotonic(self) -> float:
        if len(self.times) > 1:
            return self.times.pop(0)
        self.times[0] += 1.0
        return self.times[0] - 1.0

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def _switches(conn: _Counting) -> int:
    return sum(s.replace(" ", "").upper() == "PRAGMAJOURNAL_MODE=WAL" for s in conn.statements)


def test_a_refused_switch_is_tried_again_until_the_deadline_then_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Deadline 100.0 + 0.5. Refused at 100.25: 10 ms later again; refused at 100.5, the
    # deadline itself: no more tries.
    clock = _Clock(100.0, 100.25, 100.5)
    monkeypatch.setattr(sqlite_file, "time", clock)
    conn = _Counting(sqlite3.connect(":memory:", isolation_level=None))
    with pytest.raises(LedgerUnavailable, match=r"still memory"):
        ensure_wal(conn, 0.5)  # type: ignore[arg-type]
    conn.conn.close()
    assert (_switches(conn), clock.slept) == (2, [0.01])


def test_a_busy_switch_is_tried_again_until_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "new.db"
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN")
    other.execute("SELECT * FROM t").fetchall()  # a shared lock: no mode switch meanwhile
    clock = _Clock(100.0, 100.25, 100.5)
    monkeypatch.setattr(sqlite_file, "time", clock)
    conn = _Counting(sqlite3.connect(db, timeout=0.0, isolation_level=None))
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        ensure_wal(conn, 0.5)  # type: ignore[arg-type]
    conn.conn.close()
    other.execute("COMMIT")
    other.close()
    assert (_switches(conn), clock.slept) == (2, [0.01])
