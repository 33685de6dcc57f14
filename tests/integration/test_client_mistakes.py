"""A client's mistakes get a clear answer on both roads (neogate's own edge and aiohttp).

A key that is present but unknown is a 401 even in keyless loopback mode (it would
otherwise be served, and billed, anonymously); an `x-neogate-*` header that is
has a value the gateway cannot use is a 400 naming the header and what
it accepts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import Gateway, GatewayFactory, Upstreams, base_policy

BODY = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(params=[True, False], ids=["own-edge", "aiohttp"])
async def gw(
    request: pytest.FixtureRequest,
    upstreams: Upstreams,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
) -> Gateway:
    policy = base_policy(upstreams, tmp_path)
    policy["listen"] = {"host": "127.0.0.1", "port": 0, "fast_edge": request.param}
    return await gateway_factory(policy)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def post(
    http: aiohttp.ClientSession, gw: Gateway, headers: dict[str, str]
) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with http.post(gw.v1 + "/chat/completions", json=BODY, headers=headers) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.json()


async def test_unknown_key_is_401_in_keyless_mode(gw: Gateway, http: aiohttp.ClientSession) -> None:
    for key in ("sk-wrong-key", "ng-mistyped", "unused"):
        status, headers, body = await post(http, gw, {"Authorization": f"Bearer {key}"})
        assert status == 401, (key, body)
        assert body["error"]["code"] == "invalid_api_key"
        assert "'anonymous'" in body["error"]["message"], "says which key keyless mode takes"
        assert headers["x-should-retry"] == "false" and "retry-after" not in headers
    for headers in ({}, {"Authorization": "Bearer anonymous"}):
        status, _, body = await post(http, gw, headers)
        assert status == 200, body
    async with openai.AsyncOpenAI(base_url=gw.v1, api_key="sk-wrong-key", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError):
            await sdk.chat.completions.create(**BODY)
    async with openai.AsyncOpenAI(base_url=gw.v1, api_key="anonymous", max_retries=0) as sdk2:
        reply = await sdk2.chat.completions.create(**BODY)
        assert reply.choices[0].message.content


@pytest.mark.parametrize(
    ("header", "value", "accepted"),
    [
        ("x-neogate-slo-class", "bogus", "accepted: batch, interactive"),
        ("x-neogate-timeout", "abc", "accepted: a number > 0"),
        ("x-neogate-timeout", "0", "accepted: a number > 0"),
        ("x-neogate-timeout", "-1", "accepted: a number > 0"),
        ("x-neogate-timeout", "nan", "accepted: a number > 0"),
        ("x-neogate-timeout", "inf", "accepted: a number > 0"),
        ("x-neogate-deadline-s", "soon", "accepted: a number >= 0"),
        ("x-neogate-deadline-s", "-5", "accepted: a number >= 0"),
        ("X-Neogate-Timeout", "5s", "accepted: a number > 0"),
    ],
)
async def test_bad_neogate_header_is_400_naming_it(
    gw: Gateway, http: aiohttp.ClientSession, header: str, value: str, accepted: str
) -> None:
    status, headers, body = await post(http, gw, {header: value})
    assert status == 400, body
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_header"
    assert err["param"] == header.lower() and header.lower() in err["message"]
    assert accepted in err["message"]
    assert headers["x-should-retry"] == "false"


async def test_good_neogate_headers_are_served(gw: Gateway, http: aiohttp.ClientSession) -> None:
    headers = {
        "x-neogate-slo-class": "batch",
        "x-neogate-timeout": "30",
        "x-neogate-deadline-s": "0",
    }
    status, _, body = await post(http, gw, headers)
    assert status == 200, body
    async with openai.AsyncOpenAI(base_url=gw.v1, api_key="anonymous", max_retries=0) as sdk:
        with pytest.raises(openai.BadRequestError, match="x-neogate-slo-class"):
            await sdk.chat.completions.create(
                **BODY, extra_headers={"x-neogate-slo-class": "interactiv"}
            )
