"""Each transport maps every failure of its library into the gateway's tree, in one place (`map_error`)."""

from __future__ import annotations

import aiohttp
import pytest

from adapters import fasthttp
from adapters.aiohttp_transport import AiohttpTransport
from adapters.http_transport import PooledTransport
from gateway.errors import (
    InvalidRequest,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

SECRET = "sk-transport-canary-77"


def subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *subclasses(sub)]
    return out


def bare(cls: type[BaseException]) -> BaseException:
    """An instance without running its constructor (their signatures differ); mapping is by type."""
    exc = cls.__new__(cls)
    exc.args = (SECRET,)
    return exc


async def aiohttp_transport() -> AiohttpTransport:
    session = aiohttp.ClientSession()
    await session.close()  # never used: only the mapping is under test
    return AiohttpTransport("b", f"https://user:{SECRET}@api.example.com/v1", session)


@pytest.mark.parametrize(
    "cls", [c for c in subclasses(aiohttp.ClientError) if c.__module__.startswith("aiohttp")]
)
async def test_every_aiohttp_client_error_is_an_upstream_error(cls: type[Exception]) -> None:
    out = (await aiohttp_transport()).map_error(bare(cls), "streaming")
    assert isinstance(out, UpstreamError)
    assert "failed (streaming): " not in out.message, "fell through to the catch-all"
    assert "backend b" in out.message and SECRET not in out.message


@pytest.mark.parametrize(
    ("exc", "mapped"),
    [
        (TimeoutError(), UpstreamTimeout),
        (TimeoutError(), UpstreamTimeout),
        (ConnectionResetError(), UpstreamUnavailable),
        (OSError(), UpstreamUnavailable),
        (ValueError(SECRET), UpstreamProtocolError),
    ],
)
async def test_aiohttp_road_timeouts_and_os_errors(exc: Exception, mapped: type) -> None:
    out = (await aiohttp_transport()).map_error(exc, "waiting for first byte")
    assert type(out) is mapped and SECRET not in out.message


@pytest.mark.parametrize("cls", subclasses(fasthttp.HttpClientError))
def test_every_pooled_client_error_is_mapped(cls: type[Exception]) -> None:
    transport = PooledTransport("b", "http://127.0.0.1:9/v1")
    assert cls in (
        fasthttp.ConnectError,
        fasthttp.ResponseTimeout,
        fasthttp.ConnectionClosed,
        fasthttp.IncompleteBody,
        fasthttp.BadResponse,
        fasthttp.BadRequestHeader,
    ), "a new client error: add it to map_http_error and here"
    out = transport.map_error(bare(cls), "streaming")
    assert isinstance(out, UpstreamError | InvalidRequest)
    assert "failed (streaming): " not in out.message, "fell through to the catch-all"
    assert SECRET not in out.message
    assert isinstance(bare(cls), transport.errors)  # the backend hands it to map_error


def test_pooled_transport_takes_only_plain_http() -> None:
    for url in ("https://h/v1", "http://u:p@h/v1", "http://h/v1?x=1"):
        with pytest.raises(ValueError):
            PooledTransport("b", url)
