"""SIGKILL under load: every response a client received in full has exactly one ledger row after a restart.

The gateway runs as its own process (`neogate serve --config`), pointed at simulated
backends served by this test process. Clients (the OpenAI SDK) drive mixed streamed
and whole requests; the gateway is killed with SIGKILL mid-load, restarted on the
same ledger, and the ledger is compared with what the clients received.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import random
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
import yaml
from openai import AsyncOpenAI

from tests.integration.test_metering_e2e import (
    ADMIN_KEY,
    MSG,
    SECRET,
    e2e_policy,
    sqlite_rows,
    start_sims,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

NEOGATE = str(Path(sys.executable).with_name("neogate"))
# The HTTP library under the SDK (httpx, or its fork httpx2 in recent SDKs): a stream cut by
# the kill surfaces as its transport error.
SDK_HTTP = importlib.import_module(
    openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0]
)
MODELS = ("local-8b", "slow-8b", "groq-8b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """What the clients saw: ids of answers received in full, and how many were sent."""

    complete: list[str] = field(default_factory=list)
    sent: int = 0
    broken: int = 0


class GatewayProcess:
    """`neogate serve --config` as a child process."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    async def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "NEOGATE_ADMIN_KEY": ADMIN_KEY, "NEOGATE_SECRET": SECRET}
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                NEOGATE, "serve", "--config", str(self.config), "--port", str(port),
                stdout=log, stderr=log, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as s:
            while True:
                assert self.proc.returncode is None, self.log.read_text()[-2000:]
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(self.url + "/readyz") as r:
                        if r.status == 200:
                            return
                assert time.monotonic() < deadline, self.log.read_text()[-2000:]
                await asyncio.sleep(0.05)

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert await self.proc.wait() == -signal.SIGKILL

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@pytest_asyncio.fixture(loop_scope="module")
async def sims() -> AsyncIterator[dict[str, str]]:
    urls, runners = await start_sims(provider_time_scale=0.1)
    try:
        yield urls
    finally:
        for r in runners:
            await r.cleanup()


async def one_request(oai: AsyncOpenAI, rng: random.Random, served: Served) -> None:
    """One request; its id is recorded only if the whole answer arrived."""
    model = rng.choice(MODELS)
    max_tokens = rng.randint(4, 24)
    served.sent += 1
    if rng.random() < 0.5:
        raw = await oai.chat.completions.with_raw_response.create(
            model=model, messages=MSG, max_tokens=max_tokens
        )
        reply = raw.parse()  # a 200 with a body that parses: received in full
        assert reply.choices
        served.complete.append(raw.headers["x-request-id"])
        return
    async with oai.chat.completions.with_streaming_response.create(
        model=model,
        messages=MSG,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": rng.random() < 0.5},
    ) as resp:
        rid = resp.headers["x-request-id"]
        lines = [line async for line in resp.iter_lines()]
    if "data: [DONE]" in lines:
        served.complete.append(rid)


async def client_loop(url: str, seed: int, served: Served, stop: asyncio.Event) -> None:
    rng = random.Random(seed)
    async with AsyncOpenAI(base_url=url + "/v1", api_key="anonymous", max_retries=0) as oai:
        while not stop.is_set():
            try:
                await one_request(oai, rng, served)
            except (openai.APIError, SDK_HTTP.HTTPError):
                served.broken += 1  # the gateway died under this request
                if stop.is_set():
                    return
                await asyncio.sleep(0.01)


async def test_sigkill_under_load_loses_no_completed_row(
    sims: dict[str, str], tmp_path: Path
) -> None:
    policy: dict[str, Any] = e2e_policy(sims, tmp_path / "data")
    policy["auth"] = {"allow_anonymous_on_loopback": True}
    config = tmp_path / "policy.yaml"
    config.write_text(yaml.safe_dump(policy))
    ledger = tmp_path / "data" / "ledger.db"
    gw = GatewayProcess(config, tmp_path / "gateway.log")
    await gw.start()
    try:
        served = Served()
        stop = asyncio.Event()
        clients = [
            asyncio.create_task(client_loop(gw.url, seed, served, stop)) for seed in range(16)
        ]
        # Let load build up, then kill the gateway in the middle of it.
        deadline = time.monotonic() + 10
        while len(served.complete) < 150 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await gw.kill9()
        stop.set()
        await asyncio.gather(*clients)
        complete = set(served.complete)
        assert len(complete) == len(served.complete) >= 100
        assert served.broken > 0, "the kill must land while requests are in flight"

        await gw.start()  # same config, same ledger (and spool)
        rows = await asyncio.to_thread(sqlite_rows, ledger)
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["request_id"]] = counts.get(row["request_id"], 0) + 1
        missing = sorted(complete - set(counts))
        assert not missing, f"{len(missing)} answers received in full have no row: {missing[:5]}"
        duplicates = {rid: n for rid, n in counts.items() if n > 1}
        assert not duplicates
        # Rows beyond the completed answers are requests cut by the kill after their row
        # was committed; there cannot be more rows than requests sent.
        assert len(counts) <= served.sent
        for row in rows:
            assert row["cost_nusd"] > 0 and row["prompt_tokens"] > 0

        # The restarted gateway keeps writing to the same ledger.
        async with AsyncOpenAI(base_url=gw.url + "/v1", api_key="anonymous", max_retries=0) as oai:
            raw = await oai.chat.completions.with_raw_response.create(
                model="groq-8b", messages=MSG, max_tokens=3
            )
        after = await asyncio.to_thread(
            sqlite_rows, ledger, "request_id = ?", [raw.headers["x-request-id"]]
        )
        assert len(after) == 1 and after[0]["outcome"] == "ok"
    finally:
        await gw.stop()


async def test_sigkill_with_rows_in_the_spool_replays_them_once_on_restart(
    sims: dict[str, str], tmp_path: Path
) -> None:
    policy: dict[str, Any] = e2e_policy(sims, tmp_path / "data")
    policy["auth"] = {"allow_anonymous_on_loopback": True}
    config = tmp_path / "policy.yaml"
    config.write_text(yaml.safe_dump(policy))
    ledger = tmp_path / "data" / "ledger.db"
    gw = GatewayProcess(config, tmp_path / "gateway.log")
    await gw.start()
    locker = sqlite3.connect(ledger, isolation_level=None)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        served = Served()
        rng = random.Random(7)
        locker.execute("BEGIN EXCLUSIVE")  # the database is down for the gateway
        async with AsyncOpenAI(base_url=gw.url + "/v1", api_key="anonymous", max_retries=0) as oai:
            await asyncio.gather(*(one_request(oai, rng, served) for _ in range(6)))
        assert len(served.complete) == 6, "answers do not wait for the database"
        async with (
            aiohttp.ClientSession() as s,
            s.get(gw.url + "/admin/ledger", headers=admin) as r,
        ):
            stats = await r.json()
        assert stats["db_up"] is False and stats["spool_rows"] == 6
        await gw.kill9()
        locker.execute("ROLLBACK")

        await gw.start()  # replays the spool before it serves
        rows = await asyncio.to_thread(sqlite_rows, ledger)
        assert sorted(r["request_id"] for r in rows) == sorted(served.complete)
        async with (
            aiohttp.ClientSession() as s,
            s.get(gw.url + "/admin/ledger", headers=admin) as r,
        ):
            stats = await r.json()
        assert stats["db_up"] is True and stats["spool_rows"] == 0
        assert stats["rows_replayed"] == 6
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()
        await gw.stop()
