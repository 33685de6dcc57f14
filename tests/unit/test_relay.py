"""The SSE relay's event filter and usage chunk, on plain event blocks (no sockets)."""

from __future__ import annotations

import orjson
import pytest

from gateway.flow.relay import DONE, EventFilter, is_json_object, usage_object
from gateway.metering.stream_meter import StreamMeter
from gateway.metering.tokenizer import Tokenizer
from gateway.metering.usage import UpstreamTimings, Usage

CHUNK = b'data: {"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","system_fingerprint":"fp","x":1,"choices":[{"index":0,"delta":{"content":"hi"}}]}'
NULL_USAGE = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}'
USAGE_ONLY = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}'
USAGE_WITH_CHOICES = (
    b'data: {"id":"c1","choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":3}}'
)
GROQ_TAIL = b'data: {"id":"c1","choices":[],"x_groq":{"id":"g","usage":{"prompt_tokens":3}}}'


def test_done_is_held_back_and_other_lines_pass() -> None:
    f = EventFilter(strip_usage=True)
    assert f.filter(DONE) is None and f.done
    assert f.filter(b": keep-alive") == b": keep-alive" and f.events == 0
    assert f.filter(CHUNK) == CHUNK and f.events == 1
    assert not f.error_seen and f.bad_event is None


def test_a_data_event_that_is_not_a_json_object_is_never_relayed() -> None:
    f = EventFilter(strip_usage=False)
    for bad in (b"data: [1, 2]", b'data: {"id": "x", "choices": [{"delta": ', b"data: null"):
        assert f.filter(bad) is None
        assert f.bad_event == bad
    assert f.events == 3


def test_stripping_removes_every_null_usage_spelling_and_the_usage_only_chunk() -> None:
    f = EventFilter(strip_usage=True)
    assert (
        f.filter(NULL_USAGE)
        == b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"hi"}}]}'
    )
    spaced = b'data: {"id": "c1", "choices": [], "usage": null}'
    assert f.filter(spaced) == b'data: {"id": "c1", "choices": []}'
    mixed = b'data: {"id":"c1","choices":[],"usage": null}'
    assert f.filter(mixed) == b'data: {"id":"c1","choices":[]}'
    assert f.filter(USAGE_ONLY) is None
    assert f.filter(GROQ_TAIL) is None
    # Usage riding on a chunk with choices: the chunk stays, its usage goes.
    assert orjson.loads(f.filter(USAGE_WITH_CHOICES)[6:]) == {  # type: ignore[index]
        "id": "c1",
        "choices": [{"index": 0, "delta": {}}],
    }


def test_a_client_that_asked_for_usage_gets_the_stream_unchanged() -> None:
    f = EventFilter(strip_usage=False)
    assert f.filter(CHUNK) == CHUNK
    assert f.meta == {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "system_fingerprint": "fp",
    }
    assert f.filter(NULL_USAGE) == NULL_USAGE and not f.usage_sent
    assert f.filter(GROQ_TAIL) == GROQ_TAIL and not f.usage_sent  # usage under x_groq only
    assert f.filter(USAGE_ONLY) == USAGE_ONLY and f.usage_sent
    assert f.usage_chunk(Usage(3, 2)) is None  # the backend's own usage chunk went out


def test_meta_comes_from_the_first_chunk_with_choices() -> None:
    f = EventFilter(strip_usage=False)
    f.filter(b'data: {"id":"nochoices"}')
    assert f.meta is None
    f.filter(CHUNK)
    f.filter(b'data: {"id":"later","choices":[]}')
    assert f.meta is not None and f.meta["id"] == "c1"
    assert EventFilter(strip_usage=True).meta is None


