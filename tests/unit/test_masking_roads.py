"""The masking roads' plain parts: the error mapping and an upstream error status
(`adapters.errors`), the splitter's size limit (`adapters.sse`), and which headers and
transport a backend uses (`adapters.backend`); expected texts written by hand (issue 17's
mutation survivors).
"""

from __future__ import annotations

import aiohttp
import pytest

from adapters import fasthttp
from adapters.aiohttp_transport import AiohttpTransport
from adapters.backend import OpenAICompatBackend, caller_headers, transport_for
from adapters.dialects import dialect_for
from adapters.errors import map_client_error, map_http_error, status_error
from adapters.http_transport import PooledTransport
from adapters.keymask import KeyMask
from adapters.sse import EventSplitter, EventTooLarge
from gateway.errors import (
    InvalidRequest,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)

KEY = "sk-roads-canary-5f2a91"


def bare(cls: type[BaseException]) -> BaseException:
    """An instance without its constructor (their signatures differ); mapping is by type."""
    exc = cls.__new__(cls)
    exc.args = ("detail",)
    return exc


# --- adapters.errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind", "message"),
    [
        (TimeoutError(), UpstreamTimeout, "backend b timed out (streaming)"),
        (bare(aiohttp.ServerTimeoutError), UpstreamTimeout, "backend b timed out (streaming)"),
        (
            bare(aiohttp.ClientConnectorError),
            UpstreamUnavailable,
            "backend b is unreachable (streaming)",
        ),
        (
            aiohttp.ServerDisconnectedError(),
            UpstreamUnavailable,
            "backend b is unreachable (streaming)",
        ),
        (
            aiohttp.ClientPayloadError("cut"),
            UpstreamProtocolError,
            "backend b sent a broken response (streaming)",
        ),
        (
            bare(aiohttp.ClientResponseError),
            UpstreamProtocolError,
            "backend b sent a broken response (streaming)",
        ),
        (
            aiohttp.InvalidURL("x"),
            UpstreamProtocolError,
            "backend b sent a broken response (streaming)",
        ),
        (
            aiohttp.ClientOSError(),
            UpstreamUnavailable,
            "backend b connection failed (streaming)",
        ),
        (
            aiohttp.ClientError(),
            UpstreamUnavailable,
            "backend b connection failed (streaming)",
        ),
        (
            ConnectionResetError(),
            UpstreamUnavailable,
            "backend b connection failed (streaming)",
        ),
        (OSError(), UpstreamUnavailable, "backend b connection failed (streaming)"),
        (
            ValueError(KEY),
            UpstreamProtocolError,
            "backend b failed (streaming): ValueError",
        ),
    ],
)
def test_client_errors_map_to_these_exact_errors(
    exc: BaseException, kind: type, message: str
) -> None:
    out = map_client_error(exc, "b", "streaming")
    assert type(out) is kind and out.message == message


def test_a_gateway_error_is_handed_on_as_it_is() -> None:
    err = UpstreamTimeout("already ours")
    assert map_client_error(err, "b", "x") is err
    assert map_http_error(err, "b", "x") is err


@pytest.mark.parametrize(
    ("exc", "kind", "message"),
    [
        (bare(fasthttp.ResponseTimeout), UpstreamTimeout, "backend b timed out (reading body)"),
        (
            bare(fasthttp.ConnectError),
            UpstreamUnavailable,
            "backend b is unreachable (reading body)",
        ),
        (
            fasthttp.ConnectionClosed("closed", got_bytes=True),
            UpstreamUnavailable,
            "backend b is unreachable (reading body)",
        ),
        (
            bare(fasthttp.IncompleteBody),
            UpstreamProtocolError,
            "backend b sent a broken response (reading body)",
        ),
        (
            bare(fasthttp.BadResponse),
            UpstreamProtocolError,
            "backend b sent a broken response (reading body)",
        ),
        (
            bare(fasthttp.BadRequestHeader),
            InvalidRequest,
            "a forwarded header cannot be sent over HTTP/1.1",
        ),
        # Not the pooled client's own: as the aiohttp road would map it.
        (OSError(), UpstreamUnavailable, "backend b connection failed (reading body)"),
        (KeyError(KEY), UpstreamProtocolError, "backend b failed (reading body): KeyError"),
    ],
)
def test_pooled_client_errors_map_to_these_exact_errors(
    exc: BaseException, kind: type, message: str
) -> None:
    out = map_http_error(exc, "b", "reading body")
    assert type(out) is kind and out.message == message


