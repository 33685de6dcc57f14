"""Token counting never holds the event loop: big prompts and stream recounts run on a bounded worker.

The gateway runs as its own process (`neogate serve`), in front of an upstream that is
also its own process (tests/integration/bulk_upstream.py), so the only event loop under
test is the gateway's: this process sends pre-built bytes and times `/healthz`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parents[2]
KEY = "ng-counting-test-key-0001"
_WORDS = "the of and to in is that it for on with as was at by this from are be or an "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    port: int
    pid: int
    log: Path


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert proc.poll() is None, "the process exited early"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


@contextlib.contextmanager
def _process(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    port_file = tmp_path / "upstream.port"
    up_cmd = [sys.executable, "-m", "tests.integration.bulk_upstream", str(port_file)]
    with _process(up_cmd, tmp_path / "upstream.log") as upstream:
        up_port = int(_wait_file(port_file, upstream))
        port = free_port()
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(
            f"""
listen: {{host: 127.0.0.1, port: {port}}}
backends:
  - name: bulk
    kind: openai_compatible
    base_url: http://127.0.0.1:{up_port}/v1
    models: {{m: bulk-model}}
    price: {{input_per_million: 0.1, output_per_million: 0.2}}
    timeouts: {{idle_s: 120, total_s: 600}}
models:
  - name: m
    backends: [bulk]
tenants:
  - name: t
    api_keys: [env:NEOGATE_TEST_KEY]
    limits: {{max_body_bytes: 8388608}}
ledger: {{kind: sqlite, path: {tmp_path}/ledger.db, spool_path: {tmp_path}/ledger.spool}}
tokenizer: {{source: bpe-openai}}
"""
        )
        cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg)]
        log = tmp_path / "gateway.log"
        with _process(cmd, log, {"NEOGATE_TEST_KEY": KEY}) as gw:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            async with aiohttp.ClientSession() as http:
                while True:
                    assert gw.poll() is None, log.read_text()[-3000:]
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(url + "/readyz") as r:
                            if r.status == 200:
                                break
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    await asyncio.sleep(0.05)
            yield Served(url, port, gw.pid, log)


async def _healthz_ms(http: aiohttp.ClientSession, url: str) -> float:
    t0 = time.perf_counter()
    async with http.get(url + "/healthz") as r:
        await r.read()
        assert r.status == 200
    return (time.perf_counter() - t0) * 1000


async def _probe(http: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> list[float]:
    """/healthz every 5 ms until `stop`: each answer's latency in ms."""
    out: list[float] = []
    while not stop.is_set():
        out.append(await _healthz_ms(http, url))
        await asyncio.sleep(0.005)
    return out


def _chat_body(content: str, *, stream: bool = False) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 8}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


async def test_a_4mb_prompt_does_not_delay_a_concurrent_healthz(served: Served) -> None:
    words = (_WORDS * (4_000_000 // len(_WORDS) + 1))[:4_000_000]
    big = _chat_body(words)  # built before the clock starts: the test's loop stays free
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http, aiohttp.ClientSession() as probe_http:
        for _ in range(20):  # warm the probe's connection
            await _healthz_ms(probe_http, served.url)
        worst: list[float] = []
        for _ in range(5):
            stop = asyncio.Event()
            probe = asyncio.create_task(_probe(probe_http, served.url, stop))
            try:
                await asyncio.sleep(0.05)
                async with http.post(
                    served.url + "/v1/chat/completions", data=io.BytesIO(big), headers=headers
                ) as r:
                    assert r.status == 200, await r.text()
                    answer = await r.json()
                await asyncio.sleep(0.05)
            finally:
                stop.set()
                latencies = await probe
            assert answer["choices"][0]["message"]["content"] == "ok"
            worst.append(max(latencies))
    # Each request's worst /healthz answer, in 3 of 5 rounds (a machine shared with other
    # work adds its own pauses now and then: at load 6-9 on 2 cores single rounds reached
    # 90-150 ms): counting on the loop took 0.3-3.5 s. What is left on the loop is the
    # 4 MB JSON parse itself (~12-20 ms).
    assert sorted(worst)[2] <= 50.0, worst


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# 100 streams that are never read: the meter keeps at most 256 KiB of text per stream
# and the relay's write buffer 256 KiB; with aiohttp's own buffers the stated bound
# is 3 MB per stream over the idle process.
STREAMS = 100
MB_PER_STREAM = 3.0


async def test_non_reading_streams_stay_bounded_and_healthz_answers_after_they_close(
    served: Served,
) -> None:
    body = _chat_body("Tell me everything.", stream=True)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    async with aiohttp.ClientSession() as http:
        for _ in range(20):
            await _healthz_ms(http, served.url)
        idle_rss = _rss_mb(served.pid)
        socks: list[socket.socket] = []
        try:
            for _ in range(STREAMS):
                s = socket.create_connection(("127.0.0.1", served.port))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                s.sendall(head + body)
                socks.append(s)  # never read
            # Let every stream fill its socket buffers and the gateway's write buffers.
            peak = idle_rss
            for _ in range(40):
                await asyncio.sleep(0.25)
                peak = max(peak, _rss_mb(served.pid))
            assert peak - idle_rss <= STREAMS * MB_PER_STREAM, (idle_rss, peak)
        finally:
            for s in socks:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
        # Every closed stream is metered now (its delivered text counted): the loop must
        # keep answering meanwhile.
        closed_at = time.monotonic()
        worst = 0.0
        while time.monotonic() - closed_at < 3.0:
            worst = max(worst, await _healthz_ms(http, served.url))
            await asyncio.sleep(0.01)
        assert worst <= 500.0, worst
