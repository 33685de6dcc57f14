"""Keys and the usage API end to end: admin keys API, `neogate keys`, /v1/usage, `neogate usage`."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
import yaml
from openai import AsyncOpenAI

from policies.costmodel import GpuModel
from policies.spec import GpuSpec
from tests.integration.test_metering_e2e import (
    ADMIN_KEY,
    GPU,
    MSG,
    PG_DSN,
    SECRET,
    drop_schema,
    e2e_policy,
    new_rid,
    sqlite_rows,
    start_gateway,
    start_sims,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

NEOGATE = str(Path(sys.executable).with_name("neogate"))
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class Env:
    url: str
    ledger: Path
    keys: dict[str, str]

    def client(self, key: str) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)


async def http(
    method: str, url: str, *, key: str | None = None, json_body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url, headers=headers, json=json_body) as r,
    ):
        return r.status, await r.json(content_type=None)


async def neogate(*args: str) -> tuple[int, str, str]:
    """Run the `neogate` command line (the installed entry point) with the test's server secret."""
    proc = await asyncio.create_subprocess_exec(
        NEOGATE,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NEOGATE_SECRET": SECRET},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    data = tmp_path_factory.mktemp("usage")
    urls, sims = await start_sims()
    policy = e2e_policy(urls, data)
    policy["tenants"] = [{"name": "alpha"}, {"name": "beta"}]
    runner, url = await start_gateway(policy, anonymous=False)
    try:
        keys = {}
        for tenant in ("alpha", "beta"):
            status, body = await http(
                "POST", url + "/admin/keys", key=ADMIN_KEY, json_body={"tenant": tenant}
            )
            assert status == 201, body
            keys[tenant] = body["key"]
        e = Env(url, data / "ledger.db", keys)
        # Traffic to report on: alpha on a local GPU (whole and streamed) and the provider,
        # beta on the provider.
        async with e.client(keys["alpha"]) as oai:
            await oai.chat.completions.create(model="local-8b", messages=MSG, max_tokens=8)
            stream = await oai.chat.completions.create(
                model="local-8b", messages=MSG, max_tokens=6, stream=True
            )
            _ = [c async for c in stream]
            await oai.chat.completions.create(model="groq-8b", messages=MSG, max_tokens=5)
        async with e.client(keys["beta"]) as oai:
            await oai.chat.completions.create(model="groq-8b", messages=MSG, max_tokens=7)
        yield e
    finally:
        await runner.cleanup()
        for r in sims:
            await r.cleanup()


def ledger_totals(path: Path, tenant: str) -> dict[str, int]:
    rows = sqlite_rows(path, "tenant = ?", [tenant])
    return {
        "requests": len({r["request_id"] for r in rows}),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "completion_tokens": sum(r["completion_tokens"] for r in rows),
        "cost_nusd": sum(r["cost_nusd"] for r in rows),
    }


def summed(data: list[dict[str, Any]]) -> dict[str, int]:
    keys = ("requests", "prompt_tokens", "completion_tokens", "cost_nusd")
    return {k: sum(int(d[k]) for d in data) for k in keys}


# --- /v1/usage ------------------------------------------------------------------------------


async def test_tenant_sees_only_its_own_usage(env: Env) -> None:
    status, body = await http("GET", env.url + "/v1/usage", key=env.keys["alpha"])
    assert status == 200, body
    assert body["tenant"] == "alpha"
    data = body["data"]
    assert data and {d["tenant"] for d in data} == {"alpha"}
    assert {d["backend"] for d in data} == {"gpu-a", "sim-groq"}
    assert {d["model"] for d in data} == {"local-8b", "groq-8b"}
    assert all(set(d) >= {"day", "model", "backend", "tenant"} for d in data)
    assert summed(data) == ledger_totals(env.ledger, "alpha")
    # Asking for another tenant's usage does not widen a tenant's view.
    status, body = await http(
        "GET", env.url + "/v1/usage?tenant=beta&by=tenant", key=env.keys["alpha"]
    )
    assert status == 200 and [d["tenant"] for d in body["data"]] == ["alpha"]


async def test_admin_sees_all_and_groups(env: Env) -> None:
    status, body = await http("GET", env.url + "/v1/usage?by=tenant", key=ADMIN_KEY)
    assert status == 200, body
    by_tenant = {d["tenant"]: d for d in body["data"]}
    assert {"alpha", "beta"} <= set(by_tenant)
    for tenant in ("alpha", "beta"):
        assert summed([by_tenant[tenant]]) == ledger_totals(env.ledger, tenant)
    status, body = await http("GET", env.url + "/v1/usage?by=model&tenant=beta", key=ADMIN_KEY)
    assert status == 200
    assert [(d["model"], d["requests"]) for d in body["data"]] == [("groq-8b", 1)]
    assert all("tenant" not in d and "backend" not in d for d in body["data"])
    status, body = await http("GET", env.url + "/v1/usage?by=backend,day", key=ADMIN_KEY)
    assert status == 200
    assert {d["backend"] for d in body["data"]} >= {"gpu-a", "sim-groq"}
    assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", d["day"]) for d in body["data"])
    status, body = await http("GET", env.url + "/v1/usage?by=colour", key=ADMIN_KEY)
    assert status == 400 and body["error"]["param"] == "by"
    status, body = await http("GET", env.url + "/v1/usage")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


async def test_pricing_sheet(env: Env) -> None:
    status, body = await http("GET", env.url + "/v1/usage?report=pricing", key=env.keys["alpha"])
    assert status == 200, body
    sheet = {(r["backend"], r["batch"]): r for r in body["data"]}
    alpha_rows = sqlite_rows(env.ledger, "tenant = ?", ["alpha"])
    groq = sheet[("sim-groq", "-")]
    assert groq["is_local"] is False
    assert groq["list_in_usd_per_m"] == pytest.approx(0.05)
    assert groq["list_out_usd_per_m"] == pytest.approx(0.08)
    groq_rows = [r for r in alpha_rows if r["backend"] == "sim-groq"]
    tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in groq_rows)
    cost = sum(r["cost_nusd"] for r in groq_rows) / 1e9
    assert groq["effective_usd_per_m"] == pytest.approx(cost * 1e6 / tokens)
    # The local GPU: paid per batch bucket actually observed, never $0, beside its price.
    local = [r for (backend, _), r in sheet.items() if backend == "gpu-a"]
    assert local and all(r["is_local"] for r in local)
    assert sum(r["requests"] for r in local) == 2
    batches = {r["batch_size"] for r in alpha_rows if r["backend"] == "gpu-a"}
    assert {r["batch"] for r in local} == {"1" if b == 1 else "2-4" for b in batches}
    gpu = GpuModel.from_spec(GpuSpec(**GPU))
    for r in local:
        assert r["effective_usd_per_m"] > 0 and r["list_out_usd_per_m"] > 0
        if r["batch"] == "1":
            at_one = gpu.cost_per_output_token(1) * 1e6
            assert r["charged_out_usd_per_m"] == pytest.approx(at_one, rel=1e-6)
    # The admin's sheet covers beta's provider traffic too.
    status, body = await http("GET", env.url + "/v1/usage?report=pricing", key=ADMIN_KEY)
    assert status == 200
    admin_groq = next(r for r in body["data"] if r["backend"] == "sim-groq")
    assert admin_groq["requests"] == groq["requests"] + 1


