"""What lives as long as the gateway process: opened once at start, closed once at exit.

    Process (one per app, never replaced)          Runtime (one per config; a reload swaps it)
      options, the upstream aiohttp session          config, specs, models, adapters in use
      metrics, ledger writer, key store              auth, estimator, router, feedback, meter
      admission (budget and rate counters)           the config's LiveState view
      reliability (gate, retry budget)               reliability settings, deadline ceiling
      counting pool, local-room wake-ups
      adapters kept warm, the live state in force
      SLO miss budgets (windows per class)         the config's view of them (its bounds)
      background pollers, shared (Redis) state

`gateway.wiring.build_runtime(config, process)` builds a Runtime from the parts
here; `Process.adopt` is the process side of a swap (new limits, settings, breaker
config, static keys, SLO classes; the adapters a reload leaves behind), done in one
step with it.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from adapters.base import Backend
from gateway.background import Background
from gateway.config import BackendSpec, GatewayConfig, TokenizerSpec, resolve_secret
from gateway.flow.admission import Admission, TenantLimits
from gateway.flow.reliability import Reliability, settings_from
from gateway.flow.slo_budgets import SloBudgets, SloBudgetView
from gateway.metering.counting import CountingPool
from gateway.metering.ledger import LedgerWriter, build_writer
from gateway.metering.ledger.key_tables import PostgresKeyBackend, SqliteKeyBackend
from gateway.metering.ledger.reports import spend_by_tenant
from gateway.metering.ledger.rows import LedgerStore
from gateway.metering.tokenizer import Tokenizer
from gateway.metrics import GatewayMetrics
from gateway.state.keys import KeyBackend, KeyStore
from gateway.state.limits import LimitStore
from gateway.state.live import LiveState, LocalRoom
from gateway.state.shared import SharedHandle, attach_shared_state
from gateway.state.shared.outage import Reseed

__all__ = ["Adapters", "AppOptions", "Process", "orphan_spools", "spool_path", "upstream_session"]


@dataclass(frozen=True)
class AppOptions:
    """How this app is run, beyond the policy file."""

    anonymous_allowed: bool = False
    admin_key: str | None = None
    server_secret: str | None = None
    ledger: bool = True  # off only for the metering-off comparison benchmark
    limit_store: LimitStore | None = None  # shared (Redis) limits; None: in-process
    config_path: str | None = None  # the file SIGHUP and POST /admin/reload read again
    # Which worker of `serve --workers N` this is (None: a single process). Worker i > 0
    # spools to its own file; an admin reload in one worker reloads them all.
    worker_index: int | None = None
    workers: int = 1  # how many `serve --workers N` runs: worker 0 adopts the spools of the rest
    # Backends the file lists as `sim:worker` / `sim:provider` -> the URL of the simulation
    # the command line started for them: a reload puts the same URLs in again.
    simulated: Mapping[str, str] = field(default_factory=dict)


def upstream_session(max_inflight: int) -> aiohttp.ClientSession:
    """The one aiohttp client session of an app: https upstreams, metrics scrapes, price feeds.

    Upstreams are asked for `identity` (adapters send it): the gateway reads every
    answer to meter it and masks the backend's key in error bodies, so compressed bytes
    would be neither metered nor masked, and the client would get them without their
    `Content-Encoding`. An upstream that compresses anyway is decoded here.
    """
    connector = aiohttp.TCPConnector(
        limit=max_inflight,
        limit_per_host=0,
        ttl_dns_cache=300,
        keepalive_timeout=30,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=True,
        skip_auto_headers=("User-Agent",),
    )


class Adapters:
    """Upstream adapters in use, kept (with their warm pools) while a reload leaves their spec alone."""

    def __init__(self) -> None:
        self._in_use: dict[str, tuple[BackendSpec, Backend]] = {}
        self._retired: list[Backend] = []  # closed at exit if their grace has not run out

    def kept(self, spec: BackendSpec) -> Backend | None:
        """The adapter in use for exactly this spec (None: a new or changed backend)."""
        found = self._in_use.get(spec.name)
        return found[1] if found is not None and found[0] == spec else None

    def adopt(
        self, specs: Mapping[str, BackendSpec], backends: Mapping[str, Backend]
    ) -> list[Backend]:
        """Put `backends` in use; return the adapters no longer used (removed or changed)."""
        kept = {id(b) for b in backends.values()}
        gone = [b for _, b in self._in_use.values() if id(b) not in kept]
        self._in_use = {name: (specs[name], b) for name, b in backends.items()}
        self._retired.extend(gone)
        return gone

    def close(self) -> None:
        for _, backend in self._in_use.values():
            backend.close()
        for backend in self._retired:
            backend.close()


def tenant_limits(config: GatewayConfig) -> dict[str, TenantLimits]:
    return {t.name: TenantLimits.from_specs(t.budgets, t.rate_limits) for t in config.tenants}


def static_keys(config: GatewayConfig) -> dict[str, list[str]]:
    """Each tenant's keys written in the policy file (resolved `env:` references)."""
    return {
        t.name: [k for k in (resolve_secret(r) for r in t.api_keys) if k] for t in config.tenants
    }


