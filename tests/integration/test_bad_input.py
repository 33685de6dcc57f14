"""Bad input gets a clear OpenAI-format error with the right status, never a 500."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from tests.conftest import Gateway, GatewayFactory, Upstreams, base_policy


async def post(gw: Gateway, path: str, data: bytes | str, **headers: str) -> tuple[int, Any, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.v1 + path, data=data, headers={"Content-Type": "application/json", **headers}
        ) as r,
    ):
        return r.status, await r.json(), r.headers


def assert_openai_error(body: Any, param: str | None = None) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "llama-3.1-8b"}', "messages"),
        (b'{"model": "llama-3.1-8b", "messages": "hello"}', "messages"),
        (b'{"model": "llama-3.1-8b", "messages": [5]}', "messages[0]"),
        (b'{"model": "llama-3.1-8b", "messages": [{"role": "user"}], "stream": "yes"}', "stream"),
        (
            b'{"model": "llama-3.1-8b", "messages": [{"role": "user"}], "max_tokens": -3}',
            "max_tokens",
        ),
        (b'{"model": "llama-3.1-8b", "messages": [{"role": "user"}], "n": 1.5}', "n"),
        (
            b'{"model": "llama-3.1-8b", "messages": [{"role": "user"}], "stream_options": 3}',
            "stream_options",
        ),
    ],
)
async def test_invalid_requests_are_400(
    gateway: Gateway, payload: bytes, param: str | None
) -> None:
    status, body, headers = await post(gateway, "/chat/completions", payload)
    assert status == 400
    assert_openai_error(body, param)
    assert headers["x-request-id"]


async def test_unknown_model_is_404(gateway: Gateway) -> None:
    async with AsyncOpenAI(base_url=gateway.v1, api_key="anonymous", max_retries=0) as c:
        with pytest.raises(openai.NotFoundError) as info:
            await c.chat.completions.create(
                model="gpt-9", messages=[{"role": "user", "content": "x"}]
            )
    assert info.value.code == "model_not_found"


async def test_unknown_path_404_and_wrong_method_405(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.v1 + "/nope") as r:
            assert r.status == 404
            assert_openai_error(await r.json())
            assert r.headers["x-request-id"]
        async with s.get(gateway.v1 + "/chat/completions") as r:
            assert r.status == 405
            assert_openai_error(await r.json())


async def test_body_over_cap_is_413_before_read(
    upstreams: Upstreams, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    policy = base_policy(upstreams, tmp_path)
    policy["tenants"] = [{"name": "anonymous", "limits": {"max_body_bytes": 2048}}]
    gw = await gateway_factory(policy)
    big = (
        b'{"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "'
        + b"x" * 10_000
        + b'"}]}'
    )
    status, body, _ = await post(gw, "/chat/completions", big)
    assert status == 413
    assert_openai_error(body)

    # Chunked upload without a Content-Length: refused once the cap is crossed.
    async def chunks() -> Any:
        for _ in range(100):
            yield b"x" * 1024

    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.v1 + "/chat/completions", data=chunks()) as r,
    ):
        assert r.status == 413


async def test_missing_and_invalid_key_are_401(
    upstreams: Upstreams,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TENANT_ACME_KEY", "ng-acme-secret-key-1")
    policy = base_policy(upstreams, tmp_path)
    policy["tenants"] = [{"name": "acme", "api_keys": ["env:TENANT_ACME_KEY"]}]
    gw = await gateway_factory(policy, anonymous=False)
    messages = [{"role": "user", "content": "x"}]
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.v1 + "/chat/completions", json={"model": "llama-3.1-8b", "messages": messages}
        ) as r,
    ):
        assert r.status == 401
        assert_openai_error(await r.json())
    async with AsyncOpenAI(base_url=gw.v1, api_key="ng-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="llama-3.1-8b", messages=messages)  # type: ignore[arg-type]
    async with AsyncOpenAI(base_url=gw.v1, api_key="ng-acme-secret-key-1", max_retries=0) as good:
        reply = await good.chat.completions.create(
            model="llama-3.1-8b", messages=messages, max_tokens=2
        )  # type: ignore[arg-type]
    assert reply.choices
