"""The edge's head reader on plain bytes: what it serves, where the body starts, what it hands over."""

from __future__ import annotations

import pytest

from gateway.http.edge_head import HandOver, Head, HeadReader

BODY = b'{"model": "m"}'


def head(*lines: bytes, start: bytes = b"POST /v1/chat/completions HTTP/1.1") -> bytes:
    return b"\r\n".join([start, *lines]) + b"\r\n\r\n"


GOOD = head(b"Host: x", b"Content-Length: %d" % len(BODY), b"X-Odd:   spaced  ")


def read_whole(data: bytes) -> Head:
    got = HeadReader().feed(data)
    assert got is not None
    return got


def test_a_head_in_the_subset_is_served_and_the_body_starts_after_its_blank_line() -> None:
    got = read_whole(GOOD + BODY + b"POST /next")
    assert got.endpoint == "chat" and got.length == len(BODY) and got.keep_alive
    assert got.end == len(GOOD)
    assert got.headers["x-odd"] == "spaced"  # llhttp strips the leading OWS, we the trailing
    assert [
        read_whole(head(b"Host: x", b"Content-Length: 0", start=s)).endpoint
        for s in (
            b"POST /v1/completions HTTP/1.1",
            b"POST /v1/embeddings HTTP/1.1",
        )
    ] == ["completions", "embeddings"]


def test_a_head_fed_in_every_split_gives_the_same_answer() -> None:
    data = GOOD + BODY
    for cut in range(1, len(GOOD)):
        reader = HeadReader()
        assert reader.feed(data[:cut]) is None, cut
        assert reader.feed(data) == read_whole(data), cut


def test_the_reader_starts_afresh_after_a_head() -> None:
    reader = HeadReader()
    assert reader.feed(GOOD) is not None
    got = reader.feed(head(b"Host: y", b"Content-Length: 0", b"Connection: close"))
    assert got is not None and got.headers["host"] == "y" and not got.keep_alive


@pytest.mark.parametrize(
    "data",
    [
        head(b"Host: x", b"Content-Length: 2", start=b"GET /v1/chat/completions HTTP/1.1"),
        head(b"Host: x", b"Content-Length: 2", start=b"POST /v1/models HTTP/1.1"),
        head(b"Host: x", b"Content-Length: 2", start=b"POST /v1/embeddings?x=1 HTTP/1.1"),
        head(b"Host: x", b"Content-Length: 2", start=b"POST /v1/embeddings HTTP/1.0"),
        head(b"Host: x"),  # no length
        head(b"Content-Length: 2"),  # no Host
        head(b"Host: x", b"Host: y", b"Content-Length: 2"),
        head(b"Host: x", b"Transfer-Encoding: chunked"),
        head(b"Host: x", b"Content-Length: 2", b"Expect: 100-continue"),
        head(b"Host: x", b"Content-Length: 2", b"Upgrade: h2c", b"Connection: upgrade"),
        head(b"Host: x", b"Content-Length: 2", b"Connection: keep-alive", b"Connection: close"),
        head(b"Host: x", b"Content-Length: 2", b"User-Agent: a", b"User-Agent: b"),
        # the same header twice in two spellings is still twice
        head(b"Host: x", b"HOST: y", b"Content-Length: 2"),
        head(b"Host: x", b"Content-Length: 2", b"user-agent: a", b"User-Agent: b"),
        head(b"host: x", b"Content-Length: 2", b"Connection: close", b"connection: close"),
        head(b"Host: x", b"Content-Length: 2", *[b"X-%d: v" % i for i in range(99)]),
        head(b"Host: x", b"Content-Length: 2", b"X-Big: " + b"a" * 8184),
        head(b"Host: x", b"Content-Length: 2", b"X-Big: " + b"a" * 70_000),
        # what llhttp refuses
        head(b"Host: x", b"Content-Length: 2", b"Content-Length: 2"),
        head(b"Host: x", b"Content-Length: +2"),
        head(b"Host: x", b"Content-Length: 2", b"X-Folded: a", b" b"),
        head(b"Host: x", b"Content-Length: 2", b"Bad Name: a"),
        head(b"Host: x", b"Content-Length: 2", b"X: a\x00b"),
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\nContent-Length: 2\r\n\r\n",
        b"\r\n\r\nPOST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n",
    ],
)
def test_anything_else_is_handed_over(data: bytes) -> None:
    with pytest.raises(HandOver):
        HeadReader().feed(data)


def test_limits_at_the_edge_of_the_subset_are_served() -> None:
    hundred = [b"X-%d: v" % i for i in range(98)]
    assert read_whole(head(b"Host: x", b"Content-Length: 2", *hundred)).length == 2
    assert read_whole(head(b"Host: x", b"Content-Length: 2", b"X-Big: " + b"a" * 8183))


def test_bare_lf_is_handed_over_before_the_head_could_end() -> None:
    with pytest.raises(HandOver):  # no CRLF CRLF will ever come: llhttp says so at once
        HeadReader().feed(b"POST /v1/chat/completions HTTP/1.1\nHost: x\n")