def test_an_error_status_keeps_status_body_and_wait() -> None:
    body = b'{"error":{"message":"slow down","type":"rate_limit"}}'
    err = status_error("b", 429, body, {"Retry-After": "7"})
    assert type(err) is UpstreamStatus
    assert err.message == "backend b answered 429"
    assert err.upstream_status == 429
    assert err.upstream_body == body
    assert err.retry_after_s == 7.0


def test_an_error_body_is_masked_before_it_is_cut() -> None:
    # The key straddles the 64 KiB cut: masked first, then cut, so no half key is left.
    body = b"x" * 65530 + KEY.encode() + b"y" * 100
    err = status_error("b", 400, body, {}, KeyMask(KEY))
    assert err.upstream_body == b"x" * 65530 + b"***" + b"y" * 3
    assert len(err.upstream_body) == 65536
    # Without a mask the body is only cut.
    plain = status_error("b", 400, body, {})
    assert plain.upstream_body == body[:65536]


def test_an_error_body_is_put_in_the_dialects_shape() -> None:
    # SGLang's top-level error object becomes OpenAI's {"error": {...}}, by the given dialect
    # and by the generic one when none is given.
    sglang = b'{"object":"error","message":"bad input","type":"BadRequestError","code":400}'
    for dialect in (None, dialect_for("vllm")):
        err = status_error("b", 400, sglang, {}, None, dialect)
        assert err.upstream_body.startswith(b'{"error":')
        assert b'"message":"bad input"' in err.upstream_body


def test_the_dialect_reads_the_wait() -> None:
    # Together's wait is in its reset header; the generic dialect does not read it.
    headers = {"x-ratelimit-reset": "3"}
    assert status_error("b", 429, b"", headers).retry_after_s is None
    together = status_error("b", 429, b"", headers, dialect=dialect_for("together"))
    assert together.retry_after_s == dialect_for("together").retry_after_s(headers)
    assert together.retry_after_s is not None


# --- adapters.sse: the size limit -----------------------------------------------------------


def test_an_unfinished_event_may_be_exactly_the_limit() -> None:
    s = EventSplitter(max_event_bytes=10)
    assert s.feed(b"data: 1234") == []  # 10 bytes held
    with pytest.raises(EventTooLarge, match="longer than 10 bytes"):
        s.feed(b"5")


def test_the_rest_after_a_whole_event_may_be_exactly_the_limit() -> None:
    s = EventSplitter(max_event_bytes=10)
    assert s.feed(b"data: 1\n\ndata: 1234") == [b"data: 1"]
    assert s.finish() == b"data: 1234"
    t = EventSplitter(max_event_bytes=10)
    with pytest.raises(EventTooLarge, match="longer than 10 bytes"):
        t.feed(b"data: 1\n\ndata: 12345")


def test_the_default_limit_is_8_mib() -> None:
    s = EventSplitter()
    assert s.feed(b"x" * (8 << 20)) == []
    with pytest.raises(EventTooLarge):
        s.feed(b"x")


def test_a_held_event_completed_by_the_next_chunk_comes_out() -> None:
    s = EventSplitter()
    assert s.feed(b"data: 1\n") == []
    assert s.feed(b"\ndata: 2\n\n") == [b"data: 1", b"data: 2"]
    assert s.feed(b"data: 3") == []
    assert s.feed(b"\n") == []
    assert s.feed(b"\n") == [b"data: 3"]
    assert s.finish() is None


def test_the_unterminated_last_event_loses_only_its_leading_blank_lines() -> None:
    s = EventSplitter()
    assert s.feed(b"data: 1\n\nXfield: 2") == [b"data: 1"]
    assert s.finish() == b"Xfield: 2"
    t = EventSplitter()
    assert t.feed(b"data: 1\n\n\n\n :comment") == [b"data: 1"]
    assert t.finish() == b" :comment"