def test_the_usage_chunk_a_groq_stream_did_not_send_is_built_from_the_report() -> None:
    f = EventFilter(strip_usage=False)
    f.filter(CHUNK)
    f.filter(GROQ_TAIL)
    usage = Usage(
        10,
        5,
        cached_tokens=4,
        reasoning_tokens=2,
        upstream_timings=UpstreamTimings(queue_s=0.01, prompt_s=None, completion_s=0.2),
    )
    chunk = f.usage_chunk(usage)
    assert chunk is not None and chunk.startswith(b"data: ")
    assert orjson.loads(chunk[6:]) == {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "system_fingerprint": "fp",
        "choices": [],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 2},
            "queue_time": 0.01,
            "completion_time": 0.2,
        },
    }
    assert f.usage_chunk(None) is None
    assert f.usage_chunk(Usage(1, 1, source="counted")) is None  # never a guess as a report
    assert EventFilter(strip_usage=True).usage_chunk(usage) is None  # not asked for


def test_a_usage_chunk_without_meta_still_has_the_shape() -> None:
    f = EventFilter(strip_usage=False)
    chunk = f.usage_chunk(Usage(1, 2, upstream_timings=UpstreamTimings(1.0, 2.0, 3.0, 6.0)))
    assert chunk is not None
    assert orjson.loads(chunk[6:]) == {
        "choices": [],
        "usage": {
            "prompt_tokens": 1,
            "completion_tokens": 2,
            "total_tokens": 3,
            "queue_time": 1.0,
            "prompt_time": 2.0,
            "completion_time": 3.0,
            "total_time": 6.0,
        },
    }


def test_usage_object_leaves_out_zero_details() -> None:
    assert usage_object(Usage(3, 4)) == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }


def test_error_events_are_marked_and_put_in_openai_shape() -> None:
    f = EventFilter(strip_usage=True)
    openai_shape = b'data: {"error":{"message":"boom","type":"server_error"}}'
    assert f.filter(openai_shape) == openai_shape and f.error_seen
    legacy = b'data: {"object":"error","message":"bad","type":"BadRequestError","code":400}'
    g = EventFilter(strip_usage=True)
    out = g.filter(legacy)
    assert g.error_seen and out is not None and out.startswith(b"data: {")
    assert orjson.loads(out[6:])["error"]["message"] == "bad"


@pytest.mark.parametrize(
    ("payload", "ok"),
    [
        (b'{"a": 1}', True),
        (b"[1]", False),
        (b"not json", False),
        (b'{"a":\ndata: 1}', True),  # one event's data over two `data:` lines
        (b'{"a":\ndata:1}', True),
        (b'{"a":\ndata: ]', False),
        (b"[1,\ndata: 2]", False),
        (b'{"a": 1\n}', True),
        (b'{"a":\ndata: "x y"}', True),  # a space inside a string on a continuation line
    ],
)
def test_is_json_object(payload: bytes, ok: bool) -> None:
    assert is_json_object(payload) is ok


def test_a_data_line_without_the_optional_space_is_an_event_too() -> None:
    f = EventFilter(strip_usage=True)
    block = b'data:{"id":"x","choices":[{"index":0,"delta":{"content":"a"}}]}'
    assert f.filter(block) == block and f.bad_event is None


def test_a_groq_chunk_without_usage_keeps_its_choices() -> None:
    f = EventFilter(strip_usage=True)
    block = b'data: {"id":"c","x_groq":{"id":"g"},"choices":[{"index":0,"delta":{}}]}'
    out = f.filter(block)
    assert out is not None and out.startswith(b"data: {")
    assert orjson.loads(out[6:]) == orjson.loads(block[6:])
    stripped = f.filter(USAGE_WITH_CHOICES)
    assert stripped is not None and stripped.startswith(b"data: {")


def test_once_the_backend_sent_usage_a_later_groq_tail_does_not_undo_it() -> None:
    f = EventFilter(strip_usage=False)
    f.filter(CHUNK)
    f.filter(USAGE_ONLY)
    f.filter(GROQ_TAIL)  # usage under x_groq only: not a standard usage object
    assert f.usage_sent
    assert f.usage_chunk(Usage(3, 2)) is None  # no second usage chunk


