"""Idle GPU time is its own line, carried by the operator or split pro rata (ledger.idle_cost)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.metering.ledger import LedgerRow, LedgerWriter
from gateway.metering.ledger.gpu_uptime import record_uptime
from gateway.metering.ledger.idle import OPERATOR, split_idle
from gateway.metering.ledger.sqlite import SqliteLedger
from gateway.metering.money import UnitPrices
from gateway.metering.uptime import UptimeRow
from gateway.metering.usage import Usage
from tests.integration.test_ledger_sqlite import usage_cli


def test_split_idle_by_hand() -> None:
    # $3.60/h held 2 h = $7.20; attributed: a $1.20, b $0.60 -> idle $5.40.
    attributed = {"a": 1_200_000_000, "b": 600_000_000}
    [op] = split_idle("gpu-a", 2.0, 3.6, attributed, "operator")
    assert (op.tenant, op.held_nusd, op.attributed_nusd, op.idle_nusd) == (
        OPERATOR, 7_200_000_000, 1_800_000_000, 5_400_000_000
    )  # fmt: skip
    # Pro rata to attributed cost: a 5.40 x 1.2 / 1.8 = 3.60, b 5.40 x 0.6 / 1.8 = 1.80.
    shares = {line.tenant: line.idle_nusd for line in split_idle(
        "gpu-a", 2.0, 3.6, attributed, "pro_rata")}  # fmt: skip
    assert shares == {"a": 3_600_000_000, "b": 1_800_000_000}
    # Nothing attributed: nobody to split onto, the operator carries it.
    [alone] = split_idle("gpu-a", 1.0, 3.6, {}, "pro_rata")
    assert alone.tenant == OPERATOR and alone.idle_nusd == 3_600_000_000
    # $0.000001/h for 1 h = 1000 nano-USD held, 3 attributed: 997 idle in thirds sums exactly,
    # the rounding left to the largest payer (a tie: the first by name).
    thirds = split_idle("gpu-a", 1.0, 1e-6, {"x": 1, "y": 1, "z": 1}, "pro_rata")
    assert [t.idle_nusd for t in thirds] == [333, 332, 332]


def row(rid: str, tenant: str, backend: str, cost_usd: str, local: bool = True) -> LedgerRow:
    # 1M output tokens at `cost_usd` per M: a row costing exactly `cost_usd`.
    return LedgerRow.from_usage(
        request_id=rid,
        attempt=0,
        ts=1_750_000_000.0,  # 2025-06-15
        tenant=tenant,
        model="llama-8b",
        backend=backend,
        backend_model="m",
        usage=Usage(0, 1_000_000, source="reported"),
        prices=UnitPrices.of("0", cost_usd, "0", version="1/gpu@b8"),
        ttft_s=0.1,
        total_s=1.0,
        stream=False,
        outcome="ok",
        batch_size=8 if local else None,
        is_local=local,
    )


@pytest.mark.parametrize("policy", ["operator", "pro_rata"])
async def test_usage_idle_shows_idle_gpu_time_as_its_own_lines(tmp_path: Path, policy: str) -> None:
    db = tmp_path / "ledger.db"
    writer = LedgerWriter(SqliteLedger(db))
    await writer.start()
    for r in (row("1", "a", "gpu-a", "0.60"), row("2", "b", "gpu-a", "0.20"),
              row("3", "a", "groq", "9.00", local=False)):  # fmt: skip
        await writer.record(r)
    await writer.close()
    config = tmp_path / "policy.yaml"
    config.write_text(
        f"""
backends:
  - name: gpu-a
    kind: vllm
    base_url: http://127.0.0.1:9/v1
    models: {{llama-8b: m}}
    gpu: {{price_per_hour: 0.1}}
  - name: groq
    kind: groq
    base_url: http://127.0.0.1:9/v1
    models: {{llama-8b: m}}
    price: {{input_per_million: 0.05, output_per_million: 0.08}}
models:
  - name: llama-8b
    backends: [gpu-a, groq]
ledger: {{kind: sqlite, path: {db}, idle_cost: {policy}}}
""",
        encoding="utf-8",
    )
    code, out = await asyncio.to_thread(
        usage_cli, "--config", str(config), "--idle", "--since", "2025-06-15",
        "--until", "2025-06-15", "--format", "json",
    )  # fmt: skip
    assert code == 0, out
    lines = json.loads(out)
    # Held one UTC day at $0.10/h = $2.40; attributed $0.80 (the provider's row is not GPU
    # time); idle $1.60: the operator's, or a $1.20 and b $0.40 pro rata.
    for line in lines:
        assert (line["backend"], line["hours"], line["held_usd"], line["attributed_usd"]) == (
            "gpu-a", 24.0, 2.4, 0.8
        )  # fmt: skip
    got = {line["tenant"]: line["idle_usd"] for line in lines}
    if policy == "operator":
        assert got == {"(operator)": pytest.approx(1.6)}
    else:
        assert got == {"a": pytest.approx(1.2), "b": pytest.approx(0.4)}
    code, _ = await asyncio.to_thread(usage_cli, "--ledger", str(db), "--idle")
    assert code == 1  # without a config there are no GPU prices to hold against


async def test_an_on_demand_gpu_is_held_for_its_observed_uptime(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    writer = LedgerWriter(SqliteLedger(db))
    await writer.start()
    for r in (row("1", "a", "gpu-a", "0.60"), row("2", "b", "gpu-d", "0.05")):
        await writer.record(r)
    await writer.close()
    config = tmp_path / "policy.yaml"
    config.write_text(
        f"""
backends:
  - name: gpu-a
    kind: vllm
    base_url: http://127.0.0.1:9/v1
    models: {{llama-8b: m}}
    gpu: {{price_per_hour: 0.1, mode: on_demand}}
  - name: gpu-d
    kind: vllm
    base_url: http://127.0.0.1:9/v1
    models: {{llama-8b: m}}
    gpu: {{price_per_hour: 0.1, mode: on_demand}}
models:
  - name: llama-8b
    backends: [gpu-a, gpu-d]
ledger: {{kind: sqlite, path: {db}}}
""",
        encoding="utf-8",
    )
    # gpu-a was seen up 6 h of 2025-06-15 by two processes (4 h each, 2 h of it together);
    # nobody saw gpu-d up that day.
    day = 1_749_945_600.0  # 2025-06-15 00:00 UTC
    store = SqliteLedger(db)
    try:
        await record_uptime(store, "p1", [UptimeRow("gpu-a", day, day + 4 * 3600)])
        await record_uptime(store, "p2", [UptimeRow("gpu-a", day + 2 * 3600, day + 6 * 3600)])
    finally:
        await store.close()
    code, out = await asyncio.to_thread(
        usage_cli, "--config", str(config), "--idle", "--since", "2025-06-15",
        "--until", "2025-06-15", "--format", "json",
    )  # fmt: skip
    assert code == 0, out
    by = {line["backend"]: line for line in json.loads(out)}
    # 6 h at $0.10/h = $0.60 held, all of it attributed to a's request: no idle time.
    a = by["gpu-a"]
    assert (a["hours"], a["hours_from"], a["held_usd"], a["idle_usd"]) == (6.0, "uptime", 0.6, 0.0)
    # Nothing observed: held and idle unknown, said so; what was attributed still shows.
    d = by["gpu-d"]
    assert (d["hours"], d["hours_from"], d["held_usd"], d["idle_usd"]) == (
        None, "no uptime observed", None, None
    )  # fmt: skip
    assert d["attributed_usd"] == pytest.approx(0.05)
