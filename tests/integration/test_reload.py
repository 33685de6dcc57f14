"""Reloading the policy: POST /admin/reload and SIGHUP apply a valid file atomically, keep
streams that are open, and refuse an invalid file with the reason, keeping the running one."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from openai import AsyncOpenAI

from gateway.runtime import RUNTIME
from tests.conftest import ADMIN_KEY, GatewayFactory
from tests.integration.faultkit import (
    MESSAGES,
    PROVIDER_MODEL,
    SimFactory,
    Upstream,
    policy,
)

ROOT = Path(__file__).resolve().parents[2]
SERVE = [sys.executable, "-m", "gateway.cli", "serve"]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _write(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)


async def _admin(s: aiohttp.ClientSession, url: str, method: str, path: str) -> Any:
    async with s.request(method, url + path, headers=ADMIN) as r:
        return r.status, await r.json()


async def test_admin_reload_keeps_open_streams_and_refuses_a_bad_file(
    gateway_factory: GatewayFactory, sims: SimFactory, tmp_path: Path
) -> None:
    # ~40 tokens/s: a 40-token stream stays open for about a second.
    a = await sims(time_scale=1.0, tokens_per_s=40.0, ttft_s_mean=0.01, ttft_s_jitter=0.0)
    b = await sims()
    first = policy(tmp_path, [Upstream("a", a.v1), Upstream("b", b.v1)])
    first["models"][0]["policy"] = {"kind": "pinned", "order": ["a", "b"]}
    path = tmp_path / "policy.yaml"
    _write(path, first)
    gw = await gateway_factory(first, config_path=str(path))
    ref = gw.app[RUNTIME]
    before = ref.current

    async with AsyncOpenAI(base_url=gw.v1, api_key="anonymous", max_retries=0) as oai:
        stream = await oai.chat.completions.create(
            model="m",
            messages=MESSAGES,
            max_tokens=40,
            stream=True,  # type: ignore[arg-type]
        )
        pieces = []
        async for chunk in stream:
            pieces.append(chunk)
            break  # the stream is open on `a`

        second = policy(tmp_path, [Upstream("a", a.v1), Upstream("b", b.v1)])
        second["models"][0]["policy"] = {"kind": "pinned", "order": ["b", "a"]}
        second["backends"][1]["price"] = {"input_per_million": 0.05, "output_per_million": 0.1}
        _write(path, second)
        async with aiohttp.ClientSession() as s:
            status, body = await _admin(s, gw.url, "POST", "/admin/reload")
            assert status == 200 and body["reloaded"] is True, body
            assert ref.current is not before

            # New requests follow the new file.
            reply = await oai.chat.completions.with_raw_response.create(
                model="m",
                messages=MESSAGES,
                max_tokens=3,  # type: ignore[arg-type]
            )
            assert reply.headers["x-neogate-backend"] == "b"

            # The stream that started before the reload finishes whole, on `a`.
            async for chunk in stream:
                pieces.append(chunk)
            # (An error event mid-stream would have raised in the SDK's iteration.)
            with_choices = [c for c in pieces if c.choices]
            assert with_choices[-1].choices[0].finish_reason == "length"
            tokens = [c for c in with_choices if c.choices[0].delta.content]
            assert len(tokens) >= 30, "all 40 tokens (give or take the role chunk) arrived"

            # What the old runtime counted up, the shared counters count down again.
            status, backends = await _admin(s, gw.url, "GET", "/admin/backends")
            assert status == 200
            assert {x["name"]: x["inflight"] for x in backends["backends"]} == {"a": 0, "b": 0}
            assert ref.process.reliability.gate.snapshot().inflight_total == 0
            # What lives as long as the process is the same after the reload.
            assert ref.current.process is before.process
            assert ref.current.meter.ledger is before.meter.ledger is not None
            assert ref.current.live.backends["a"] is before.live.backends["a"]

            # A file with a mistake is refused with the reason; the running config stays.
            broken = dict(second)
            broken["backends"] = [dict(second["backends"][0], colour="blue"), second["backends"][1]]
            _write(path, broken)
            running = ref.current
            status, body = await _admin(s, gw.url, "POST", "/admin/reload")
            assert status == 400, body
            assert body["error"]["code"] == "invalid_config"
            assert "colour" in body["error"]["message"]
            assert ref.current is running
            reply = await oai.chat.completions.with_raw_response.create(
                model="m",
                messages=MESSAGES,
                max_tokens=3,  # type: ignore[arg-type]
            )
            assert reply.headers["x-neogate-backend"] == "b"

            # Moving the ledger needs a restart: refused, with that reason.
            moved = dict(second, ledger=dict(second["ledger"], path=str(tmp_path / "other.db")))
            _write(path, moved)
            status, body = await _admin(s, gw.url, "POST", "/admin/reload")
            assert status == 400 and "restart" in body["error"]["message"], body


async def test_admin_reload_needs_the_admin_key(
    gateway_factory: GatewayFactory, sims: SimFactory, tmp_path: Path
) -> None:
    a = await sims()
    doc = policy(tmp_path, [Upstream("a", a.v1)])
    path = tmp_path / "policy.yaml"
    _write(path, doc)
    gw = await gateway_factory(doc, config_path=str(path))
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.url + "/admin/reload", headers={"Authorization": "Bearer nope"}) as r,
    ):
        assert r.status in (401, 403)
        assert "error" in await r.json()


@pytest.mark.slow
async def test_sighup_reloads_the_policy_file(sims: SimFactory, tmp_path: Path) -> None:
    a = await sims()
    doc = policy(tmp_path, [Upstream("a", a.v1)])
    doc["listen"] = {"host": "127.0.0.1", "port": 0}
    path = tmp_path / "policy.yaml"
    _write(path, doc)
    log = tmp_path / "serve.log"
    with socket_port() as port, log.open("wb") as out:
        proc = subprocess.Popen(
            [*SERVE, "--config", str(path), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "NEOGATE_SECRET": "reload-test-secret"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            await _until(lambda: _models(s, url), lambda ids: ids == ["m"], proc, log)
            renamed = dict(
                doc,
                backends=[dict(doc["backends"][0], models={"m2": PROVIDER_MODEL})],
                models=[dict(doc["models"][0], name="m2")],
            )
            _write(path, renamed)
            proc.send_signal(signal.SIGHUP)
            await _until(lambda: _models(s, url), lambda ids: ids == ["m2"], proc, log)

            bad = dict(renamed, models=[dict(renamed["models"][0], backends=["missing"])])
            _write(path, bad)
            proc.send_signal(signal.SIGHUP)
            await _until(
                lambda: asyncio.sleep(0, log.read_text()),
                lambda text: "reload refused" in text,
                proc,
                log,
            )
            assert await _models(s, url) == ["m2"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class socket_port:
    """A free loopback port (closed again before the gateway binds it)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        return None


async def _models(s: aiohttp.ClientSession, url: str) -> list[str] | None:
    try:
        async with s.get(url + "/v1/models") as r:
            if r.status != 200:
                return None
            return sorted(m["id"] for m in (await r.json())["data"])
    except aiohttp.ClientError:
        return None


async def _until(get: Any, ok: Any, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        value = await get()
        if ok(value):
            return
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, (value, log.read_text())
        await asyncio.sleep(0.1)