@pytest.mark.parametrize(
    ("chunk", "events"),
    [
        (b"x\n\n", [b"x"]),  # a one-byte event
        (b"\ndata: 1\n\n", [b"data: 1"]),  # a blank line before the only event
        (b"data: 1\n\n\n\n", [b"data: 1"]),  # a blank line after it: no empty event
        (b"data: 1\n\n\n\ndata: 2\n\n", [b"data: 1", b"data: 2"]),
        (b"data: 1\n\n\n\n\ndata: 2\n\n", [b"data: 1", b"data: 2"]),
        (b"data: 1\n\n\n :c\n\n", [b"data: 1", b" :c"]),  # only the LFs go
        (b"data: 1\n\n\nXf: 1\n\n", [b"data: 1", b"Xf: 1"]),
    ],
)
def test_whole_events_in_one_chunk(chunk: bytes, events: list[bytes]) -> None:
    assert EventSplitter().feed(chunk) == events


def test_finish_after_blank_lines_only_is_nothing() -> None:
    s = EventSplitter()
    assert s.feed(b"\n") == []
    assert s.finish() is None
    assert s.feed(b"\n\ndata: 4") == []
    assert s.finish() == b"data: 4"


# --- adapters.backend: headers and the transport -----------------------------------------------


def test_a_callers_copy_of_the_backends_own_headers_is_dropped_in_any_spelling() -> None:
    headers = {
        "HOST": "evil",
        "Content-Type": "text/plain",
        "content-length": "1",
        "Authorization": "Bearer theirs",
        "Transfer-Encoding": "chunked",
        "Connection": "close",
        "Accept-Encoding": "gzip",
        "X-Trace": "1",
        "OpenAI-Organization": "org",
    }
    assert caller_headers(headers) == [("X-Trace", "1"), ("OpenAI-Organization", "org")]


async def test_the_road_is_chosen_by_the_url_unless_forced() -> None:
    async with aiohttp.ClientSession() as session:
        plain = transport_for("b", "http://127.0.0.1:9/v1", session, [])
        assert isinstance(plain, PooledTransport)
        assert (plain.pool.limit, plain.pool.keepalive_s) == (256, 15.0)
        tls = transport_for("b", "https://api.example.com/v1", session, [])
        assert isinstance(tls, AiohttpTransport)
        forced = transport_for("b", "http://127.0.0.1:9/v1", session, [], road="aiohttp")
        assert isinstance(forced, AiohttpTransport)
        sized = transport_for(
            "b",
            "http://127.0.0.1:9/v1",
            session,
            [],
            road="pooled",
            max_connections=3,
            keepalive_s=1.5,
        )
        assert isinstance(sized, PooledTransport)
        assert (sized.pool.limit, sized.pool.keepalive_s) == (3, 1.5)
        for t in (plain, tls, forced, sized):
            t.close()


async def test_a_backends_dialect_mask_and_own_headers() -> None:
    async with aiohttp.ClientSession() as session:
        local = OpenAICompatBackend(
            name="w", base_url="http://127.0.0.1:9/v1", api_key=None, session=session, is_local=True
        )
        remote = OpenAICompatBackend(
            name="p", base_url="http://127.0.0.1:9/v1", api_key=KEY, session=session, is_local=False
        )
        assert isinstance(local.transport, PooledTransport)
        assert (local.transport.pool.limit, local.transport.pool.keepalive_s) == (256, 15.0)
        assert local.dialect is dialect_for("vllm")
        assert remote.dialect is dialect_for("openai_compatible")
        assert not local.mask.active and remote.mask.active
        sized = OpenAICompatBackend(
            name="s",
            base_url="http://127.0.0.1:9/v1",
            api_key=None,
            session=session,
            is_local=True,
            max_connections=7,
            keepalive_s=2.5,
        )
        assert isinstance(sized.transport, PooledTransport)
        assert (sized.transport.pool.limit, sized.transport.pool.keepalive_s) == (7, 2.5)
        sized.close()
        assert local.name == "w" and local.is_local and not remote.is_local
        assert await local.fetch_metrics() is None
        local.close()
        remote.close()