class Process:
    """The state of one gateway process that no reload replaces.

    Built from the start-up config: the parts a reload cannot change (ledger, keys,
    Redis, server secret) are fixed here; the rest follows each adopted config.
    """

    def __init__(self, config: GatewayConfig, options: AppOptions) -> None:
        self.options = options
        self.metrics = GatewayMetrics()
        secret = options.server_secret or resolve_secret(config.auth.server_secret) or ""
        self.keys = KeyStore(_key_backend(config), secret.encode() or os.urandom(32))
        self.admission = Admission(tenant_limits(config), options.limit_store)
        # The gate and retry budget: slots held by running requests stay counted across reloads.
        self.reliability = Reliability.from_config(config)
        self.ledger: LedgerWriter | None = None
        if options.ledger and config.ledger.kind != "none":
            self.ledger = build_writer(
                config.ledger.kind,
                path=config.ledger.path,
                dsn=resolve_secret(config.ledger.dsn),
                spool_path=spool_path(config.ledger.spool_path, options.worker_index),
                registry=self.metrics.registry,
                schema=config.ledger.schema_name,
                adopt=[]
                if options.worker_index
                else orphan_spools(config.ledger.spool_path, options.workers),
                # The request recording its row still holds its gate slot.
                alone=lambda: self.reliability.gate.inflight() <= 1,
            )
        self.counting = CountingPool()
        self.room = LocalRoom()
        # The population SLO budgets: a reload keeps a class's window while its bounds stand.
        self.slo_budgets = SloBudgets()
        self.adapters = Adapters()
        self.session = upstream_session(config.max_inflight)  # last: nothing after it fails
        self.background = Background(
            self.session, self.metrics, self.keys, self.ledger.store if self.ledger else None
        )
        # Called after this process creates or revokes a key; shared state (Redis)
        # sets it so other replicas refresh at once instead of at their next poll.
        self.keys_changed: Callable[[], None] = _nothing
        self._redis = config.redis
        self._shared: SharedHandle | None = None
        self._live: LiveState | None = None
        self._tokenizer: tuple[TokenizerSpec, Tokenizer] | None = None
        self._opened = False

    @property
    def live(self) -> LiveState:
        """The live state of the config in force."""
        if self._live is None:
            raise RuntimeError("no config adopted yet")
        return self._live

    def tokenizer(self, spec: TokenizerSpec) -> Tokenizer:
        """The tokenizer `spec` names; loaded again only when the spec changes."""
        if self._tokenizer is None or self._tokenizer[0] != spec:
            self._tokenizer = (spec, Tokenizer.from_source(spec.source, spec.encoding, spec.path))
        return self._tokenizer[1]

    def next_live(self, config: GatewayConfig) -> LiveState:
        """A live state for `config`, carrying on from the one in force: a backend whose
        upstream is unchanged keeps what was learned about it (estimates, counters, breaker)."""
        return LiveState(
            {b.name: b for b in config.backends},
            time.time(),
            alpha=config.routing.ewma_alpha,
            breaker=settings_from(config).breaker,
            previous=self._live,
        )

    def adopt(
        self,
        config: GatewayConfig,
        live: LiveState,
        backends: Mapping[str, Backend],
        slo: SloBudgetView,
    ) -> list[Backend]:
        """The process side of putting a config in force (synchronous: one step with the swap).

        New limits for new grants and reservations (held ones stay held), the static keys,
        breakers at the new breaker config, the config's SLO classes (`SloBudgets.adopt`);
        returns the adapters the config no longer uses.
        """
        self.slo_budgets.adopt(slo)
        settings = self.reliability.reconfigure(config)
        self.admission.update_limits(tenant_limits(config))
        self.keys.set_static_keys(static_keys(config))
        live.use_breakers(settings.breaker)
        self._live = live
        return self.adapters.adopt({b.name: b for b in config.backends}, backends)

    async def open(self) -> None:
        """Open the key store and ledger, seed budgets from it, start the process's pollers
        and shared state. Call after the first `adopt`."""
        self._opened = True
        await self.keys.open()
        if self.ledger is not None:
            await self.ledger.start()
            spend = await spend_by_tenant(self.ledger.store, time.time())
            await self.admission.seed(spend)
        self.background.start()
        if self._redis is not None:
            ledger = self.ledger.store if self.ledger is not None else None
            self._shared = await attach_shared_state(
                self._redis,
                reseed=_ledger_reseed(self.admission, ledger) if ledger is not None else None,
                registry=self.metrics.registry,
                live=lambda: self.live,
                keys=self.keys,
            )
            # The process keeps this Admission object, so this holds for good.
            self.admission.store = self._shared.limits
            self.keys_changed = self._shared.keys_changed

    async def close(self) -> None:
        """Stop pollers, then flush the ledger (every row reaches the database or the spool),
        then close what is left. Safe after a failed, partial or missing `open`."""
        try:
            if self._shared is not None:
                await self._shared.close()
            # The last uptime goes to the ledger only if it was opened (it is closed below).
            await self.background.stop(write_uptime=self._opened)
            if self._opened:
                if self.ledger is not None:
                    await self.ledger.close()
                await self.keys.close()
            self.counting.close()
            self.adapters.close()
        finally:
            await self.session.close()


