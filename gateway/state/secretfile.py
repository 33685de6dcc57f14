"""Secrets the gateway keeps for itself in 0600 files beside its ledger (server secret, admin key)."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from gateway.config import GatewayConfig, resolve_secret


def load_or_create(path: str | Path, prefix: str = "") -> str:
    """Read the secret at `path`, creating it (mode 0600) on first use."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    p.parent.mkdir(parents=True, exist_ok=True)
    value = prefix + secrets.token_urlsafe(32)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    except FileExistsError:
        return p.read_text(encoding="utf-8").strip()  # another process won the race
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    return value


def data_dir(config: GatewayConfig) -> Path:
    """The directory of the ledger file: where the gateway keeps its own state."""
    return Path(config.ledger.path).parent


def server_secret(config: GatewayConfig) -> str:
    """The HMAC key of stored API key hashes: `auth.server_secret`, else a file beside the ledger."""
    return resolve_secret(config.auth.server_secret) or load_or_create(
        data_dir(config) / "server.secret"
    )


def admin_key(config: GatewayConfig, *, create: bool) -> str | None:
    """The admin key: `admin.api_key`, else (when `create`) a file beside the ledger."""
    key = resolve_secret(config.admin.api_key)
    if key or not create:
        return key
    return load_or_create(data_dir(config) / "admin.key", "ng-admin-")