async def test_usage_cli_reads_the_gateway_ledger(env: Env) -> None:
    ledger = str(env.ledger)
    (rc_j, out_j, err_j), (rc_c, out_c, _), (rc_t, out_t, _) = await asyncio.gather(
        neogate("usage", "--ledger", ledger, "--by", "tenant", "--format", "json"),
        neogate("usage", "--ledger", ledger, "--by", "tenant", "--format", "csv"),
        neogate("usage", "--ledger", ledger, "--by", "tenant,model", "--format", "table"),
    )
    assert (rc_j, rc_c, rc_t) == (0, 0, 0), err_j
    status, body = await http("GET", env.url + "/v1/usage?by=tenant", key=ADMIN_KEY)
    assert status == 200
    assert json.loads(out_j) == body["data"]
    table = list(csv.DictReader(io.StringIO(out_c)))
    assert [r["tenant"] for r in table] == [d["tenant"] for d in body["data"]]
    assert [int(r["requests"]) for r in table] == [d["requests"] for d in body["data"]]
    lines = out_t.splitlines()
    assert lines[0].split()[:3] == ["tenant", "model", "requests"]
    total = next(line for line in lines if line.startswith("TOTAL"))
    assert int(total.split()[2]) == sum(d["requests"] for d in body["data"])


# --- keys -------------------------------------------------------------------------------------


