"""Malformed and unusual requests: the edge refuses what aiohttp refuses, with the same status;
no client-chosen header byte is a 500; and no request byte reaches the log."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import pytest

from tests.conftest import Gateway, GatewayFactory
from tests.integration.faultkit import SimFactory, Upstream, policy

TENANT_KEY = "ng-tenant-key-for-bad-requests-0123"
PROMPT = "the secret prompt text 7f3a9"
BODY = json.dumps(
    {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
).encode()


@pytest.fixture
async def roads(
    sims: SimFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Gateway]:
    """The same keyed gateway twice: through the edge, and with aiohttp reading every request."""
    monkeypatch.setenv("NEOGATE_TEST_TENANT_KEY", TENANT_KEY)
    sim = await sims()
    out = {}
    for road, fast in (("edge", True), ("aiohttp", False)):
        pol = policy(tmp_path / road, [Upstream("sim", sim.v1)])
        pol["listen"]["fast_edge"] = fast
        pol["auth"] = {"allow_anonymous_on_loopback": False}
        pol["tenants"] = [{"name": "t", "api_keys": ["env:NEOGATE_TEST_TENANT_KEY"]}]
        out[road] = await gateway_factory(pol, anonymous=False)
    return out


def request(headers: list[tuple[str, str]], *, lf: bytes = b"\r\n", body: bytes = BODY) -> bytes:
    lines = [b"POST /v1/chat/completions HTTP/1.1"]
    lines += [f"{k}: {v}".encode("utf-8", "surrogateescape") for k, v in headers]
    lines.append(f"Content-Length: {len(body)}".encode())
    return lf.join(lines) + lf + lf + body


AUTH = ("Authorization", f"Bearer {TENANT_KEY}")
HOST = ("Host", "gateway.test")


async def exchange(gw: Gateway, data: bytes) -> tuple[int, bytes, bool]:
    """Send raw bytes; the status, the answer, and whether the server then closed."""
    port = int(gw.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.5) == b""
        except TimeoutError:
            closed = False
        return status, head + body, closed
    finally:
        writer.close()


REFUSED = {
    "2,000 headers": request([HOST, AUTH] + [(f"X-H{i}", "v") for i in range(2000)]),
    "129 headers": request([HOST, AUTH] + [(f"X-H{i}", "v") for i in range(127)]),
    "a 20 KB header value": request([HOST, AUTH, ("X-Big", "a" * 20_000)]),
    "no Host": request([AUTH]),
    "two Host headers": request([HOST, ("Host", "other.test"), AUTH]),
    # aiohttp's singletons: it refuses a second one, and the edge hands such a head over
    "two Content-Type headers": request(
        [HOST, AUTH, ("Content-Type", "application/json"), ("Content-Type", "text/plain")]
    ),
    "two User-Agent headers": request([HOST, AUTH, ("User-Agent", "a"), ("User-Agent", "b")]),
    "bare LF line ends": request([HOST, AUTH], lf=b"\n"),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_the_edge_refuses_what_aiohttp_refuses_with_the_same_status(
    roads: dict[str, Gateway], case: str
) -> None:
    got = {road: (await exchange(gw, REFUSED[case]))[0] for road, gw in roads.items()}
    assert got == {"edge": 400, "aiohttp": 400}, got


async def test_requests_near_the_limits_are_served_on_both_roads(
    roads: dict[str, Gateway],
) -> None:
    for data in (
        request([HOST, AUTH] + [(f"X-H{i}", "v") for i in range(100)]),
        request([HOST, AUTH, ("X-Big", "a" * 9000)]),
    ):
        got = {road: (await exchange(gw, data))[0] for road, gw in roads.items()}
        assert got == {"edge": 200, "aiohttp": 200}, got


async def test_a_repeated_connection_header_is_read_whole_on_both_roads(
    roads: dict[str, Gateway],
) -> None:
    data = request([HOST, AUTH, ("Connection", "keep-alive"), ("Connection", "close")])
    got = {road: await exchange(gw, data) for road, gw in roads.items()}
    assert {r: (s, closed) for r, (s, _, closed) in got.items()} == {
        "edge": (200, True),
        "aiohttp": (200, True),
    }


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (("User-Agent", "caf\udcff"), 200),  # obs-text is dropped, never forwarded
        (("traceparent", "00-\udcff-01"), 200),
        (("X-Client-Request-Id", "id-\udcff"), 200),
        (("X-Neogate-Timeout", "\udcff"), None),  # a bad value: 200 or a 400, never a 500
        (("Authorization", "Bearer ng-\udcff"), 401),
    ],
)
async def test_obs_text_in_a_header_is_never_a_500(
    roads: dict[str, Gateway], header: tuple[str, str], status: int | None
) -> None:
    headers = [HOST, header] if header[0] == "Authorization" else [HOST, AUTH, header]
    for road, gw in roads.items():
        got, raw, _ = await exchange(gw, request(headers))
        assert got < 500, (road, raw)
        if status is not None:
            assert got == status, (road, raw)


async def test_a_bad_request_is_one_log_line_without_its_bytes_and_floods_are_capped(
    roads: dict[str, Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bad = request([HOST, AUTH], lf=b"\n")  # aiohttp logged these raw bytes at ERROR
    for road, gw in roads.items():
        caplog.clear()
        assert (await exchange(gw, bad))[0] == 400
        lines = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert len(lines) == 1, (road, [r.getMessage() for r in lines])
        logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
        for secret in (TENANT_KEY, PROMPT, "Authorization", "POST /v1"):
            assert secret not in logged, (road, secret, logged)
        caplog.clear()
        for _ in range(40):
            await exchange(gw, bad)
        lines = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert 1 <= len(lines) <= 12, (road, len(lines))
        assert TENANT_KEY not in caplog.text and PROMPT not in caplog.text
        assert "Traceback" not in caplog.text
    # Still answering the good ones.
    for gw in roads.values():
        assert (await exchange(gw, request([HOST, AUTH])))[0] == 200


def head_lines(*lines: bytes, start: bytes = b"POST /v1/chat/completions HTTP/1.1") -> bytes:
    """A request with the given header lines after Host and Authorization, and the body."""
    auth = f"{AUTH[0]}: {AUTH[1]}".encode()
    return b"\r\n".join([start, b"Host: gateway.test", auth, *lines]) + b"\r\n\r\n" + BODY


LENGTH = b"Content-Length: %d" % len(BODY)
# What llhttp refuses in a head (the edge's parser and aiohttp's): each a framing or
# header-smuggling vector. A second, valid request follows in the same write: it must
# never be answered, whichever road read the first.
MALFORMED = {
    "a signed length": head_lines(b"Content-Length: +%d" % len(BODY)),
    "a hex length": head_lines(b"Content-Length: 0x%x" % len(BODY)),
    "a list of lengths": head_lines(b"Content-Length: %d, %d" % (len(BODY), len(BODY))),
    "a space before the colon": head_lines(b"Content-Length : %d" % len(BODY)),
    "chunked, then a length": head_lines(b"Transfer-Encoding: chunked", LENGTH),
    "chunked, identity": head_lines(b"Transfer-Encoding: chunked, identity", LENGTH),
    "a NUL in a value": head_lines(b"X-Odd: a\x00b", LENGTH),
    "a DEL in a value": head_lines(b"X-Odd: a\x7fb", LENGTH),
    "a bare CR in a value": head_lines(b"X-Odd: a\rb", LENGTH),
    "a NUL before a name": head_lines(b"\x00X-Odd: a", LENGTH),
    "a space after the version": head_lines(LENGTH, start=b"POST /v1/chat/completions HTTP/1.1 "),
    "a control byte in the path": head_lines(
        LENGTH, start=b"POST /v1/chat/completions\x01 HTTP/1.1"
    ),
}


def openai_error(raw: bytes) -> dict[str, object]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), raw
    error = json.loads(body)["error"]
    assert isinstance(error, dict)
    return error


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_a_malformed_head_is_an_openai_400_on_both_roads_and_nothing_after_it_is_read(
    roads: dict[str, Gateway], case: str
) -> None:
    data = MALFORMED[case] + head_lines(LENGTH)
    for road, gw in roads.items():
        status, raw, closed = await exchange(gw, data)
        assert (status, closed) == (400, True), (road, raw)
        error = openai_error(raw)
        assert (error["type"], error["code"]) == ("invalid_request_error", "malformed_request")
        body = raw.partition(b"\r\n\r\n")[2]
        for sent in (TENANT_KEY.encode(), PROMPT.encode(), b"POST", b"Content-Length"):
            assert sent not in body, (road, sent, raw)


async def test_a_malformed_first_head_is_not_quoted_back(roads: dict[str, Gateway]) -> None:
    """aiohttp answered a head it could not parse with plain text quoting the bytes it read
    (the key and the start of the body among them); the guard in front of it answers first."""
    cases = {
        "bare LF line ends": request([HOST, AUTH], lf=b"\n"),
        "not HTTP at all": b"GARBAGE " + TENANT_KEY.encode() + b" /\r\n\r\n",
        "a header without a colon": head_lines(b"Foo " + TENANT_KEY.encode(), LENGTH),
    }
    for name, data in cases.items():
        for road, gw in roads.items():
            status, raw, closed = await exchange(gw, data)
            assert (status, closed) == (400, True), (name, road, raw)
            assert openai_error(raw)["type"] == "invalid_request_error", (name, road)
            assert TENANT_KEY.encode() not in raw, (name, road, raw)
            assert PROMPT.encode() not in raw, (name, road, raw)


async def test_an_empty_line_before_a_request_is_skipped_on_both_roads(
    roads: dict[str, Gateway],
) -> None:
    """RFC 9112 2.2: a server SHOULD ignore at least one empty line before the request line
    (as an old client sends after a body). The edge now serves such a request itself."""
    for road, gw in roads.items():
        status, raw, _ = await exchange(gw, b"\r\n" + request([HOST, AUTH]))
        assert status == 200, (road, raw)
        assert (b"Server: neogate" in raw) == (road == "edge"), (road, raw)


async def responses(
    gw: Gateway, writes: list[bytes], count: int
) -> tuple[list[tuple[int, bytes]], bool]:
    """Send each write after the answers so far; read `count` answers, then whether it closed."""
    port = int(gw.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out: list[tuple[int, bytes]] = []
    try:
        for data in writes:
            writer.write(data)
            await writer.drain()
            want = count if data is writes[-1] else len(out) + 1
            while len(out) < want:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                except asyncio.IncompleteReadError:
                    return out, True  # closed before all the answers came
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await asyncio.wait_for(reader.readexactly(length), 10)
                out.append((int(head.split(b" ", 2)[1]), head + body))
        try:
            closed = await asyncio.wait_for(reader.read(1), 1.0) == b""
        except TimeoutError:
            closed = False
        return out, closed
    finally:
        writer.close()


GOOD = {
    "an inference request": request([HOST, AUTH]),
    "a GET aiohttp serves": b"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\n\r\n",
    # Its end is found by reading the chunks again (no length says where it is).
    "a chunked inference request": head_lines(b"Transfer-Encoding: chunked").replace(BODY, b"")
    + b"%x\r\n%b\r\n0\r\n\r\n" % (len(BODY), BODY),
}
# Malformed heads llhttp refuses (the guard sees them) and heads only aiohttp refuses.
LATER_BAD = {
    "bare LF line ends": request([HOST, AUTH], lf=b"\n"),
    "a header without a colon": head_lines(b"Foo " + TENANT_KEY.encode(), LENGTH),
    "not HTTP at all": b"GARBAGE " + TENANT_KEY.encode() + b" /\r\n\r\n",
    "2,000 headers": request([HOST, AUTH] + [(f"X-H{i}", "v") for i in range(2000)]),
    "a 20 KB header value": request([HOST, AUTH, ("X-Big", "a" * 20_000 + TENANT_KEY)]),
    "two Host headers": request([HOST, ("Host", "other.test"), AUTH]),
    "no Host": request([AUTH]),
}


def assert_refused(raw: bytes, where: object) -> None:
    head = raw.partition(b"\r\n\r\n")[0].lower()
    assert b"connection: close" in head, (where, raw)
    error = openai_error(raw)
    assert set(error) == {"message", "type", "param", "code"}, (where, raw)
    assert error["type"] == "invalid_request_error", (where, raw)
    for sent in (TENANT_KEY.encode(), PROMPT.encode(), b"POST /v1", b"Authorization"):
        assert sent not in raw, (where, sent, raw)


@pytest.mark.parametrize("bad", list(LATER_BAD))
@pytest.mark.parametrize("good", list(GOOD))
@pytest.mark.parametrize("pipelined", [False, True], ids=["keep-alive", "pipelined"])
async def test_a_malformed_head_after_a_good_request_is_an_openai_error_on_both_roads(
    roads: dict[str, Gateway],
    caplog: pytest.LogCaptureFixture,
    good: str,
    bad: str,
    pipelined: bool,
) -> None:
    """aiohttp answered a malformed head later on a keep-alive connection with plain text
    (quoting the bytes it read), and one in the same write as a good request in its place."""
    caplog.set_level(logging.DEBUG)
    writes = [GOOD[good] + LATER_BAD[bad]] if pipelined else [GOOD[good], LATER_BAD[bad]]
    for road, gw in roads.items():
        caplog.clear()
        answers, closed = await responses(gw, writes, 2)
        where = (road, good, bad)
        assert [status for status, _ in answers] == [200, 400], (where, answers)
        assert_refused(answers[1][1], where)
        assert closed, where
        lines = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert len(lines) == 1, (where, [r.getMessage() for r in lines])
        logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
        for secret in (TENANT_KEY, PROMPT, "Authorization"):
            assert secret not in logged, (where, secret)


async def test_a_malformed_head_in_the_read_that_ends_a_body_begun_before_is_answered_in_order(
    roads: dict[str, Gateway],
) -> None:
    """The guard finds where a request that spans reads ends (it reads it again from the
    read it began in), so aiohttp answers it before it answers the malformed head."""
    good = request([HOST, AUTH])
    for name, bad in LATER_BAD.items():
        for road, gw in roads.items():
            port = int(gw.url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(good[:-20])
                await writer.drain()
                await asyncio.sleep(0.05)  # two reads on the server
                writer.write(good[-20:] + bad)
                raw = await asyncio.wait_for(reader.read(), 10)  # to the server's close
            finally:
                writer.close()
            answers = list(re.finditer(rb"HTTP/1\.[01] (\d{3}) ", raw))
            statuses = [int(m.group(1)) for m in answers]
            assert statuses == [200, 400], (name, road, raw)
            assert_refused(raw[answers[1].start() :], (name, road))
