"""An upstream that answers with recorded wire samples byte for byte (tests/fixtures/wire/).

Each backend model id is given a `Script`: the status, headers and body (or SSE events)
a real backend sent, as copied into the fixtures. The replay adds nothing of its own, so
the gateway meets exactly the shape the fixture records.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from loadtest.sim.common import start_site

WIRE = Path(__file__).resolve().parents[1] / "fixtures" / "wire"


def wire_bytes(name: str) -> bytes:
    """A fixture file's bytes."""
    return (WIRE / name).read_bytes()


def sse_events(name: str) -> list[bytes]:
    """The `data:` event blocks of an .sse fixture, without their blank-line terminators."""
    return [b for b in wire_bytes(name).split(b"\n\n") if b.strip()]


def header_lines(name: str) -> dict[str, str]:
    """`Name: value` lines of a headers fixture (comment lines skipped), names as written."""
    out: dict[str, str] = {}
    for line in wire_bytes(name).decode().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


@dataclass
class Script:
    """One recorded answer: a whole body, or SSE events (optionally cut before the end)."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    events: list[bytes] | None = None


@dataclass
class Replay:
    """A running replay upstream and the request bodies it received."""

    v1: str
    received: list[dict[str, Any]]


@asynccontextmanager
async def replay(
    scripts: Mapping[str, Script], metrics: list[str] | None = None
) -> AsyncIterator[Replay]:
    """Serve `scripts` (by backend model id) on a loopback port until the block ends.

    `metrics` are the `/metrics` texts of successive scrapes (the last one repeats).
    """
    received: list[dict[str, Any]] = []
    scrapes = list(metrics or [])

    async def serve_metrics(request: web.Request) -> web.Response:
        del request
        if not scrapes:
            return web.Response(status=404)
        text = scrapes.pop(0) if len(scrapes) > 1 else scrapes[0]
        return web.Response(text=text, content_type="text/plain")

    async def answer(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        received.append(body)
        script = scripts[body["model"]]
        if script.events is None:
            headers = {"Content-Type": "application/json", **script.headers}
            return web.Response(status=script.status, body=script.body or b"", headers=headers)
        resp = web.StreamResponse(
            status=script.status, headers={"Content-Type": "text/event-stream", **script.headers}
        )
        await resp.prepare(request)
        for event in script.events:
            await resp.write(event + b"\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    app.router.add_get("/metrics", serve_metrics)
    runner, port = await start_site(app)
    try:
        yield Replay(f"http://127.0.0.1:{port}/v1", received)
    finally:
        await runner.cleanup()


def one_backend_policy(
    tmp_path: Path, kind: str, url: str, model_id: str, **backend: Any
) -> dict[str, Any]:
    """A policy with public model `m` served by one backend of `kind` at `url`."""
    spec: dict[str, Any] = {
        "name": "b",
        "kind": kind,
        "base_url": url,
        "models": {"m": model_id},
        "price": {"input_per_million": 0.1, "output_per_million": 0.2},
        **backend,
    }
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "auth": {"allow_anonymous_on_loopback": True},
        "backends": [spec],
        "models": [{"name": "m", "backends": ["b"]}],
        "ledger": {
            "kind": "sqlite",
            "path": str(tmp_path / "ledger.db"),
            "spool_path": str(tmp_path / "ledger.spool"),
        },
        "tokenizer": {"source": "bpe-openai"},
    }
