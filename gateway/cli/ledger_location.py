"""Where the ledger (and the key table) lives: ``--ledger``/``--db``, else ``--config``'s ledger section,
else the default `neogate serve` writes; and the server secret configured for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.metering.ledger import DEFAULT_LEDGER_PATH

if TYPE_CHECKING:
    from gateway.config import RedisSpec

# The lead's gateway.state.secretfile keeps the server secret beside the ledger under this name.
SECRET_FILE_NAME = "server.secret"


class CliError(Exception):
    """A problem worth one line on stderr and exit status 1."""


@dataclass(frozen=True, slots=True)
class LedgerLocation:
    """Where the ledger (and the key table) lives, and the server secret configured for it."""

    kind: str  # "sqlite" | "postgres"
    path: Path
    dsn: str | None
    configured_secret: str | None
    schema: str = "neogate"  # PostgreSQL schema (ledger.schema_name)
    redis: RedisSpec | None = None  # replicas to tell about key changes at once

    @property
    def secret_file(self) -> Path:
        """Where `neogate serve` keeps the server secret when none is configured."""
        return self.path.parent / SECRET_FILE_NAME


def locate_ledger(config_path: str | None, sqlite_path: str | None) -> LedgerLocation:
    """Resolve --config / --ledger / the default into a LedgerLocation."""
    from gateway.config import AuthSpec, load_config, resolve_secret

    if config_path is None:
        secret = resolve_secret(AuthSpec().server_secret)
        return LedgerLocation("sqlite", Path(sqlite_path or DEFAULT_LEDGER_PATH), None, secret)
    config = load_config(config_path)
    ledger = config.ledger
    secret = resolve_secret(config.auth.server_secret)
    if sqlite_path is not None:
        return LedgerLocation("sqlite", Path(sqlite_path), None, secret)
    dsn = resolve_secret(ledger.dsn) if ledger.kind == "postgres" else None
    if ledger.kind == "postgres" and not dsn:
        raise CliError(f"{config_path}: ledger.dsn is not set (or its env variable is unset)")
    return LedgerLocation(
        ledger.kind, Path(ledger.path), dsn, secret, ledger.schema_name, config.redis
    )


def require_sqlite_file(loc: LedgerLocation) -> None:
    if loc.kind == "sqlite" and not loc.path.is_file():
        raise CliError(
            f"no ledger at {loc.path}: run `neogate serve` from this directory first, "
            "or pass --config / --ledger"
        )
