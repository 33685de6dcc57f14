"""A database outage is logged once, with a count, not a traceback per retry.

The real gateway writes its ledger and reads its keys through a TCP proxy in front of
the real PostgreSQL; the proxy is taken down for a few seconds while requests go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.conftest import GatewayFactory
from tests.integration.faultkit import (
    SimFactory,
    Upstream,
    call,
    metric,
    metrics_text,
    policy,
)
from tests.integration.test_redis_limits import TcpProxy

pytestmark = pytest.mark.asyncio

PG = "postgresql://postgres@127.0.0.1:{port}/test"


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    conn = await asyncpg.connect(PG.format(port=5432))
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        await conn.close()


async def test_a_postgres_outage_is_logged_once_per_outage_with_a_count(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    schema: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    proxy = TcpProxy(5432)
    await proxy.up()
    sim = await sims()
    pol = policy(tmp_path, [Upstream("p", sim.v1)])
    pol["ledger"] = {
        "kind": "postgres",
        "dsn": PG.format(port=proxy.port),
        "schema_name": schema,
        "spool_path": str(tmp_path / "ledger.spool"),
    }
    try:
        gw = await gateway_factory(pol)
        async with aiohttp.ClientSession() as http:
            assert (await call(http, gw.url)).status == 200
            caplog.clear()
            await proxy.down()
            outage_end = time.monotonic() + 4.0  # 8 key refreshes, 2 ledger replays
            while time.monotonic() < outage_end:
                assert (await call(http, gw.url)).status == 200  # rows go to the spool
                await asyncio.sleep(0.5)
            await proxy.up()
            deadline = time.monotonic() + 15
            while metric(await metrics_text(http, gw.url), "neogate_ledger_spool_rows") != 0:
                assert time.monotonic() < deadline, "the spool was never replayed"
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # the key refresh's next success
    finally:
        await proxy.down()
    ours = [r for r in caplog.records if r.name.startswith(("neogate", "gateway"))]
    loud = [r for r in ours if r.levelno >= logging.WARNING]
    traces = [r for r in loud if r.exc_info]
    text = "\n".join(r.getMessage() for r in loud)
    # Each failing task logs the start of its streak and its recovery; not every retry.
    assert len(traces) <= 2, text
    assert len(loud) <= 8, text
    recovered = [r.getMessage() for r in loud if "recovered after" in r.getMessage()]
    assert any("key-refresh" in m for m in recovered), text
    assert any("ledger database" in m for m in recovered), text
