"""The load generator against a real loopback server speaking the OpenAI chat wire format."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from loadtest.loadgen import LoadConfig, UrlError, parse_target, prepare, run_load
from loadtest.loadgen_cli import add_loadtest_parser, config_from_args, run_loadtest
from loadtest.results import load_results, save_results, summarize
from loadtest.schedule import constant_schedule, parse_distribution, parse_schedule
from loadtest.usage_api import parse_usage, usage_delta


@dataclass
class Served:
    """What the test server saw."""

    keys: list[str] = field(default_factory=list)
    bodies: list[dict[str, object]] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0
    cost: float = 0.0
    tokens: int = 0


SERVED = web.AppKey("served", Served)
DELAY = web.AppKey("delay", float)


async def _chat(request: web.Request) -> web.StreamResponse:
    served = request.app[SERVED]
    body = orjson.loads(await request.read())
    served.keys.append(request.headers.get("Authorization", ""))
    served.bodies.append(body)
    served.inflight += 1
    served.max_inflight = max(served.max_inflight, served.inflight)
    try:
        await asyncio.sleep(request.app[DELAY])
        model = body["model"]
        n_out = int(body["max_tokens"])
        n_in = len(body["messages"][0]["content"].split())
        backend = "gpu-a" if len(served.bodies) % 2 else "sim-groq"
        headers = {"x-neogate-backend": backend}
        if model == "err429":
            err = {"error": {"message": "slow down", "type": "rate_limit_error", "code": None}}
            return web.Response(status=429, body=orjson.dumps(err), headers=headers)
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        served.tokens += n_in + n_out
        served.cost += (n_in + n_out) * 1e-6
        if not body.get("stream"):
            msg = {"role": "assistant", "content": " hi" * n_out}
            obj = {
                "id": "x",
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
                "usage": usage,
            }
            return web.Response(
                body=orjson.dumps(obj), content_type="application/json", headers=headers
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
        await resp.prepare(request)

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            c = {
                "id": "x",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                "usage": None,
            }
            return b"data: " + orjson.dumps(c) + b"\n\n"

        await resp.write(chunk({"role": "assistant", "content": ""}))
        for i in range(n_out):
            await asyncio.sleep(0.002)
            await resp.write(chunk({"content": " hi"}))
            if model == "cut" and i == 1:
                return resp  # the stream breaks: no usage, no [DONE]
        await resp.write(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            u = {"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": usage}
            await resp.write(b"data: " + orjson.dumps(u) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp
    finally:
        served.inflight -= 1


async def _usage(request: web.Request) -> web.Response:
    s = request.app[SERVED]
    if request.query.get("report") == "pricing":
        sheet = [
            {
                "backend": "gpu-a",
                "batch": "5-8",
                "requests": 3,
                "prompt_tokens": 60,
                "completion_tokens": 15,
                "effective_usd_per_m": 0.6,
                "charged_out_usd_per_m": 0.5,
                "list_out_usd_per_m": None,
            },
            {
                "backend": "sim-groq",
                "batch": "-",
                "requests": 2,
                "prompt_tokens": 40,
                "completion_tokens": 10,
                "effective_usd_per_m": 0.06,
                "charged_out_usd_per_m": 0.08,
                "list_out_usd_per_m": 0.08,
            },
        ]
        return web.json_response({"object": "pricing_sheet", "data": sheet})
    rows = [
        {"backend": "all", "cost_usd": s.cost, "prompt_tokens": s.tokens, "completion_tokens": 0}
    ]
    return web.json_response({"data": rows})


@dataclass
class Server:
    url: str
    served: Served


async def _start(delay: float) -> tuple[web.AppRunner, Server]:
    app = web.Application()
    app[SERVED] = Served()
    app[DELAY] = delay
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/usage", _usage)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, Server(f"http://127.0.0.1:{port}", app[SERVED])


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    runner, srv = await _start(0.02)
    yield srv
    await runner.cleanup()


@pytest.fixture
async def fast_server() -> AsyncIterator[Server]:
    runner, srv = await _start(0.0)
    yield srv
    await runner.cleanup()


def _cfg(url: str, **kw: object) -> LoadConfig:
    base: dict[str, object] = {
        "url": url,
        "schedule": constant_schedule(4, 1.0),
        "model": "m",
        "max_tokens": parse_distribution("const:5"),
        "prompt_tokens": parse_distribution("const:20"),
    }
    base.update(kw)
    return LoadConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("client", ["raw", "aiohttp"])
async def test_closed_loop_holds_concurrency_and_records_everything(
    server: Server, client: str
) -> None:
    cfg = _cfg(
        server.url,
        schedule=constant_schedule(4, 0.6),
        stream_ratio=0.5,
        keys=("k-one", "k-two"),
        client=client,
    )
    out = await run_load(cfg)
    recs = out.records
    assert len(recs) == len(server.served.bodies) > 20
    assert server.served.max_inflight == 4
    assert all(r.ok for r in recs), {r.error for r in recs}
    streamed = [r for r in recs if r.stream]
    plain = [r for r in recs if not r.stream]
    assert streamed and plain
    for r in streamed:
        assert r.events == 7  # role chunk, 5 content chunks, finish chunk; not the usage one
        assert r.completion_tokens == 5 and r.prompt_tokens == 20
        assert r.ttft is not None and 0.015 < r.ttft < r.latency
        assert r.itl is not None and 0.0015 < r.itl < 0.2
    for r in plain:
        assert r.completion_tokens == 5 and r.ttft is None and r.latency >= 0.02
    assert {r.backend for r in recs} == {"gpu-a", "sim-groq"}
    assert {r.tenant for r in recs} == {"t0", "t1"}
    assert set(server.served.keys) == {"Bearer k-one", "Bearer k-two"}
    # The last request starts before the time bound and every one ends after it started.
    assert max(r.start for r in recs) < 0.6
    assert all(r.end > r.start for r in recs)
    assert out.meta["tenants"] == {"t0": "…", "t1": "…"}
    # The server's usage endpoint reported what this run added.
    total = usage_delta(out.meta["usage_before"], out.meta["usage_after"])["*"]
    assert total.cost_usd == pytest.approx(sum(25e-6 for _ in recs))


async def test_request_count_bound_and_body_mix(server: Server) -> None:
    cfg = _cfg(
        server.url,
        max_requests=37,
        schedule=constant_schedule(4, 20.0),
        stream_ratio=0.3,
        prompt_tokens=parse_distribution("uniform:5-50"),
        max_tokens=parse_distribution("uniform:1-4"),
        body_pool=64,
        seed=3,
    )
    t0 = time.perf_counter()
    out = await run_load(cfg, usage=False)
    assert time.perf_counter() - t0 < 10.0  # the count bound stopped the 20 s run early
    assert len(out.records) == 37 == len(server.served.bodies)
    sizes = {len(b["messages"][0]["content"].split()) for b in server.served.bodies}  # type: ignore[index]
    assert len(sizes) > 10 and min(sizes) >= 5 and max(sizes) <= 50
    streams = [b["stream"] for b in server.served.bodies]
    assert 0 < sum(streams) < 37
    for b in server.served.bodies:
        assert ("stream_options" in b) == b["stream"]
    assert "usage_before" not in out.meta


async def test_open_loop_rate_and_no_coordinated_omission(fast_server: Server) -> None:
    cfg = _cfg(fast_server.url, mode="open", schedule=constant_schedule(300, 1.0), seed=9)
    out = await run_load(cfg, usage=False)
    n = len(out.records)
    assert 230 < n < 370  # Poisson around 300
    starts = [r.start for r in out.records]
    # Latency counts from the scheduled arrival, which the seed fixes.
    import random

    from loadtest.schedule import poisson_arrivals

    expected = list(poisson_arrivals(constant_schedule(300, 1.0), random.Random(10)))
    # Exactly the scheduled arrival, or the send time when the loop's timer fired early
    # (timers are coarse: uvloop's have 1 ms resolution).
    assert all(-0.002 < s - e <= 1e-9 for s, e in zip(starts, expected, strict=False))
    assert sum(1 for s, e in zip(starts, expected, strict=False) if abs(s - e) < 1e-9) > n / 2
    assert all(r.ok for r in out.records)


async def test_open_loop_latency_includes_waiting_for_the_client(server: Server) -> None:
    # One connection and 20 ms per request cannot keep up with 200/s: requests queue in the
    # client, and their latency must show it instead of hiding it.
    cfg = _cfg(server.url, mode="open", schedule=constant_schedule(200, 0.3), max_connections=1)
    out = await run_load(cfg, usage=False)
    lat = sorted(r.latency for r in out.records)
    assert server.served.max_inflight == 1
    assert lat[-1] > 0.2
    assert summarize(out.records).e2e is not None


async def test_errors_are_typed(server: Server) -> None:
    out = await run_load(_cfg(server.url, model="err429", max_requests=6), usage=False)
    assert {r.error for r in out.records} == {"http_429:rate_limit_error"}
    assert {r.status for r in out.records} == {429}
    cut = await run_load(
        _cfg(server.url, model="cut", max_requests=4, stream_ratio=1.0), usage=False
    )
    assert {r.error for r in cut.records} == {"stream_incomplete"}
    assert all(r.events == 3 and r.ttft is not None for r in cut.records)
    refused = await run_load(_cfg("http://127.0.0.1:9", max_requests=3), usage=False)
    assert {r.error for r in refused.records} == {"connect_error"}
    s = summarize(cut.records + out.records)
    assert s.errors == {"http_429:rate_limit_error": 6, "stream_incomplete": 4}


async def test_schedule_steps_change_concurrency(server: Server) -> None:
    cfg = _cfg(server.url, schedule=parse_schedule("1:0.25s,6:0.25s,burst:8,1:0.25s"))
    out = await run_load(cfg, usage=False)

    # Requests in flight at each moment, measured from the records themselves.
    def inflight(t: float) -> int:
        return sum(1 for r in out.records if r.start <= t < r.end)

    assert max(inflight(t / 100) for t in range(5, 23)) == 1
    assert max(inflight(t / 100) for t in range(30, 48)) == 6
    # The burst: eight requests sent at the same instant, around the half-second mark.
    starts = Counter(r.start for r in out.records)
    (burst_at, n), *_ = starts.most_common(1)
    assert n == 8 and 0.5 <= burst_at < 0.6
    assert server.served.max_inflight >= 9  # the burst on top of the one remaining worker


def test_only_loopback_unless_allowed() -> None:
    assert parse_target("http://127.0.0.1:8080").path == "/v1/chat/completions"
    assert parse_target("http://localhost:8080/v1").path == "/v1/chat/completions"
    assert parse_target("http://[::1]:8080/v1/chat/completions").origin == "http://[::1]:8080"
    for url in ("http://10.0.0.1:8080", "https://api.openai.com/v1", "http://example.com"):
        with pytest.raises(UrlError):
            parse_target(url)
    assert parse_target("https://api.example.com/v1", allow_remote=True).port == 443


async def test_results_round_trip_jsonl_and_csv(server: Server, tmp_path: Path) -> None:
    out = await run_load(_cfg(server.url, max_requests=12, stream_ratio=0.5), usage=False)
    for name in ("r.jsonl", "r.csv"):
        path = tmp_path / name
        save_results(path, out.meta, out.records)
        back = load_results(path)
        assert back.records == out.records
        assert back.meta["url"] == out.meta["url"]
        assert back.meta["machine"]["cpus"] == out.meta["machine"]["cpus"]


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The CLI runs its own event loop, so the server runs in a thread with its own loop.
    import threading

    ready = threading.Event()
    holder: dict[str, object] = {}
    loop = asyncio.new_event_loop()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        runner, srv = loop.run_until_complete(_start(0.0))
        holder["runner"], holder["srv"] = runner, srv
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    th = threading.Thread(target=serve)
    th.start()
    try:
        assert ready.wait(5)
        srv = holder["srv"]
        assert isinstance(srv, Server)
        parser = argparse.ArgumentParser()
        add_loadtest_parser(parser.add_subparsers(dest="cmd"))
        out_file = tmp_path / "run.jsonl"
        args = parser.parse_args(
            [
                "loadtest",
                "--url",
                srv.url,
                "--model",
                "m",
                "--schedule",
                "2:0.3s,4:0.3s",
                "--stream-ratio",
                "0.5",
                "--keys",
                "a,b,c",
                "--no-progress",
                "--out",
                str(out_file),
                "--max-tokens",
                "uniform:1-3",
            ]
        )
        assert run_loadtest(args) == 0
        text = capsys.readouterr().out
        assert "req/s" in text and "TTFT" in text and "cost" in text
        res = load_results(out_file)
        assert res.records and res.meta["schedule"] == "2:0.3s,4:0.3s"
        assert {r.tenant for r in res.records} == {"t0", "t1", "t2"}
        bad = parser.parse_args(["loadtest", "--url", "http://192.168.1.1", "--no-progress"])
        assert run_loadtest(bad) == 2
    finally:
        loop.call_soon_threadsafe(loop.stop)
        th.join(10)


def test_cli_config_rules() -> None:
    parser = argparse.ArgumentParser()
    add_loadtest_parser(parser.add_subparsers(dest="cmd"))
    cfg = config_from_args(
        parser.parse_args(
            ["loadtest", "--url", "http://127.0.0.1:1", "--rate", "50", "--duration", "3"]
        )
    )
    assert cfg.mode == "open" and cfg.schedule == constant_schedule(50, 3)
    cfg = config_from_args(
        parser.parse_args(
            [
                "loadtest",
                "--url",
                "http://127.0.0.1:1",
                "--schedule",
                "1:10s,32:20s",
                "--duration",
                "15",
            ]
        )
    )
    assert cfg.mode == "closed" and cfg.time_bound == 15
    cfg = config_from_args(
        parser.parse_args(["loadtest", "--url", "http://127.0.0.1:1", "--requests", "100"])
    )
    assert cfg.max_requests == 100 and cfg.time_bound == 600


def test_body_pool_is_seeded() -> None:
    cfg = _cfg("http://127.0.0.1:1", stream_ratio=0.5, body_pool=32, seed=4)
    assert prepare(cfg) == prepare(cfg)
    assert prepare(cfg) != prepare(_cfg("http://127.0.0.1:1", stream_ratio=0.5, body_pool=32))


def test_usage_parser_is_tolerant() -> None:
    assert parse_usage({"total_cost_usd": 1.5, "prompt_tokens": 10})["*"].cost_usd == 1.5
    rows = {"by_backend": {"a": {"cost": "0.5", "output_tokens": 4}, "b": {"cost": 1.0}}}
    got = parse_usage(rows)
    assert got["a"].completion_tokens == 4 and got["*"].cost_usd == 1.5
    assert parse_usage("not json") == {} and parse_usage({"hello": 1}) == {}


POLICY = """
backends:
  - name: gpu-a
    kind: vllm
    base_url: http://127.0.0.1:1/v1
    models: {m: m}
    gpu: {price_per_hour: 2.95}
  - name: sim-groq
    kind: groq
    base_url: http://127.0.0.1:2/v1
    models: {m: m}
    price: {input_per_million: 0.05, output_per_million: 0.08}
