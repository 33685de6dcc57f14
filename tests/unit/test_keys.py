"""Tenant API keys: hashed storage, authentication, revocation across processes, static keys."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from gateway.cli.keys import add_keys_parser, run_keys
from gateway.metering.ledger.key_tables import PostgresKeyBackend, SqliteKeyBackend
from gateway.state.keys import KeyStore, generate_key, hash_key

SECRET = b"test-server-secret"
DSN = "postgresql://postgres@127.0.0.1:5432/test"


class Clock:
    def __init__(self) -> None:
        self.now = 1_750_000_000.0

    def __call__(self) -> float:
        return self.now


async def sqlite_store(path: Path, secret: bytes = SECRET) -> KeyStore:
    store = KeyStore(SqliteKeyBackend(path), secret, clock=Clock())
    await store.open()
    return store


def test_key_format() -> None:
    key = generate_key()
    assert re.fullmatch(r"ng-[A-Za-z0-9_-]{43}", key)
    assert generate_key() != key
    assert hash_key(SECRET, key) != hash_key(b"other", key)


async def test_create_authenticate_and_plaintext_never_stored(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    store = await sqlite_store(db)
    key_id, key = await store.create("acme", label="ci")
    assert store.authenticate(key) == "acme"
    assert store.authenticate(key + "x") is None
    assert store.authenticate("") is None
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(FULL)")
        (stored,) = conn.execute("SELECT hash FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
    assert stored == hash_key(SECRET, key)
    for f in tmp_path.iterdir():
        assert key.encode() not in f.read_bytes()
    records = await store.list()
    assert [(r.key_id, r.tenant, r.label, r.revoked_at) for r in records] == [
        (key_id, "acme", "ci", None)
    ]
    await store.close()


async def test_revoked_key_is_refused_on_the_next_request(tmp_path: Path) -> None:
    store = await sqlite_store(tmp_path / "ledger.db")
    key_id, key = await store.create("acme")
    _, other = await store.create("acme")
    assert await store.revoke(key_id)
    assert store.authenticate(key) is None
    assert store.authenticate(other) == "acme"
    assert not await store.revoke("key_unknown")
    (revoked,) = [r for r in await store.list() if r.key_id == key_id]
    assert revoked.revoked_at == 1_750_000_000.0
    await store.close()


async def test_other_process_sees_creation_and_revocation_after_refresh(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    admin = await sqlite_store(db)
    gateway = await sqlite_store(db)
    key_id, key = await admin.create("acme")
    assert gateway.authenticate(key) is None  # not yet seen
    assert await gateway.refresh()
    assert gateway.authenticate(key) == "acme"
    assert not await gateway.refresh()  # nothing changed: no reload
    await admin.revoke(key_id)
    assert await gateway.refresh()
    assert gateway.authenticate(key) is None


async def test_refresh_reads_beside_a_writer_without_taking_the_write_lock(
    tmp_path: Path,
) -> None:
    # The refresh runs every 0.5 s against the ledger's file: it must not take the write
    # lock the ledger's commits need. Another connection holds that lock here; a refresh
    # that asked for it (BEGIN IMMEDIATE) fails as "database is locked" after its timeout.
    db = tmp_path / "ledger.db"
    admin = await sqlite_store(db)
    gateway = KeyStore(SqliteKeyBackend(db, busy_timeout_s=0.05), SECRET, clock=Clock())
    await gateway.open()
    _, key = await admin.create("acme")
    writer = sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("CREATE TABLE held (x)")  # an uncommitted write: the lock is held
        assert await gateway.refresh()  # the committed key is read beside the writer
        assert gateway.authenticate(key) == "acme"
        assert not await gateway.refresh()
        writer.execute("ROLLBACK")
    finally:
        writer.close()
    await admin.close()
    await gateway.close()


async def test_a_different_secret_accepts_nothing(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    store = await sqlite_store(db)
    _, key = await store.create("acme")
    other = await sqlite_store(db, secret=b"another-secret")
    assert other.authenticate(key) is None


async def test_static_keys_from_config() -> None:
    store = KeyStore(None, SECRET)
    await store.open()
    store.set_static_keys({"acme": ["sk-acme-1", "sk-acme-2"], "beta": ["sk-beta"]})
    assert store.authenticate("sk-acme-2") == "acme"
    assert store.authenticate("sk-beta") == "beta"
    assert store.authenticate("sk-nope") is None
    listed = await store.list("acme")
    assert [r.key_id for r in listed] == ["static:acme:0", "static:acme:1"]
    assert all(r.static for r in listed)
    store.set_static_keys({})  # config reload removed them
    assert store.authenticate("sk-beta") is None
    with pytest.raises(RuntimeError, match="no key database"):
        await store.create("acme")


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="secret"):
        KeyStore(None, b"")


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        await conn.close()


async def test_postgres_keys_and_cross_process_revocation(pg_schema: str) -> None:
    admin = KeyStore(PostgresKeyBackend(DSN, schema=pg_schema), SECRET)
    gateway = KeyStore(PostgresKeyBackend(DSN, schema=pg_schema), SECRET)
    await admin.open()
    await gateway.open()
    try:
        key_id, key = await admin.create("acme", "prod")
        assert await gateway.refresh()
        assert gateway.authenticate(key) == "acme"
        assert await admin.revoke(key_id)
        assert not await admin.revoke(key_id)  # already revoked
        assert await gateway.refresh()
        assert gateway.authenticate(key) is None
        (rec,) = await gateway.list()
        assert rec.revoked_at is not None and rec.label == "prod"
    finally:
        await admin.close()
        await gateway.close()


def keys_cli(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_keys_parser(parser.add_subparsers(dest="command"))
    out = io.StringIO()
    code = run_keys(parser.parse_args(["keys", *argv]), out)
    return code, out.getvalue()


async def test_keys_cli_create_list_revoke(tmp_path: Path) -> None:
    db = str(tmp_path / "data" / "ledger.db")
    code, out = await asyncio.to_thread(
        keys_cli, "create", "--tenant", "acme", "--label", "ci", "--db", db
    )
    assert code == 0
    key = re.search(r"key:\s+(ng-\S+)", out)
    key_id = re.search(r"key_id:\s+(\S+)", out)
    assert key and key_id
    # The gateway finds the secret where the CLI left it (beside the ledger) and accepts the key.
    secret = (tmp_path / "data" / "server.secret").read_text().strip().encode()
    store = KeyStore(SqliteKeyBackend(db), secret)
    await store.open()
    assert store.authenticate(key.group(1)) == "acme"
    code, out = await asyncio.to_thread(keys_cli, "list", "--db", db, "--format", "json")
    assert code == 0
    (listed,) = json.loads(out)
    assert listed["key_id"] == key_id.group(1) and listed["revoked"] is None
    assert key.group(1) not in out
    code, _ = await asyncio.to_thread(keys_cli, "revoke", key_id.group(1), "--db", db)
    assert code == 0
    assert await store.refresh()
    assert store.authenticate(key.group(1)) is None
    code, _ = await asyncio.to_thread(keys_cli, "revoke", key_id.group(1), "--db", db)
    assert code == 1  # already revoked
