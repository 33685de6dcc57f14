"""Tenant API keys: stored only as HMAC-SHA256(server secret, key), created, listed, revoked.

A key is ``ng-<random urlsafe>`` and is shown once, at creation. The store keeps
``key_id, tenant, hash, created, revoked_at, label`` in table ``api_keys`` of the
ledger's database (SQLite file or PostgreSQL schema) and a change counter in
``api_keys_version``: a revocation bumps it, `KeyStore.refresh()` in other
processes sees the bump and reloads. The tables are kept by a `KeyBackend`
(`gateway.metering.ledger.key_tables`: SQLite or PostgreSQL). Keys from the YAML (static keys) are hashed
at load into the same lookup. Nothing here logs or returns a stored key.
"""

from __future__ import annotations

import builtins
import hmac
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

KEY_PREFIX = "ng-"
_SECRET_BYTES = 32


def generate_key() -> str:
    """A new API key: the prefix and 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


def hash_key(secret: bytes, key: str) -> str:
    """The stored form of a key: hex HMAC-SHA256 under the server secret."""
    # surrogateescape: a header byte that is not UTF-8 (obs-text) makes a key that matches
    # nothing (a 401), not an encoding error.
    raw = key.encode("utf-8", "surrogateescape")
    return hmac.digest(secret, raw, "sha256").hex()  # one-shot C HMAC, ~5x faster


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What may be shown about a key (never the key, never its hash)."""

    key_id: str
    tenant: str
    label: str
    created: float
    revoked_at: float | None = None
    static: bool = False  # from the YAML: revoked by editing the file, not by the CLI


class KeyBackend(Protocol):
    """Where keys live. `rows()` yields (record, hash) for every key, revoked included."""

    async def open(self) -> None: ...

    async def insert(self, record: KeyRecord, key_hash: str) -> None: ...

    async def revoke(self, key_id: str, at: float) -> bool: ...

    async def rows(self) -> builtins.list[tuple[KeyRecord, str]]: ...

    async def version(self) -> int: ...

    async def close(self) -> None: ...


class KeyStore:
    """The in-process key lookup over a `KeyBackend`, plus static keys from the YAML."""

    def __init__(
        self,
        backend: KeyBackend | None,
        secret: bytes,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secret:
            raise ValueError("the server secret must not be empty")
        self._backend = backend
        self._secret = secret
        self._clock = clock
        # hash -> (key_id, tenant, hash): active keys only
        self._stored: dict[str, tuple[str, str, str]] = {}
        self._static: dict[str, tuple[str, str, str]] = {}
        self._records: dict[str, KeyRecord] = {}
        self._version = -1

    async def open(self) -> None:
        """Create the tables if absent and load every active key."""
        if self._backend is not None:
            await self._backend.open()
            await self._reload()

    async def close(self) -> None:
        if self._backend is not None:
            await self._backend.close()

    def set_static_keys(self, keys: Mapping[str, Sequence[str]]) -> None:
        """Replace the YAML keys: tenant -> plaintext keys (already resolved from env:)."""
        static: dict[str, tuple[str, str, str]] = {}
        for tenant, plain in keys.items():
            for i, key in enumerate(plain):
                if key:
                    digest = hash_key(self._secret, key)
                    static[digest] = (f"static:{tenant}:{i}", tenant, digest)
        self._static = static

    def authenticate(self, presented: str) -> str | None:
        """The tenant owning `presented`, or None (unknown or revoked). Constant-time compare."""
        digest = hash_key(self._secret, presented)
        # The dict finds the candidate by its HMAC (timing reveals nothing about the
        # key without the secret); compare_digest then confirms it in constant time.
        for table in (self._stored, self._static):
            entry = table.get(digest)
            if entry is not None and hmac.compare_digest(entry[2], digest):
                return entry[1]
        return None

    async def create(self, tenant: str, label: str = "") -> tuple[str, str]:
        """Store a new key for `tenant`; returns (key_id, plaintext). Show the key once."""
        backend = self._require_backend()
        key = generate_key()
        record = KeyRecord(
            key_id="key_" + secrets.token_hex(8), tenant=tenant, label=label, created=self._clock()
        )
        digest = hash_key(self._secret, key)
        await backend.insert(record, digest)
        self._stored[digest] = (record.key_id, tenant, digest)
        self._records[record.key_id] = record
        return record.key_id, key

    async def revoke(self, key_id: str) -> bool:
        """Revoke a stored key; it is refused from the next request on. False if unknown."""
        backend = self._require_backend()
        at = self._clock()
        found = await backend.revoke(key_id, at)
        self._stored = {h: v for h, v in self._stored.items() if v[0] != key_id}
        if key_id in self._records:
            old = self._records[key_id]
            self._records[key_id] = KeyRecord(
                old.key_id, old.tenant, old.label, old.created, old.revoked_at or at
            )
        return found

    async def list(self, tenant: str | None = None) -> builtins.list[KeyRecord]:
        """Every stored key (revoked ones included) and the static ones, oldest first."""
        if self._backend is not None:
            await self._reload()
        out = [r for r in self._records.values() if tenant is None or r.tenant == tenant]
        out.sort(key=lambda r: (r.created, r.key_id))
        for key_id, owner, _ in sorted(self._static.values()):
            if tenant is None or owner == tenant:
                out.append(KeyRecord(key_id, owner, "from config", 0.0, None, static=True))
        return out

    async def refresh(self) -> bool:
        """Reload when another process created or revoked keys; True if it reloaded."""
        if self._backend is None:
            return False
        if await self._backend.version() == self._version:
            return False
        await self._reload()
        return True

    async def _reload(self) -> None:
        assert self._backend is not None
        version = await self._backend.version()
        rows = await self._backend.rows()
        self._records = {r.key_id: r for r, _ in rows}
        self._stored = {h: (r.key_id, r.tenant, h) for r, h in rows if r.revoked_at is None}
        self._version = version

    def _require_backend(self) -> KeyBackend:
        if self._backend is None:
            raise RuntimeError("no key database configured: only static keys are available")
        return self._backend
