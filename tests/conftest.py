"""Shared fixtures: simulated upstreams and the real gateway app on real loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from gateway.config import GatewayConfig, parse_config
from gateway.http.app import AppOptions, create_app
from gateway.http.edge_site import open_site
from loadtest.sim.common import start_site
from loadtest.sim.provider import ProviderOptions, create_provider_app
from loadtest.sim.worker import WorkerOptions, create_worker_app

ADMIN_KEY = "ng-admin-test-key-0123456789"
SECRET = "test-server-secret"


@dataclass
class Gateway:
    """A running gateway: its base URL, config and the app (for its runtime)."""

    url: str
    config: GatewayConfig
    app: web.Application
    runner: web.AppRunner

    @property
    def v1(self) -> str:
        return self.url + "/v1"


Upstreams = dict[str, str]


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    """Two fast simulated GPU workers and one simulated provider: name -> base URL (/v1)."""
    runners: list[web.AppRunner] = []
    urls: Upstreams = {}
    for name, seed in (("gpu-a", 1), ("gpu-b", 2)):
        runner, port = await start_site(
            create_worker_app(WorkerOptions(seed=seed, time_scale=0.01))
        )
        runners.append(runner)
        urls[name] = f"http://127.0.0.1:{port}/v1"
    runner, port = await start_site(
        create_provider_app(ProviderOptions(time_scale=0.01, ttft_s_mean=0.2))
    )
    runners.append(runner)
    urls["provider"] = f"http://127.0.0.1:{port}/v1"
    try:
        yield urls
    finally:
        for r in runners:
            await r.cleanup()


def base_policy(urls: Upstreams, tmp_path: Path) -> dict[str, Any]:
    """The embedded default's shape pointed at the test upstreams, with its ledger in tmp_path."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "policies" / "examples" / "default.yaml").read_text()
    data: dict[str, Any] = yaml.safe_load(text)
    by_backend = {"gpu-a": urls["gpu-a"], "gpu-b": urls["gpu-b"], "sim-groq": urls["provider"]}
    for backend in data["backends"]:
        backend["base_url"] = by_backend[backend["name"]]
    data["ledger"] = {
        "kind": "sqlite",
        "path": str(tmp_path / "ledger.db"),
        "spool_path": str(tmp_path / "ledger.spool"),
    }
    data["tokenizer"] = {"source": "bpe-openai"}
    return data


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateway_factory() -> AsyncIterator[GatewayFactory]:
    """Start gateways from policy dicts; all are stopped at the end of the test."""
    started: list[web.AppRunner] = []

    async def start(policy: dict[str, Any], *, anonymous: bool = True, **opts: Any) -> Gateway:
        config = parse_config(yaml.safe_dump(policy), source="<test>")
        app = create_app(
            config,
            AppOptions(
                anonymous_allowed=anonymous,
                admin_key=opts.pop("admin_key", ADMIN_KEY),
                server_secret=SECRET,
                **opts,
            ),
        )
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = await open_site(runner, "127.0.0.1", 0, fast_edge=config.listen.fast_edge)
        started.append(runner)
        port = site.port
        return Gateway(f"http://127.0.0.1:{port}", config, app, runner)

    yield start
    for runner in reversed(started):
        await runner.cleanup()


@pytest.fixture
async def gateway(upstreams: Upstreams, gateway_factory: GatewayFactory, tmp_path: Path) -> Gateway:
    """The default-shaped gateway over the simulated upstreams, keyless on loopback."""
    return await gateway_factory(base_policy(upstreams, tmp_path))