models:
  - name: m
    backends: [gpu-a, sim-groq]
"""


async def test_report_writes_markdown_and_pngs(server: Server, tmp_path: Path) -> None:
    from loadtest.report import add_report_parser
    from loadtest.report_cost import cost_curves, pricing_sheet_from_config

    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    pricing = pricing_sheet_from_config(policy)
    curves = cost_curves(pricing)
    # H100 at 2.95 $/h with the Llama-8B profile: 215 tok/s at batch 1 -> ~3.81 $/M.
    assert curves["gpu-a"][0] == (1, pytest.approx(2.95 / 3600 / 215 * 1e6))
    assert curves["gpu-a"][-1][1] < curves["gpu-a"][0][1] / 20
    assert {c for _, c in curves["sim-groq"]} == {0.08}

    out = await run_load(_cfg(server.url, max_requests=40, stream_ratio=0.5))
    out.meta["pricing"] = pricing
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    save_results(a, out.meta, out.records)
    plain = await run_load(_cfg(server.url, max_requests=10), usage=False)
    for r in plain.records:
        r.backend = None
    save_results(b, plain.meta, plain.records)

    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="cmd"))
    from loadtest.report import run_report

    rep = tmp_path / "rep"
    assert run_report(parser.parse_args(["report", str(a), str(b), "--out", str(rep)])) == 0
    md = (rep / "report.md").read_text()
    for png in ("latency_cdf.png", "throughput.png", "backend_share.png", "cost_vs_batch.png"):
        data = (rep / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"({png})" in md
    assert "| gpu-a | 3.811 |" in md
    assert "| gpu-a | 5-8 | 3 | 60 | 15 | 0.6000 | 0.5000 | - |" in md
    assert "| a | 40 | 40 |" in md and "| b | 10 | 10 |" in md

    # Without pricing and without backend headers the report says what it left out.
    rep2 = tmp_path / "rep2"
    assert run_report(parser.parse_args(["report", str(b), "--out", str(rep2)])) == 0
    md2 = (rep2 / "report.md").read_text()
    assert "cost-per-batch plot is omitted" in md2 and "no backend" in md2.lower()
    assert not (rep2 / "backend_share.png").exists() and not (rep2 / "cost_vs_batch.png").exists()
    assert run_report(parser.parse_args(["report", str(tmp_path / "missing.jsonl")])) == 2


async def _dribble_server(payloads: list[bytes]) -> tuple[asyncio.Server, int]:
    """A raw HTTP server answering the n-th request with payloads[n], a few bytes per write."""
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                data = payloads[count % len(payloads)]
                count += 1
                for i in range(0, len(data), 5):
                    writer.write(data[i : i + 5])
                    await writer.drain()
                    await asyncio.sleep(0)
                closing = b"Connection: close" in data or b"X-Then-Close" in data
                if closing or (b"Content-Length" not in data and b"chunked" not in data):
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


def _chunked(body: bytes, sizes: int = 7) -> bytes:
    out = b""
    for i in range(0, len(body), sizes):
        part = body[i : i + sizes]
        out += b"%x\r\n%s\r\n" % (len(part), part)
    return out + b"0\r\n\r\n"


async def test_raw_client_frames_responses_split_into_small_pieces() -> None:
    usage = b'{"usage":{"prompt_tokens":3,"completion_tokens":2}}'
    sse = (
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
        b": keep-alive comment\n\n"
        b'data: {"choices":[{"delta":{"content":"b"}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )
    payloads = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Neogate-Backend: b1\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(usage), usage),
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n" + _chunked(sse),
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + _chunked(b'{"error":{"message":"x","type":"overloaded","code":null}}'),
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + usage,
        # Closed by the server after the response without saying so: the next request must
        # not fail on the dead keep-alive connection.
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Then-Close: 1\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(usage), usage),
    ]
    srv, port = await _dribble_server(payloads)
    try:
        cfg = _cfg(
            f"http://127.0.0.1:{port}",
            max_requests=10,
            schedule=constant_schedule(1, 5),
            client="raw",
        )
        out = await run_load(cfg, usage=False)
    finally:
        srv.close()
        await srv.wait_closed()
    recs = out.records
    assert len(recs) == 10
    assert recs[4].ok and recs[9].ok and recs[5].ok
    for i in (0, 5):
        assert recs[i].ok and recs[i].completion_tokens == 2 and recs[i].backend == "b1"
    for i in (1, 6):
        assert recs[i].ok and recs[i].events == 2 and recs[i].completion_tokens == 2
        assert recs[i].ttft is not None
    for i in (2, 7):
        assert recs[i].error == "http_503:overloaded" and recs[i].status == 503
    for i in (3, 8):
        assert recs[i].ok and recs[i].completion_tokens == 2 and recs[i].backend is None
