"""The composition root: a gateway's process opened with its first runtime, and each reload's runtime built and swapped in.

    running(config, options)       Process opened, the first Runtime adopted; closed on exit
    build_runtime(config, process) a config's parts over the process's long-lived ones
    reload_runtime(ref, config)    build beside the running one, then one swap: the
                                   process adopts the config, `ref.current` is replaced

Requests already running keep the runtime they started with; what they count up
(in-flight, gate slots, reservations) lives in the process, so they count it down there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial

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
from gateway.flow.estimate import Estimator
from gateway.flow.feedback import Feedback
from gateway.flow.meter import Meter
from gateway.flow.reliability import settings_from
from gateway.flow.routing import Router
from gateway.http.auth import Authenticator
from gateway.process import AppOptions, Process
from gateway.runtime import Runtime, RuntimeRef
from policies.types import Slo

log = logging.getLogger("neogate")


@asynccontextmanager
async def running(config: GatewayConfig, options: AppOptions) -> AsyncIterator[RuntimeRef]:
    """The gateway's process, opened with `config` in force; closed (ledger flushed) on exit."""
    process = Process(config, options)
    try:
        rt = build_runtime(config, process)
        process.adopt(rt.config, rt.live, rt.backends, rt.router.budgets)
        await process.open()
        await process.background.follow(rt.config, rt.backends, rt.live)
        yield RuntimeRef(rt, process)
    finally:
        await process.close()


def build_runtime(config: GatewayConfig, process: Process) -> Runtime:
    """Wire every config-lifetime part of the request path over the process's long-lived ones.

    Builds only: nothing in force changes until `Process.adopt` and the swap.
    """
    opts = process.options
    specs = {b.name: b for b in config.backends}
    backends = {
        spec.name: process.adapters.kept(spec) or make_backend(spec, process.session)
        for spec in config.backends
    }
    tokenizer = process.tokenizer(config.tokenizer)
    auth = Authenticator(
        config,
        process.keys,
        anonymous_allowed=opts.anonymous_allowed,
        admin_key=opts.admin_key or resolve_secret(config.admin.api_key),
    )
    live = process.next_live(config)
    # The SLO budgets live as long as the process; this config sees them through its
    # classes' bounds, adopted with the swap (`Process.adopt`).
    budgets = process.slo_budgets.view(
        {n: Slo.from_spec(c) for n, c in config.slo_classes.items()},
        [m.name for m in config.models],
    )
    return Runtime(
        config=config,
        process=process,
        backends=backends,
        specs=specs,
        models={m.name: m for m in config.models},
        auth=auth,
        estimator=Estimator(tokenizer, process.counting),
        live=live,
        router=Router(config, backends, live, room=process.room, budgets=budgets),
        feedback=Feedback(live, process.metrics, process.reliability, process.room, budgets),
        meter=Meter(
            tokenizer,
            process.metrics,
            process.ledger,
            process.admission,
            live,
            divergence_threshold=config.ledger.divergence_threshold,
            counting=process.counting,
        ),
        settings=settings_from(config),
        deadline_ceiling_s=max((s.timeouts.total_s for s in config.backends), default=60.0),
    )


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
    process = ref.process
    new = build_runtime(config, process)
    await process.background.follow(new.config, new.backends, new.live)
    retired = process.adopt(new.config, new.live, new.backends, new.router.budgets)
    ref.current = new
    # Requests that started on the old runtime may still be using (or failing over to)
    # a retired adapter: close its pool once they have had their full time (or at exit).
    grace = max((b.timeouts.total_s for b in old.specs.values()), default=60.0) + 5.0
    for backend in retired:
        asyncio.get_running_loop().call_later(grace, backend.close)
    log.info(
        "reloaded %s: %d backends, %d models, %d tenants",
        source,
        len(config.backends),
        len(config.models),
        len(config.tenants),
    )
    return new


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


async def reload_from_file(ref: RuntimeRef) -> Runtime:
    """Read the policy file again and apply it; the running config stays if it is invalid."""
    path = ref.process.options.config_path
    if path is None:
        raise ConfigError("<embedded default>", [ConfigIssue("", None, "no policy file to reload")])
    number = ref.reload_started()
    try:
        config = await asyncio.to_thread(partial(load_config, path, require_env=True))
        config = bind_simulated(config, ref.process.options.simulated, path)
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
