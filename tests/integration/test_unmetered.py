"""Every attempt that consumed tokens has a ledger row: answers that broke mid-body are the operator's cost."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import GatewayFactory
from tests.integration.faultkit import SimFactory, Upstream, call, policy

pytestmark = pytest.mark.asyncio

NO_EJECTION = {"breaker_consecutive_failures": 1000, "breaker_failure_rate": 1.0}


def ledger_rows(path: Path, rid: str) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        cur = db.execute("SELECT * FROM ledger WHERE request_id = ? ORDER BY attempt", (rid,))
        return [dict(r) for r in cur.fetchall()]


@pytest.mark.parametrize("fault", ["cut", "stall", "malformed"])
async def test_an_answer_broken_mid_body_has_an_operator_row_beside_the_one_served(
    sims: SimFactory, gateway_factory: GatewayFactory, tmp_path: Path, fault: str
) -> None:
    bad, good = await sims(), await sims()
    await bad.control(fault=fault, delay_s=5.0)
    gw = await gateway_factory(
        policy(
            tmp_path,
            [Upstream("bad", bad.v1, timeouts={"total_s": 0.5}), Upstream("good", good.v1)],
            reliability=NO_EJECTION,
        )
    )
    async with aiohttp.ClientSession() as session:
        r = await call(session, gw.url)
    assert r.status == 200 and r.headers["x-neogate-backend"] == "good"
    rows = ledger_rows(tmp_path / "ledger.db", r.headers["x-request-id"])
    assert [(x["attempt"], x["backend"]) for x in rows] == [(0, "bad"), (1, "good")]
    broken, served = rows
    # The backend read the prompt and wrote an answer nobody received: the operator pays.
    assert broken["tenant"] == "(operator)" and broken["outcome"] == "upstream_cut"
    assert broken["prompt_tokens"] > 0 and broken["cost_nusd"] > 0
    assert served["tenant"] != "(operator)" and served["outcome"] == "ok"


async def test_an_answer_broken_on_the_only_backend_still_has_its_row(
    sims: SimFactory, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    bad = await sims()
    await bad.control(fault="cut")
    reliability = {**NO_EJECTION, "max_attempts": 1}
    gw = await gateway_factory(policy(tmp_path, [Upstream("bad", bad.v1)], reliability=reliability))
    async with aiohttp.ClientSession() as session:
        r = await call(session, gw.url)
    assert r.status == 502
    rows = ledger_rows(tmp_path / "ledger.db", r.headers["x-request-id"])
    assert [(x["attempt"], x["tenant"], x["outcome"]) for x in rows] == [
        (0, "(operator)", "upstream_cut")
    ]
