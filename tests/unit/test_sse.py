"""The SSE splitter (`adapters.sse`): every line ending, every split point, one or two cuts, byte by byte."""

from __future__ import annotations

import itertools

import pytest

from adapters.sse import EventSplitter, EventTooLarge

EVENTS = [
    b'data: {"id":"a","choices":[{"delta":{"content":"Hi"}}]}',
    b": keep-alive",
    b'event: message\ndata: {"id":"b"}',
    b'data: {"id":"c","usage":{"prompt_tokens":5}}',
    b"data: [DONE]",
]


def wire(eol: bytes) -> bytes:
    """EVENTS as a stream whose every line ends in `eol`."""
    return b"".join(e.replace(b"\n", eol) + eol + eol for e in EVENTS)


CRLF = wire(b"\r\n")
LF = wire(b"\n")
CR = wire(b"\r")
MIXED = (
    b'data: {"id":"a","choices":[{"delta":{"content":"Hi"}}]}\r\n\n'
    b": keep-alive\n\r\n"
    b'event: message\rdata: {"id":"b"}\r\r'
    b'data: {"id":"c","usage":{"prompt_tokens":5}}\n\r'
    b"data: [DONE]\r\n\r\n"
)
STREAMS = {"crlf": CRLF, "lf": LF, "cr": CR, "mixed": MIXED}


def split(data: bytes, pieces: list[bytes]) -> list[bytes]:
    s = EventSplitter()
    out = [e for p in pieces for e in s.feed(p)]
    last = s.finish()
    return out if last is None else [*out, last]


def cut(data: bytes, *points: int) -> list[bytes]:
    bounds = [0, *sorted(points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@pytest.mark.parametrize("name", STREAMS)
def test_every_single_split_point(name: str) -> None:
    data = STREAMS[name]
    for at in range(len(data) + 1):
        assert split(data, cut(data, at)) == EVENTS, (name, at, data[:at][-6:], data[at:][:6])


@pytest.mark.parametrize("name", STREAMS)
def test_every_pair_of_split_points(name: str) -> None:
    data = STREAMS[name]
    for a, b in itertools.combinations(range(1, len(data)), 2):
        assert split(data, cut(data, a, b)) == EVENTS, (name, a, b)


@pytest.mark.parametrize("name", STREAMS)
def test_byte_by_byte(name: str) -> None:
    data = STREAMS[name]
    assert split(data, [data[i : i + 1] for i in range(len(data))]) == EVENTS


def test_a_crlf_boundary_split_after_its_second_cr_keeps_two_events() -> None:
    # The case the old https road merged: `...\r\n\r` | `\n...`.
    s = EventSplitter()
    assert s.feed(b"data: 1\r\n\r") == [b"data: 1"]  # complete at its CR: no waiting
    assert s.feed(b"\ndata: 2\r\n\r\n") == [b"data: 2"]
    assert s.finish() is None


def test_a_crlf_line_end_split_between_cr_and_lf_is_one_line_end() -> None:
    s = EventSplitter()
    assert s.feed(b"event: x\r") == []
    assert s.feed(b"\ndata: 1\r\n\r\n") == [b"event: x\ndata: 1"]


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r"])
def test_an_event_completes_on_the_byte_that_ends_it(eol: bytes) -> None:
    data = wire(eol)
    s = EventSplitter()
    done = [len(s.feed(data[i : i + 1])) for i in range(len(data))]
    # The blank line's first byte (its CR, for CRLF) completes the event: nothing waits for LF.
    ends, pos = [], 0
    for event in EVENTS:
        pos += len(event.replace(b"\n", eol)) + 2 * len(eol)
        ends.append(pos - len(eol))
    assert [i for i, n in enumerate(done) if n] == ends


def test_blank_line_runs_make_no_empty_events() -> None:
    data = b"\n\n\r\n\r\rdata: 1\n\n\n\n\r\n\r\ndata: 2\r\n\r\n\r\n"
    for at in range(len(data) + 1):
        assert split(data, cut(data, at)) == [b"data: 1", b"data: 2"]


def test_the_unterminated_last_event_comes_out_at_the_end() -> None:
    s = EventSplitter()
    assert s.feed(b"data: 1\r\n\r\ndata: 2\r\n") == [b"data: 1"]
    assert s.finish() == b"data: 2\n"
    assert s.finish() is None
    s = EventSplitter()
    assert s.feed(b"data: 1\n\n\r\n  ") == [b"data: 1"]
    assert s.finish() is None  # only blank lines and spaces: nothing


def test_an_oversized_event_is_refused_whole_or_as_a_remainder() -> None:
    s = EventSplitter(max_event_bytes=16)
    s.feed(b"data: 0123")
    with pytest.raises(EventTooLarge):
        s.feed(b"456789abcdef")
    s = EventSplitter(max_event_bytes=16)
    with pytest.raises(EventTooLarge):
        s.feed(b"data: 1\n\ndata: 0123456789abcdef")
    s = EventSplitter(max_event_bytes=16)
    # Ended within the chunk that brought it: the chunk's size is the transport's to bound.
    assert s.feed(b"data: 0123456789abcdef\n\n") == [b"data: 0123456789abcdef"]
