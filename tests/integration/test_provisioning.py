"""Provisioning truth per local GPU (issue 13 item 3): the numbers by hand on a real SQLite ledger,
`neogate usage --pricing`, `/admin/backends` and the Prometheus gauges on the real app."""

from __future__ import annotations

import argparse
import asyncio
import calendar
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway.cli.usage import add_usage_parser, run_usage
from gateway.config import parse_config
from gateway.metering.ledger.gpu_uptime import record_uptime
from gateway.metering.ledger.postgres import PostgresLedger
from gateway.metering.ledger.provisioning import gpu_terms, provisioning
from gateway.metering.ledger.rows import LedgerRow, LedgerStore
from gateway.metering.ledger.sqlite import SqliteLedger
from gateway.metering.ledger.writer import LedgerWriter
from gateway.metering.money import UnitPrices
from gateway.metering.uptime import UptimeRow
from gateway.metering.usage import Usage
from tests.conftest import ADMIN_KEY, GatewayFactory, Upstreams, base_policy
from tests.integration.test_ledger_postgres import DSN

DAY = calendar.timegm((2025, 6, 15, 0, 0, 0))

POLICY = """
backends:
  - name: h100
    kind: vllm
    base_url: http://127.0.0.1:9/v1
    models: {llama-8b: meta-llama/Llama-3.1-8B-Instruct}
    gpu: {price_per_hour: 3.60, mode: reserved, profile: llama-3.1-8b-h100}
  - name: idle-h100
    kind: vllm
    base_url: http://127.0.0.1:9/v1
    models: {llama-8b: meta-llama/Llama-3.1-8B-Instruct}
    gpu: {price_per_hour: 3.60, mode: on_demand, profile: llama-3.1-8b-h100}
  - name: groq
    kind: groq
    base_url: http://127.0.0.1:9/v1
    models: {llama-8b: llama-3.1-8b-instant}
    price: {input_per_million: 0.05, output_per_million: 0.08}
models:
  - name: llama-8b
    backends: [h100, idle-h100, groq]
"""

GROQ = UnitPrices.of("0.05", "0.08", version="groq@1")
# (request, ts, backend, prompt, completion, batch, total_s, counterfactual)
ROWS = [
    ("r1", DAY + 100, "h100", 1000, 1000, 4, 10.0, True),
    ("r2", DAY + 200, "h100", 3000, 1000, 8, 30.0, True),
    ("r3", DAY + 300, "groq", 500, 500, None, 2.0, False),
    ("r4", DAY + 7200, "h100", 9999, 9999, 9, 5.0, True),  # outside the first hour
]


async def write_rows(db: Path | LedgerStore) -> None:
    writer = LedgerWriter(SqliteLedger(db) if isinstance(db, Path) else db)
    await writer.start()
    for rid, ts, backend, p, c, batch, total, cf in ROWS:
        local = batch is not None
        prices = UnitPrices.of("0.10", "0.10", version="gpu") if local else GROQ
        await writer.record(
            LedgerRow.from_usage(
                request_id=rid,
                attempt=1,
                ts=ts,
                tenant="acme",
                model="llama-8b",
                backend=backend,
                backend_model="m",
                usage=Usage(p, c),
                prices=prices,
                ttft_s=0.1,
                total_s=total,
                stream=True,
                outcome="ok",
                batch_size=batch,
                is_local=local,
                counterfactual=("groq", GROQ) if cf else None,
            )
        )
    await writer.close()