def test_each_one_line_event_is_parsed_once_and_the_meter_reads_the_filters_object() -> None:
    """The filter keeps the JSON object it parsed to check the event (`event`); the stream
    meter takes it instead of parsing the block again, and meters exactly as if it had."""
    blocks = [
        NULL_USAGE,  # "hi"
        CHUNK,  # "hi"
        b": keep-alive",
        # two data lines: the meter joins them its own way, so nothing is handed over
        b'data: {"id":"c1",\ndata: "choices":[{"index":0,"delta":{"content":"yo"}}]}',
        USAGE_WITH_CHOICES,  # its usage goes out of what the client gets, not the meter's
        USAGE_ONLY,
        DONE,
    ]
    f = EventFilter(strip_usage=True)
    handed, parsed_again = StreamMeter(), StreamMeter()
    objects = []
    for block in blocks:
        f.filter(block)
        objects.append(f.event)
        handed.feed(block, f.event)
        parsed_again.feed(block)
    expected = [orjson.loads(b[6:]) for b in (NULL_USAGE, CHUNK)]
    assert objects[:2] == expected
    assert objects[2:4] == [None, None]
    # The filter sent USAGE_WITH_CHOICES without its usage, from a copy: the object
    # handed over still has it.
    assert objects[4] == {
        "id": "c1",
        "choices": [{"index": 0, "delta": {}}],
        "usage": {"prompt_tokens": 3},
    }
    assert objects[5] == orjson.loads(USAGE_ONLY[6:]) and objects[6] is None
    # Usage as reported by the last usage object: 3 prompt, 2 completion (5 in all).
    assert handed.reported == parsed_again.reported == Usage(3, 2, source="reported")
    words = Tokenizer.estimate()
    assert handed.delivered_tokens(words) == parsed_again.delivered_tokens(words)
    assert handed.finish(True, words, 3) == parsed_again.finish(True, words, 3)
    assert handed.events_seen == parsed_again.events_seen == 7


def test_a_groq_chunk_without_usage_passes_byte_for_byte_with_or_without_choices() -> None:
    # `x_groq` carrying only an id is nothing to strip: the chunk passes as the backend wrote
    # it, also one with no choices (only a usage-only chunk is dropped).
    spaced = b'data: {"id": "c", "x_groq": {"id": "g"}, "choices": [{"index": 0, "delta": {}}]}'
    bare = b'data: {"id":"c","choices":[],"x_groq":{"id":"g"}}'
    for strip_usage in (True, False):
        f = EventFilter(strip_usage=strip_usage)
        assert f.filter(spaced) == spaced
        assert f.filter(bare) == bare
        assert f.bad_event is None and not f.error_seen


def test_an_error_event_in_openais_shape_passes_byte_for_byte() -> None:
    f = EventFilter(strip_usage=True)
    block = b'data:{"error":{"message":"overloaded","type":"server_error"}}'
    assert f.filter(block) == block and f.error_seen


def test_a_payload_that_parses_only_across_a_line_break_is_not_handed_to_the_meter() -> None:
    # The JSON runs onto a line that is not a `data:` line: the filter, reading past the
    # break, sees an object, but the event is not one data line, so the meter reads the
    # block its own way (as a client's SSE parser would) instead of taking that object.
    f = EventFilter(strip_usage=False)
    block = b'data: {"id":"c",\n"choices":[]}'
    assert f.filter(block) == block and f.bad_event is None
    assert f.event is None
    f.filter(CHUNK)
    assert f.event == orjson.loads(CHUNK[6:])


def test_a_first_chunk_over_several_data_lines_leaves_the_meta_to_a_one_line_chunk() -> None:
    # The filter does not join a chunk's data lines for its meta (the stream meter does, for
    # usage); the meta comes from the first one-line chunk with choices.
    f = EventFilter(strip_usage=False)
    two = b'data: {"id":"two","choices":[],\ndata: "model":"m2"}'
    assert f.filter(two) == two and f.bad_event is None
    f.filter(CHUNK)
    assert f.meta is not None and (f.meta["id"], f.meta["model"]) == ("c1", "m")
