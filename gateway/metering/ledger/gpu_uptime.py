"""The ledger's `gpu_uptime` table: up intervals of local workers, written and read.

One row per (backend, observer, up_from): an interval of successful scrapes one gateway
process (`observer`) saw (`gateway/metering/uptime.py`). The open interval is upserted
with a later `up_to` at each write, so a crash loses at most the time since the last
write; several processes (`serve --workers N`) write their own rows, merged when summed.
The table is made by each store's schema (`sqlite.py` SCHEMA, `postgres.py`
`schema_sql`); a ledger opened without creating it (`neogate usage` on a file from before
this table) reads as no uptime observed.

Both statements go through `LedgerStore.fetch`: each is one statement, committed on its
own (SQLite in autocommit on the store's thread, PostgreSQL outside a transaction).
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.metering.ledger.rows import LedgerStore
from gateway.metering.uptime import Span, UptimeRow

_UPSERT_HEAD = "INSERT INTO gpu_uptime (backend, observer, up_from, up_to) VALUES "
_UPSERT_TAIL = " ON CONFLICT (backend, observer, up_from) DO UPDATE SET up_to = excluded.up_to"


async def record_uptime(store: LedgerStore, observer: str, rows: Sequence[UptimeRow]) -> None:
    """Upsert `rows` as `observer`'s, in one statement; LedgerUnavailable if refused."""
    if not rows:
        return
    values = ", ".join("(?, ?, ?, ?)" for _ in rows)
    params: list[object] = []
    for r in rows:
        params += [r.backend, observer, r.up_from, r.up_to]
    await store.fetch(_UPSERT_HEAD + values + _UPSERT_TAIL, params)


async def _has_table(store: LedgerStore) -> bool:
    if store.dialect == "sqlite":
        sql = "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'gpu_uptime'"
    else:
        # The store's search path is its schema: unqualified names resolve there.
        sql = "SELECT COUNT(*) FROM pg_catalog.pg_class WHERE oid = to_regclass('gpu_uptime')"
    found = await store.fetch(sql)
    return bool(found and found[0][0])


async def uptime_spans(
    store: LedgerStore, since: float | None, until: float
) -> dict[str, list[Span]]:
    """Up spans per backend that touch [since, until] (all before `until` without `since`)."""
    if not await _has_table(store):
        return {}
    sql = "SELECT backend, up_from, up_to FROM gpu_uptime WHERE up_from <= ?"
    params: list[object] = [until]
    if since is not None:
        sql += " AND up_to >= ?"
        params.append(since)
    out: dict[str, list[Span]] = {}
    for backend, start, end in await store.fetch(sql, params):
        out.setdefault(str(backend), []).append(Span(float(start), float(end)))
    return out
