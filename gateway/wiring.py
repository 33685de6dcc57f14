"""Building a `Runtime` from a config, and swapping in a new one on reload without dropping anything.

A reload builds the new runtime beside the old one, carrying over what must
survive (metrics, ledger writer, key store, budget counters, backend live
state of backends that remain) and swaps it in with one assignment; requests
already running keep the runtime they started with.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import aiohttp

from adapters.backend import OpenAICompatBackend
from adapters.base import Backend
from adapters.dialects import dialect_for
from gateway.config import (
    BackendSpec,
    ConfigError,
    ConfigIssue,
    GatewayConfig,
    load_config,
    resolve_secret,
)
from gateway.flow.admission import Admission, TenantLimits
from gateway.flow.estimate import Estimator
from gateway.flow.routing import Router
from gateway.http.auth import Authenticator
from gateway.metering.counting import CountingPool
from gateway.metering.ledger import build_writer
from gateway.metering.ledger.key_tables import PostgresKeyBackend, SqliteKeyBackend
from gateway.metering.meter import Meter
from gateway.metering.tokenizer import Tokenizer
from gateway.metrics import GatewayMetrics
from gateway.runtime import AppOptions, Runtime, RuntimeRef
from gateway.state.background import Background
from gateway.state.keys import KeyBackend, KeyStore
from gateway.state.live import LiveState

log = logging.getLogger("neogate")


def build_runtime(
    config: GatewayConfig,
    opts: AppOptions,
    session: aiohttp.ClientSession,
    previous: Runtime | None = None,
) -> Runtime:
    """Wire every part of the request path for one app (reusing `previous`'s long-lived parts)."""
    metrics = previous.metrics if previous else GatewayMetrics()
    specs = {b.name: b for b in config.backends}
    backends = _backends(config, session, previous)
    counting = previous.estimator.counting if previous else CountingPool()
    if previous and previous.config.tokenizer == config.tokenizer:
        tokenizer = previous.estimator.tokenizer
    else:
        tokenizer = Tokenizer.from_source(
            config.tokenizer.source, config.tokenizer.encoding, config.tokenizer.path
        )
    if previous:
        keys = previous.keys
    else:
        secret = opts.server_secret or resolve_secret(config.auth.server_secret) or ""
        keys = KeyStore(_key_backend(config), secret.encode() or os.urandom(32))
    keys.set_static_keys(
        {t.name: [k for k in (resolve_secret(r) for r in t.api_keys) if k] for t in config.tenants}
    )
    auth = Authenticator(
        config,
        keys,
        anonymous_allowed=opts.anonymous_allowed,
        admin_key=opts.admin_key or resolve_secret(config.admin.api_key),
    )
    live = LiveState(
        specs,
        time.time(),
        alpha=config.routing.ewma_alpha,
        previous=previous.router.live if previous else None,
    )
    limits = {t.name: TenantLimits.from_specs(t.budgets, t.rate_limits) for t in config.tenants}
    if previous:
        admission = previous.meter.admission
        admission.update_limits(limits)
        ledger = previous.meter.ledger
    else:
        admission = Admission(limits, opts.limit_store)
        ledger = None
        if opts.ledger and config.ledger.kind != "none":
            ledger = build_writer(
                config.ledger.kind,
                path=config.ledger.path,
                dsn=resolve_secret(config.ledger.dsn),
                spool_path=spool_path(config.ledger.spool_path, opts.worker_index),
                registry=metrics.registry,
                schema=config.ledger.schema_name,
                adopt=[]
                if opts.worker_index
                else orphan_spools(config.ledger.spool_path, opts.workers),
            )
    # The gate and retry budget carry over: slots held by running requests stay counted.
    reliability = previous.router.reliability if previous else None
    if reliability is not None:
        reliability.reconfigure(config)
    return Runtime(
        config=config,
        backends=backends,
        specs=specs,
        models={m.name: m for m in config.models},
        metrics=metrics,
        auth=auth,
        estimator=Estimator(tokenizer, counting),
        router=Router(config, backends, live, metrics, reliability=reliability),
        meter=Meter(
            tokenizer,
            metrics,
            ledger,
            admission,
            live,
            divergence_threshold=config.ledger.divergence_threshold,
            counting=counting,
        ),
        keys=keys,
    )


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


def reload_blockers(old: GatewayConfig, new: GatewayConfig) -> list[ConfigIssue]:
    """Changes a running process cannot apply; they need a restart."""
    out = []
    if old.listen != new.listen:
        out.append(ConfigIssue("listen", None, "the listen address changes only on restart"))
    if old.ledger.model_copy(update={"divergence_threshold": 0}) != new.ledger.model_copy(
        update={"divergence_threshold": 0}
    ):
        out.append(ConfigIssue("ledger", None, "the ledger location changes only on restart"))
    if old.admin != new.admin or old.auth != new.auth:
        out.append(ConfigIssue("admin", None, "admin and auth settings change only on restart"))
    if old.redis != new.redis:
        out.append(ConfigIssue("redis", None, "the redis settings change only on restart"))
    return out


async def reload_runtime(ref: RuntimeRef, config: GatewayConfig, source: str) -> Runtime:
    """Apply `config` atomically; raise ConfigError (keeping the running config) if it cannot be."""
    old = ref.current
    blockers = reload_blockers(old.config, config)
    if blockers:
        raise ConfigError(source, blockers)
    new = build_runtime(config, ref.options, ref.session, previous=old)
    new.background = Background(new, ref.session)
    if old.background is not None:
        await old.background.stop()
    new.background.start()
    ref.current = new
    # Requests that started on the old runtime may still be using (or failing over to)
    # a retired adapter: close its pool once they have had their full time.
    grace = max((b.timeouts.total_s for b in old.specs.values()), default=60.0) + 5.0
    retired = retired_backends(old, new)
    for backend in retired:
        asyncio.get_running_loop().call_later(grace, backend.close)
    new.retired = [*old.retired, *retired]  # closed at shutdown if the grace has not run out
    log.info(
        "reloaded %s: %d backends, %d models, %d tenants",
        source,
        len(config.backends),
        len(config.models),
        len(config.tenants),
    )
    return new


def _backends(
    config: GatewayConfig, session: aiohttp.ClientSession, previous: Runtime | None
) -> dict[str, Backend]:
    """One adapter per backend; a reload keeps the adapter (and its warm pool) of an unchanged one."""
    out: dict[str, Backend] = {}
    for spec in config.backends:
        if previous is not None and previous.specs.get(spec.name) == spec:
            out[spec.name] = previous.backends[spec.name]
        else:
            out[spec.name] = make_backend(spec, session)
    return out


def make_backend(spec: BackendSpec, session: aiohttp.ClientSession) -> Backend:
    """The adapter for one configured backend; every kind speaks the OpenAI protocol.

    One backend over the transport its URL calls for: plain-http upstreams (local
    workers, simulators) through neogate's own keep-alive client (about 30% less gateway
    CPU per request than aiohttp's), https ones through the shared aiohttp session.
    """
    metrics_url = spec.metrics_url
    if metrics_url is None and spec.is_local:
        base = spec.base_url.removesuffix("/v1")
        metrics_url = f"{base}/metrics"
    return OpenAICompatBackend(
        name=spec.name,
        base_url=spec.base_url,
        api_key=resolve_secret(spec.api_key),
        session=session,
        is_local=spec.is_local,
        metrics_url=metrics_url,
        max_connections=spec.max_concurrency,
        dialect=dialect_for(spec.kind),
    )


def retired_backends(old: Runtime, new: Runtime) -> list[Backend]:
    """Adapters of `old` that `new` no longer uses (removed or changed backends)."""
    kept = {id(b) for b in new.backends.values()}
    return [b for b in old.backends.values() if id(b) not in kept]


def _key_backend(config: GatewayConfig) -> KeyBackend:
    """API keys live beside the ledger: the same SQLite file or PostgreSQL database."""
    if config.ledger.kind == "postgres":
        dsn = resolve_secret(config.ledger.dsn)
        if not dsn:
            raise ValueError("ledger.dsn is not set")
        return PostgresKeyBackend(dsn, schema=config.ledger.schema_name)
    return SqliteKeyBackend(config.ledger.path)


async def reload_from_file(ref: RuntimeRef) -> Runtime:
    """Read the policy file again and apply it; the running config stays if it is invalid."""
    path = ref.options.config_path
    if path is None:
        raise ConfigError("<embedded default>", [ConfigIssue("", None, "no policy file to reload")])
    number = ref.reload_started()
    try:
        config = await asyncio.to_thread(partial(load_config, path, require_env=True))
        config = bind_simulated(config, ref.options.simulated, path)
        new = await reload_runtime(ref, config, path)
    except Exception as exc:
        ref.reload_ended(number, None, exc)
        raise
    ref.reload_ended(number, new, None)
    return new


def bind_simulated(config: GatewayConfig, urls: Mapping[str, str], source: str) -> GatewayConfig:
    """Put the running simulations' URLs in place of the file's `sim:` base URLs.

    A reload may keep, drop or re-point simulated backends, not add new ones: those
    are started by the command line, at start-up.
    """
    issues = [
        ConfigIssue(
            f"backends.{i}.base_url",
            None,
            f"{b.base_url} for backend {b.name!r} is not running: a new simulated backend "
            "needs a restart",
        )
        for i, b in enumerate(config.backends)
        if b.simulated is not None and b.name not in urls
    ]
    if issues:
        raise ConfigError(source, issues)
    return config.with_backend_urls({b.name: urls[b.name] for b in config.backends if b.simulated})