async def test_admin_keys_api_and_revocation(env: Env) -> None:
    status, created = await http(
        "POST", env.url + "/admin/keys", key=ADMIN_KEY, json_body={"tenant": "gamma", "label": "ci"}
    )
    assert status == 201 and created["key"].startswith("ng-")
    key, key_id = created["key"], created["key_id"]
    rid = new_rid("gamma")
    async with env.client(key) as oai:
        reply = await oai.chat.completions.create(
            model="groq-8b", messages=MSG, max_tokens=3, extra_headers={"x-request-id": rid}
        )
        assert reply.choices
    assert [r["tenant"] for r in sqlite_rows(env.ledger, "client_request_id = ?", [rid])] == [
        "gamma"
    ]
    status, listing = await http("GET", env.url + "/admin/keys?tenant=gamma", key=ADMIN_KEY)
    assert status == 200
    assert [k["key_id"] for k in listing["keys"]] == [key_id]
    assert key not in json.dumps(listing), "the plaintext key is shown once, at creation"
    # A tenant key is not an admin key.
    status, body = await http("GET", env.url + "/admin/keys", key=key)
    assert status == 403
    status, body = await http("DELETE", env.url + f"/admin/keys/{key_id}", key=ADMIN_KEY)
    assert status == 200 and body["revoked"] is True
    async with env.client(key) as oai:
        with pytest.raises(openai.AuthenticationError) as refused:
            await oai.chat.completions.create(model="groq-8b", messages=MSG, max_tokens=3)
    assert refused.value.status_code == 401
    status, body = await http("DELETE", env.url + f"/admin/keys/{key_id}", key=ADMIN_KEY)
    assert status == 404


async def poll_status(env: Env, key: str, want: int, within_s: float = 3.0) -> int:
    """Status of a tiny request with `key`, retried until it is `want` (keys refresh every 0.5 s)."""
    deadline = time.monotonic() + within_s
    body = {"model": "groq-8b", "messages": MSG, "max_tokens": 2}
    while True:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                env.url + "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            ) as r,
        ):
            status = r.status
        if status == want or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.1)


async def test_cli_created_key_works_and_cli_revocation_is_seen(env: Env) -> None:
    rc, out, err = await neogate("keys", "create", "--tenant", "delta", "--db", str(env.ledger))
    assert rc == 0, err
    fields = dict(re.findall(r"^(key_id|key):\s+(\S+)$", out, flags=re.M))
    key, key_id = fields["key"], fields["key_id"]
    # The gateway is another process: it picks the new key up from the shared database.
    assert await poll_status(env, key, 200) == 200
    rc, out, err = await neogate("keys", "list", "--db", str(env.ledger), "--format", "json")
    assert rc == 0 and key_id in out and key not in out
    rc, out, err = await neogate("keys", "revoke", key_id, "--db", str(env.ledger))
    assert rc == 0, err
    assert await poll_status(env, key, 401) == 401


# --- the command line on a PostgreSQL ledger ---------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def pg_gateway(tmp_path: Path) -> AsyncIterator[tuple[Env, Path]]:
    urls, sims = await start_sims()
    schema = f"e2e_cli_{uuid.uuid4().hex[:10]}"
    policy = e2e_policy(urls, tmp_path)
    policy["ledger"] = {
        "kind": "postgres",
        "dsn": PG_DSN,
        "schema_name": schema,
        "spool_path": str(tmp_path / "ledger.spool"),
    }
    config = tmp_path / "policy.yaml"
    config.write_text(yaml.safe_dump(policy))
    runner, url = await start_gateway(policy, anonymous=False)
    try:
        status, body = await http(
            "POST", url + "/admin/keys", key=ADMIN_KEY, json_body={"tenant": "pg-tenant"}
        )
        assert status == 201
        yield Env(url, tmp_path / "unused.db", {"pg-tenant": body["key"]}), config
    finally:
        await runner.cleanup()
        for r in sims:
            await r.cleanup()
        await drop_schema(schema)


async def test_usage_cli_with_a_postgres_config(pg_gateway: tuple[Env, Path]) -> None:
    env, config = pg_gateway
    async with env.client(env.keys["pg-tenant"]) as oai:
        await oai.chat.completions.create(model="groq-8b", messages=MSG, max_tokens=4)
    rc, out, err = await neogate(
        "usage", "--config", str(config), "--by", "tenant", "--format", "json"
    )
    assert rc == 0, err
    assert [(d["tenant"], d["requests"]) for d in json.loads(out)] == [("pg-tenant", 1)]


async def test_keys_cli_with_a_postgres_config(pg_gateway: tuple[Env, Path]) -> None:
    env, config = pg_gateway
    rc, out, err = await neogate("keys", "create", "--tenant", "pg-cli", "--config", str(config))
    assert rc == 0, err
    key = dict(re.findall(r"^(key_id|key):\s+(\S+)$", out, flags=re.M))["key"]
    assert await poll_status(env, key, 200) == 200
