"""Fuzzing the OpenAI endpoints of the real gateway: no input yields a 500 or a hang, and every 4xx is an OpenAI error.

Hypothesis draws bodies (raw bytes, arbitrary JSON, and near-valid requests
with wrong types and out-of-range values) and headers; the examples are
derandomized and bounded so the run is the same every time and takes seconds.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Gateway, GatewayFactory
from tests.integration.faultkit import Upstream, is_openai_error, policy, sim_factory

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
CALL_TIMEOUT_S = 10.0


@pytest.fixture
async def fuzz_target(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> AsyncIterator[tuple[Gateway, aiohttp.ClientSession]]:
    """One gateway over two fast providers, shared by every example of the test."""
    async with sim_factory() as sims:
        a, b = await sims(seed=1), await sims(seed=2)
        gw = await gateway_factory(
            policy(tmp_path, [Upstream("a", a.v1), Upstream("b", b.v1)], pinned=False)
        )
        async with aiohttp.ClientSession() as session:
            yield gw, session


# --- strategies ------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_odd = (
    _scalars
    | st.lists(_scalars, max_size=3)
    | st.dictionaries(st.text(max_size=5), _scalars, max_size=3)
)
_small_int = st.integers(min_value=-3, max_value=40)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool"]) | _odd},
    optional={
        "content": st.text(max_size=40) | _odd,
        "name": st.text(max_size=8),
        "tool_calls": _json,
    },
)
_model = st.sampled_from(["m", "", "nope", "m@cut", "../m", "m\u0000"]) | _odd
_DELETE = object()
# Values a field may take in a mutated request: plausible ones and wrong ones.
_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": _model,
    "messages": st.lists(_message, max_size=3) | _odd,
    "prompt": st.text(max_size=40) | st.lists(st.text(max_size=10), max_size=3) | _odd,
    "input": st.text(max_size=40) | st.lists(st.text(max_size=10), max_size=3) | _odd,
    "max_tokens": _small_int | st.integers(min_value=10**6, max_value=2**63) | _odd,
    "max_completion_tokens": _small_int | _odd,
    "n": st.integers(min_value=-1, max_value=12) | _odd,
    "stream": st.booleans() | _odd,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | _odd})
    | _odd,
    "temperature": st.floats(min_value=0, max_value=2) | _odd,
    "tools": _json,
    "logprobs": st.booleans() | _odd,
    "base_url": st.just("http://127.0.0.1:9/v1"),
    "user": st.text(max_size=10) | _odd,
}


@st.composite
def _mutated(draw: st.DrawFn, endpoint: str) -> dict[str, Any]:
    """A valid request for `endpoint`, then up to two fields replaced or removed."""
    body: dict[str, Any] = {"model": "m", "max_tokens": draw(st.integers(1, 12))}
    if endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": draw(st.text(max_size=60))}]
    elif endpoint == "/v1/completions":
        body["prompt"] = draw(st.text(max_size=60))
    else:
        body = {"model": "m", "input": draw(st.text(max_size=60))}
    if endpoint != "/v1/embeddings":
        body["stream"] = draw(st.booleans())
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(sorted(_FIELDS)))
        value = draw(_FIELDS[key] | st.just(_DELETE))
        if value is _DELETE:
            body.pop(key, None)
        else:
            body[key] = value
    return body


_header_names = st.sampled_from(
    [
        "authorization",
        "api-key",
        "content-type",
        "accept",
        "x-request-id",
        "x-neogate-slo-class",
        "x-neogate-deadline-s",
        "x-neogate-timeout",
        "x-sim-fault",
        "openai-beta",
        "traceparent",
        "user-agent",
        "cookie",
    ]
) | st.from_regex(r"x-[a-z0-9-]{1,16}", fullmatch=True)
_header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
) | st.sampled_from(["Bearer ng-nope", "Bearer sk-x", "nan", "inf", "-1", "0", "1e9", "batch"])


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    endpoint = draw(st.sampled_from(ENDPOINTS))
    kind = draw(st.sampled_from(["bytes", "json"] + ["mutated"] * 6))
    if kind == "bytes":
        body = draw(st.binary(max_size=300))
    elif kind == "json":
        body = json.dumps(draw(_json)).encode()
    else:
        body = json.dumps(draw(_mutated(endpoint))).encode()
    headers = draw(st.dictionaries(_header_names, _header_values, max_size=2))
    return endpoint, body, headers


# --- the property ----------------------------------------------------------------------------


@settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=requests())
async def test_no_input_yields_a_500_or_a_hang(
    fuzz_target: tuple[Gateway, aiohttp.ClientSession], case: tuple[str, bytes, dict[str, str]]
) -> None:
    gw, session = fuzz_target
    endpoint, body, headers = case
    async with session.post(
        gw.url + endpoint,
        data=body,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S),  # a hang fails the test
    ) as r:
        raw = await r.read()
        status = r.status
        ctype = r.headers.get("Content-Type", "")
    assert status < 500 or _client_chose_it(status, headers), (status, raw[:300])
    if 400 <= status < 500:
        assert is_openai_error(raw), raw[:300]
    elif status == 200 and ctype.startswith("text/event-stream"):
        assert raw.rstrip().endswith(b"data: [DONE]"), raw[-300:]
    elif status == 200:
        assert isinstance(json.loads(raw), dict)


def _client_chose_it(status: int, headers: dict[str, Any]) -> bool:
    """A deadline the client set itself may legitimately run out (504)."""
    return status == 504 and any(
        k in headers for k in ("x-neogate-timeout", "x-neogate-deadline-s")
    )