def spool_path(configured: str, worker_index: int | None) -> str:
    """Each worker of `--workers N` needs a spool of its own (two appenders would interleave).

    Worker 0 keeps the configured path, so a spool left by a single process is replayed.
    """
    return configured if not worker_index else f"{configured}.w{worker_index}"


def orphan_spools(configured: str, workers: int) -> list[Path]:
    """Spools of worker indices at or above `workers`: after `--workers` shrank, nobody writes them.

    Worker 0 (or the single process) takes them over at start, so their rows reach the
    database instead of waiting for a worker index that may never run again.
    """
    base = Path(configured)
    pattern = re.compile(re.escape(base.name) + r"\.w(\d+)")
    try:
        names = [p.name for p in base.parent.iterdir()]
    except FileNotFoundError:
        return []
    found = []
    for name in sorted(names):
        m = pattern.fullmatch(name)
        if m is not None and int(m.group(1)) >= workers:
            found.append(base.parent / name)
    return found


def _key_backend(config: GatewayConfig) -> KeyBackend:
    """API keys live beside the ledger: the same SQLite file or PostgreSQL database."""
    if config.ledger.kind == "postgres":
        dsn = resolve_secret(config.ledger.dsn)
        if not dsn:
            raise ValueError("ledger.dsn is not set")
        return PostgresKeyBackend(dsn, schema=config.ledger.schema_name)
    return SqliteKeyBackend(config.ledger.path)


def _nothing() -> None:
    return None


def _ledger_reseed(admission: Admission, ledger: LedgerStore) -> Reseed:
    """Rebuild Redis's counters from what the ledger says each tenant spent."""

    async def reseed(target: LimitStore, cutoff: float) -> None:
        spend = await spend_by_tenant(ledger, time.time(), before=cutoff)
        # A throwaway Admission over `target` reuses the one definition of the counter keys.
        await Admission(admission.limits, target).seed(spend)

    return reseed