async def test_provisioning_by_hand(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await write_rows(db)
    store = SqliteLedger(db, create=False)
    try:
        await check_provisioning(store)
    finally:
        await store.close()


async def test_provisioning_on_postgres() -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    await write_rows(PostgresLedger(DSN, schema=schema))
    store = PostgresLedger(DSN, schema=schema, create=False)
    try:
        await check_provisioning(store)
    finally:
        await store.close()
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()


async def check_provisioning(store: LedgerStore) -> None:
    """The same numbers, derived by hand, on every store."""
    terms = gpu_terms(parse_config(POLICY))
    # b*: the NIM H100 curve is flat at 13,348 tokens/s past 200; 256 / 13,348 = 19 ms <= 50.
    assert terms["h100"].slo_batch == 256
    rows = {
        r.backend: r
        for r in await provisioning(store, terms, since=DAY, until=DAY + 3600, now=DAY + 9000)
    }
    h = rows["h100"]
    assert h.hours_held == 1.0 and h.gpu_cost_usd == pytest.approx(3.60)
    assert (h.requests, h.prompt_tokens, h.completion_tokens) == (2, 4000, 2000)
    assert h.mean_batch == pytest.approx((1000 * 4 + 1000 * 8) / 2000)  # 6
    assert h.mean_concurrency == pytest.approx(40 / 3600)
    assert h.utilisation == pytest.approx(40 / 3600 / 256)
    # Attributed: both rows at $0.10/M in and out.
    assert h.attributed_usd == pytest.approx(6000 * 0.10e-6)
    assert h.attributed_usd_per_m == pytest.approx(0.10)
    # Counterfactual at Groq: 1000 x 0.05 + 1000 x 0.08 + 3000 x 0.05 + 1000 x 0.08 = 360 u$.
    assert h.counterfactual_usd == pytest.approx(360e-6)
    assert h.counterfactual_usd_per_m == pytest.approx(360 / 6000)
    assert h.counterfactual_coverage == 1.0
    assert h.held_usd_per_m == pytest.approx(3.60 / 6000 * 1e6)  # $600/M
    assert h.net_saving_usd == pytest.approx(360e-6 - 3.60)
    # $0.001 per second / $0.06 per million tokens.
    assert h.break_even_tokens_per_s == pytest.approx(0.001 / 60e-9)
    assert h.advice == (
        "at mean batch 6 h100 costs $600.00/M against $0.06/M external; it pays above "
        "16.7k tokens/s (served 1.7/s), lost $3.60 over the window"
    )
    assert (h.hours_from, h.observed_up_hours) == ("window", None)  # reserved: the window
    # An on_demand GPU with no traffic and no uptime observed: its hours held are unknown,
    # not 0 and not the window; the list price stands in for the counterfactual.
    idle = rows["idle-h100"]
    assert idle.requests == 0 and idle.mode == "on_demand"
    assert (idle.hours_held, idle.hours_from, idle.gpu_cost_usd) == (
        None,
        "no uptime observed",
        None,
    )
    assert idle.mean_batch is None and idle.held_usd_per_m is None
    assert idle.counterfactual_usd_per_m == pytest.approx((0.05 + 0.08) / 2)
    assert idle.net_saving_usd is None
    assert idle.break_even_tokens_per_s == pytest.approx(0.001 / 65e-9)  # needs no hours
    assert idle.advice.startswith(
        "idle-h100 (on_demand): no uptime observed in the window's 1.0 h, so the hours it was "
        "held are unknown; it pays above 15.4k tokens/s"
    )
    assert "groq" not in rows

    # Two gateway processes watched idle-h100: their intervals overlap and start before the
    # window; one more lies outside it. Union clipped to [DAY, DAY + 3600): 1800 s.
    await record_uptime(store, "p1", [UptimeRow("idle-h100", DAY - 600, DAY + 900)])
    await record_uptime(
        store,
        "p2",
        [UptimeRow("idle-h100", DAY + 600, DAY + 1800), UptimeRow("h100", DAY, DAY + 60)],
    )
    await record_uptime(store, "p2", [UptimeRow("idle-h100", DAY + 5000, DAY + 6000)])
    # The open row extended in place: the same key, a later end (the upsert).
    await record_uptime(store, "p1", [UptimeRow("idle-h100", DAY - 600, DAY + 1200)])
    rows = {
        r.backend: r
        for r in await provisioning(store, terms, since=DAY, until=DAY + 3600, now=DAY + 9000)
    }
    idle = rows["idle-h100"]
    assert (idle.hours_held, idle.hours_from) == (0.5, "uptime")
    assert idle.observed_up_hours == 0.5
    assert idle.gpu_cost_usd == pytest.approx(1.80)
    assert idle.net_saving_usd == pytest.approx(-1.80)
    assert idle.advice.startswith(
        "idle-h100 served nothing in 0.5 h ($1.80 held) (on_demand: up 0.50 h of the window's "
        "1.00 h, observed); it pays above 15.4k tokens/s (served 0/s), lost $1.80"
    )
    # A reserved GPU is held the window whatever was observed; the observation is shown.
    h = rows["h100"]
    assert (h.hours_held, h.hours_from) == (1.0, "window")
    assert h.observed_up_hours == pytest.approx(60 / 3600)
    assert h.gpu_cost_usd == pytest.approx(3.60)
    # Had h100 been on_demand, it was held the 60 s it was seen up: $0.06. Its rates are per
    # second held: 6,000 tokens in 60 s, 40 s of requests in flight over 60 s.
    terms = gpu_terms(parse_config(POLICY.replace("mode: reserved", "mode: on_demand")))
    [h] = [
        r
        for r in await provisioning(store, terms, since=DAY, until=DAY + 3600, now=DAY + 9000)
        if r.backend == "h100"
    ]
    assert (h.hours_held, h.hours_from) == (pytest.approx(60 / 3600), "uptime")
    assert h.gpu_cost_usd == pytest.approx(0.06)
    assert h.tokens_per_s == pytest.approx(100.0)
    assert h.mean_concurrency == pytest.approx(40 / 60)
    assert h.held_usd_per_m == pytest.approx(0.06 / 6000 * 1e6)  # $10/M
    assert h.net_saving_usd == pytest.approx(360e-6 - 0.06)
    assert h.advice == (
        "at mean batch 6 h100 costs $10.00/M against $0.06/M external (on_demand: up 0.02 h of "
        "the window's 1.00 h, observed); it pays above 16.7k tokens/s (served 100/s), "
        "lost $0.06 over the window"
    )


def usage_cli(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_usage_parser(parser.add_subparsers(dest="command"))
    out = io.StringIO()
    return run_usage(parser.parse_args(["usage", *argv]), out), out.getvalue()


async def test_usage_pricing_shows_the_provisioning_truth(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await write_rows(db)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    span = ("--since", "2025-06-15", "--until", "2025-06-15")  # one whole UTC day
    code, out = await asyncio.to_thread(
        usage_cli, "--config", str(policy), "--ledger", str(db), "--pricing", *span
    )
    assert code == 0
    assert "break_even_tokens_per_s" in out
    # 24 h held at $3.60: $86.40 over 3 requests' 25,998 tokens on h100, mean batch
    # (4 x 1000 + 8 x 1000 + 9 x 9999) / 11,999 = 8.49996.
    assert "at mean batch 8 h100 costs $3323.33/M against $0.06/M external" in out
    assert "lost $86.40 over the window" in out
    # The on_demand GPU: nothing observed, and the table says where hours held come from.
    assert "idle-h100 (on_demand): no uptime observed in the window's 24.0 h" in out
    assert "on_demand GPUs the uptime the gateway's scrapes of the worker observed" in out
    code, out = await asyncio.to_thread(
        usage_cli, "--config", str(policy), "--ledger", str(db), "--pricing", "--format", "json"
    )
    data = json.loads(out)
    assert {r["backend"] for r in data["provisioning"]} == {"h100", "idle-h100"}
    assert {r["backend"] for r in data["pricing"]} == {"h100", "groq"}
    # Without a policy file neogate does not know what the GPUs cost: it says so.
    code, out = await asyncio.to_thread(usage_cli, "--ledger", str(db), "--pricing")
    assert code == 0 and "pass --config" in out


async def get_json(url: str, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r,
    ):
        return r.status, await r.json()


async def test_admin_backends_and_gauges_on_the_real_app(
    upstreams: Upstreams, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    policy = base_policy(upstreams, tmp_path)
    # Two rows on gpu-a in the last hour, written before the gateway starts.
    now = time.time()
    writer = LedgerWriter(SqliteLedger(Path(policy["ledger"]["path"])))
    await writer.start()
    for i, (p, c, batch) in enumerate(((1000, 500, 2), (2000, 500, 4))):
        await writer.record(
            LedgerRow.from_usage(
                request_id=f"q{i}",
                attempt=1,
                ts=now - 60,
                tenant="t",
                model="llama-3.1-8b",
                backend="gpu-a",
                backend_model="m",
                usage=Usage(p, c),
                prices=UnitPrices.of("0.10", "0.10", version="gpu"),
                ttft_s=0.1,
                total_s=3.0,
                stream=True,
                outcome="ok",
                batch_size=batch,
                is_local=True,
                counterfactual=("sim-groq", GROQ),
            )
        )
    await writer.close()
    gw = await gateway_factory(policy)
    price = next(b for b in policy["backends"] if b["name"] == "gpu-a")["gpu"]["price_per_hour"]
    status, body = await get_json(gw.url, "/admin/backends?window=600")
    assert status == 200
    by = {b["name"]: b for b in body["backends"]}
    a = by["gpu-a"]["provisioning"]
    assert a["hours_held"] == pytest.approx(600 / 3600)
    assert a["gpu_cost_usd"] == pytest.approx(price / 6)
    assert (a["prompt_tokens"], a["completion_tokens"]) == (3000, 1000)
    assert a["mean_batch"] == pytest.approx(3.0)
    cf = (3000 * 0.05 + 1000 * 0.08) / 1e6
    assert a["counterfactual_usd"] == pytest.approx(cf)
    assert a["net_saving_usd"] == pytest.approx(cf - price / 6)
    assert by["gpu-b"]["provisioning"]["requests"] == 0
    assert by["sim-groq"]["provisioning"] is None
    for bad in ("abc", "0", "-5", "nan"):
        status, err = await get_json(gw.url, f"/admin/backends?window={bad}")
        assert status == 400 and err["error"]["param"] == "window", bad
    # The background refresh sets the gauges at start (window: the last hour).
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline:
        async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
            text = await r.text()
        if 'neogate_gpu_tokens{backend="gpu-a"}' in text:
            break
        await asyncio.sleep(0.05)
    assert 'neogate_gpu_tokens{backend="gpu-a"} 4000.0' in text
    assert 'neogate_gpu_hours_held{backend="gpu-b"} 1.0' in text
    line = next(
        x for x in text.splitlines() if x.startswith('neogate_gpu_net_saving_usd{backend="gpu-a"}')
    )
    assert float(line.split()[-1]) == pytest.approx(cf * 1 - price, rel=1e-6)
