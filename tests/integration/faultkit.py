"""Helpers of the fault-injection, security and fuzz suites: simulated providers on demand, small policies, raw calls."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from loadtest.sim.common import start_site
from loadtest.sim.provider import ProviderOptions, create_provider_app

MODEL = "m"
PROVIDER_MODEL = "llama-3.1-8b-instant"
MESSAGES = [{"role": "user", "content": "Say something about batching."}]


@dataclass
class Sim:
    """One running simulated provider."""

    root: str  # http://127.0.0.1:port
    runner: web.AppRunner

    @property
    def v1(self) -> str:
        return self.root + "/v1"

    async def control(self, **body: Any) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.post(self.root + "/sim/control", json=body) as r:
            assert r.status == 200, await r.text()
            out: dict[str, Any] = await r.json()
            return out

    async def stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(self.root + "/sim/stats") as r:
            out: dict[str, Any] = await r.json()
            return out

    async def total(self) -> int:
        return int((await self.stats())["total"])


SimFactory = Callable[..., Awaitable[Sim]]


@asynccontextmanager
async def sim_factory() -> AsyncIterator[SimFactory]:
    """Start simulated providers (fast by default); all stop when the block ends."""
    runners: list[web.AppRunner] = []

    async def start(**opts: Any) -> Sim:
        opts.setdefault("time_scale", 0.01)
        runner, port = await start_site(create_provider_app(ProviderOptions(**opts)))
        runners.append(runner)
        return Sim(f"http://127.0.0.1:{port}", runner)

    try:
        yield start
    finally:
        for r in reversed(runners):
            await r.cleanup()


@dataclass
class Upstream:
    """One backend entry of a test policy."""

    name: str
    url: str
    model_id: str = PROVIDER_MODEL
    timeouts: dict[str, float] = field(default_factory=dict)
    max_concurrency: int | None = None
    api_key: str | None = None


def policy(
    tmp_path: Path,
    upstreams: Sequence[Upstream],
    *,
    reliability: dict[str, Any] | None = None,
    pinned: bool = True,
    **top: Any,
) -> dict[str, Any]:
    """A policy with one public model `m` served by `upstreams`, tried in the given order."""
    backends = []
    for u in upstreams:
        b: dict[str, Any] = {
            "name": u.name,
            "kind": "openai_compatible",
            "base_url": u.url,
            "models": {MODEL: u.model_id},
            "price": {"input_per_million": 0.1, "output_per_million": 0.2},
        }
        if u.timeouts:
            b["timeouts"] = u.timeouts
        if u.max_concurrency is not None:
            b["max_concurrency"] = u.max_concurrency
        if u.api_key is not None:
            b["api_key"] = u.api_key
        backends.append(b)
    names = [u.name for u in upstreams]
    model: dict[str, Any] = {"name": MODEL, "backends": names}
    if pinned:
        model["policy"] = {"kind": "pinned", "order": names}
    out: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "auth": {"allow_anonymous_on_loopback": True},
        "backends": backends,
        "models": [model],
        "ledger": {
            "kind": "sqlite",
            "path": str(tmp_path / "ledger.db"),
            "spool_path": str(tmp_path / "ledger.spool"),
        },
        "tokenizer": {"source": "bpe-openai"},
    }
    if reliability:
        out["reliability"] = reliability
    out.update(top)
    return out


@dataclass
class Reply:
    """A raw answer from the gateway."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.body)

    @property
    def events(self) -> list[bytes]:
        """SSE event blocks (without the blank-line terminator)."""
        return [e for e in self.body.split(b"\n\n") if e]

    @property
    def done(self) -> bool:
        return b"data: [DONE]" in self.events


async def call(
    session: aiohttp.ClientSession,
    base: str,
    *,
    stream: bool = False,
    max_tokens: int = 8,
    headers: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
    path: str = "/v1/chat/completions",
    timeout_s: float = 20.0,
) -> Reply:
    """POST one request and read the whole answer."""
    payload = body or {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "stream": stream,
    }
    async with session.post(
        base + path,
        json=payload,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as r:
        raw = await r.read()
        return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, raw)


async def metrics_text(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(base + "/metrics") as r:
        return await r.text()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None when absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        m = re.match(r"^([^{ ]+)(\{(.*)\})? (\S+)$", line)
        if m is None or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return None


def is_openai_error(body: bytes) -> bool:
    """`{"error": {"message", "type", "param", "code"}}` with a string message and type."""
    import json

    try:
        obj = json.loads(body)
    except ValueError:
        return False
    err = obj.get("error") if isinstance(obj, dict) else None
    return (
        isinstance(err, dict)
        and isinstance(err.get("message"), str)
        and isinstance(err.get("type"), str)
        and {"message", "type", "param", "code"} <= set(err)
    )
