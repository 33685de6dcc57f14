"""Metering: reported and counted usage, streams, reconciliation and cost."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from gateway.metering.money import UnitPrices, cost_usd, nusd_to_usd, usd_to_nusd
from gateway.metering.stream_meter import StreamMeter
from gateway.metering.tokenizer import Tokenizer
from gateway.metering.usage import Usage, reconcile, usage_from_response


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_source("bpe-openai", "cl100k_base")


def chunk(content: str | None = None, *, index: int = 0, usage: Any = None, **delta: Any) -> bytes:
    d: dict[str, Any] = dict(delta)
    if content is not None:
        d["content"] = content
    event = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": d, "finish_reason": None}],
        "usage": usage,
    }
    return json.dumps(event).encode()


def usage_chunk(usage: dict[str, Any], choices: list[Any] | None = None) -> bytes:
    return json.dumps({"id": "x", "choices": choices or [], "usage": usage}).encode()


def feed_all(meter: StreamMeter, events: list[bytes]) -> None:
    for e in events:
        meter.feed(e)


# --- non-streamed -------------------------------------------------------------------


def test_response_reported_usage_with_details(tok: Tokenizer) -> None:
    body = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello world"}}],
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 50,
            "total_tokens": 150,
            "prompt_tokens_details": {"cached_tokens": 64},
            "completion_tokens_details": {"reasoning_tokens": 30},
        },
    }
    u = usage_from_response(body, tokenizer=tok, prompt_tokens_estimate=97)
    assert (u.prompt_tokens, u.completion_tokens) == (100, 50)
    assert (u.cached_tokens, u.reasoning_tokens) == (64, 30)
    assert u.source == "reported"
    assert u.counted_completion_tokens == 2
    assert u.counted_prompt_tokens == 97


def test_response_without_usage_is_counted(tok: Tokenizer) -> None:
    body = {"choices": [{"index": 0, "message": {"content": "hello world"}}]}
    u = usage_from_response(body, tokenizer=tok, prompt_tokens_estimate=12)
    assert (u.prompt_tokens, u.completion_tokens, u.source) == (12, 2, "counted")


def test_response_without_usage_and_estimate_tokenizer_is_estimated() -> None:
    body = {"choices": [{"index": 0, "message": {"content": "abcdefgh"}}]}
    u = usage_from_response(body, tokenizer=Tokenizer.estimate(), prompt_tokens_estimate=3)
    assert (u.completion_tokens, u.source) == (2, "estimated")
    assert usage_from_response(body).source == "estimated"


def test_embeddings_usage_has_no_completion() -> None:
    body = {"object": "list", "data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    u = usage_from_response(body)
    assert (u.prompt_tokens, u.completion_tokens, u.source) == (8, 0, "reported")


def test_response_explicit_zero_stays_zero(tok: Tokenizer) -> None:
    body = {
        "choices": [{"index": 0, "message": {"content": "hello world"}}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
    u = usage_from_response(body, tokenizer=tok, prompt_tokens_estimate=5)
    assert (u.prompt_tokens, u.completion_tokens, u.source) == (0, 0, "reported")


def test_groq_non_stream_timings() -> None:
    body = {
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "queue_time": 0.01,
            "prompt_time": 0.002,
            "completion_time": 0.05,
            "total_time": 0.062,
        }
    }
    u = usage_from_response(body)
    assert u.upstream_timings is not None
    assert u.upstream_timings.queue_s == 0.01 and u.upstream_timings.total_s == 0.062


def test_n2_and_tool_calls_counted_in_response(tok: Tokenizer) -> None:
    args = '{"location": "Paris"}'
    body = {
        "choices": [
            {"index": 0, "message": {"content": "hello world"}},
            {
                "index": 1,
                "message": {
                    "content": None,
                    "tool_calls": [{"function": {"name": "weather", "arguments": args}}],
                },
            },
        ]
    }
    u = usage_from_response(body, tokenizer=tok, prompt_tokens_estimate=0)
    assert u.completion_tokens == 2 + tok.count_text("weather" + args)


# --- streamed -----------------------------------------------------------------------


def test_stream_include_usage_chunk(tok: Tokenizer) -> None:
    m = StreamMeter()
    feed_all(
        m,
        [
            chunk("hello"),
            chunk(" world"),
            usage_chunk({"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}),
            b"[DONE]",
        ],
    )
    assert m.saw_done
    u = m.finish(True, tok, 8)
    assert (u.prompt_tokens, u.completion_tokens, u.source) == (9, 2, "reported")
    assert (u.counted_prompt_tokens, u.counted_completion_tokens) == (8, 2)
    assert not reconcile(u, 0.1)


def test_stream_usage_on_a_chunk_that_also_has_choices(tok: Tokenizer) -> None:
    last = {
        "choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11},
    }
    m = StreamMeter()
    feed_all(m, [chunk("hello"), json.dumps(last).encode(), b"[DONE]"])
    u = m.finish(True, tok, 3)
    assert (u.prompt_tokens, u.completion_tokens, u.source) == (4, 7, "reported")
    assert u.counted_completion_tokens == tok.count_text("hello!")


def test_stream_usage_with_spaces_and_data_prefix(tok: Tokenizer) -> None:
    m = StreamMeter()
    m.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}')
    assert m.reported is not None and m.reported.completion_tokens == 2


def test_stream_usage_null_before_x_groq_usage_is_still_reported(tok: Tokenizer) -> None:
    # One event with a top-level "usage": null and the counts under x_groq.usage (both
    # keys in one chunk): the null must not hide the object that follows it.
    last = {
        "choices": [],
        "usage": None,
        "x_groq": {"usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}},
    }
    m = StreamMeter()
    feed_all(m, [chunk("hello"), json.dumps(last).encode(), b"[DONE]"])
    u = m.finish(True, tok, 3)
    assert (u.prompt_tokens, u.completion_tokens, u.source) == (12, 5, "reported")


def test_stream_explicit_zero_stays_zero(tok: Tokenizer) -> None:
    m = StreamMeter()
    feed_all(m, [chunk("hello world"), usage_chunk({"prompt_tokens": 0, "completion_tokens": 0})])
    u = m.finish(True, tok, 5)
    assert (u.prompt_tokens, u.completion_tokens, u.source) == (0, 0, "reported")


def test_stream_cached_and_reasoning(tok: Tokenizer) -> None:
    m = StreamMeter()
    feed_all(
        m,
        [
            chunk(None, reasoning_content="think"),
            chunk("ok"),
            usage_chunk(
                {
                    "prompt_tokens": 2000,
                    "completion_tokens": 300,
                    "prompt_tokens_details": {"cached_tokens": 1920},
                    "completion_tokens_details": {"reasoning_tokens": 250},
                }
            ),
        ],
    )
    u = m.finish(True, tok, 1990)
    assert (u.cached_tokens, u.reasoning_tokens) == (1920, 250)


def test_stream_groq_x_groq_usage(tok: Tokenizer) -> None:
    first = {
        "id": "x",
        "choices": [{"index": 0, "delta": {"content": "hi"}}],
        "x_groq": {"id": "r"},
    }
    final = {
        "id": "x",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "x_groq": {
            "id": "r",
            "usage": {
                "queue_time": 0.02,
                "prompt_tokens": 15,
                "prompt_time": 0.001,
                "completion_tokens": 1,
                "completion_time": 0.003,
                "total_tokens": 16,
                "total_time": 0.004,
            },
        },
    }
    m = StreamMeter()
    feed_all(m, [json.dumps(first).encode(), json.dumps(final).encode(), b"[DONE]"])
    u = m.finish(True, tok, 14)
    assert (u.prompt_tokens, u.completion_tokens, u.source) == (15, 1, "reported")
    assert u.upstream_timings is not None and u.upstream_timings.queue_s == 0.02


def test_broken_stream_counts_delivered_text(tok: Tokenizer) -> None:
    m = StreamMeter()
    feed_all(m, [chunk("hello"), chunk(" world"), chunk(" again")])
    u = m.finish(False, tok, 20)
    assert u.source == "counted"
    assert u.completion_tokens == tok.count_text("hello world again")
    assert u.prompt_tokens == 20
    assert u.completion_tokens > 0


def test_stream_without_include_usage_counts(tok: Tokenizer) -> None:
    m = StreamMeter()
    feed_all(m, [chunk("hello world"), b"[DONE]"])
    u = m.finish(True, tok, 4)
    assert (u.completion_tokens, u.source) == (2, "counted")


def test_reasoning_and_refusal_text_counted_without_usage(tok: Tokenizer) -> None:
    """Every text a client receives is billed when no usage arrives, not only `content`."""
    m = StreamMeter()
    feed_all(
        m,
        [
            chunk(reasoning_content="Let me think"),
            chunk(reasoning=" about batching"),
            chunk(refusal=" I cannot share that"),
            chunk(" but here is more"),
        ],
    )
    u = m.finish(False, tok, 5)
    assert u.source == "counted"
    text = "Let me think about batching I cannot share that but here is more"
    assert u.completion_tokens == tok.count_text(text) == 13


def test_stream_n2_counts_each_choice(tok: Tokenizer) -> None:
    m = StreamMeter()
    feed_all(m, [chunk("hello", index=0), chunk("good", index=1), chunk(" world", index=0)])
    m.feed(chunk(" morning", index=1))
    u = m.finish(False, tok, 1)
    assert u.completion_tokens == tok.count_text("hello world") + tok.count_text("good morning")


def test_stream_tool_call_arguments_count(tok: Tokenizer) -> None:
    def call(args: str, name: str | None = None) -> bytes:
        fn: dict[str, Any] = {"arguments": args}
        if name:
            fn["name"] = name
        return chunk(None, tool_calls=[{"index": 0, "function": fn}])

    m = StreamMeter()
    feed_all(m, [call("", "get_weather"), call('{"city":'), call(' "Paris"}')])
    u = m.finish(False, tok, 1)
    assert u.completion_tokens == tok.count_text('get_weather{"city": "Paris"}')


def test_single_char_delivered_is_never_zero() -> None:
    m = StreamMeter()
    m.feed(chunk("x"))
    assert m.finish(False, Tokenizer.estimate(), 0).completion_tokens == 1


def test_malformed_events_do_not_crash(tok: Tokenizer) -> None:
    m = StreamMeter()
    feed_all(
        m,
        [
            b'{"usage": {broken',
            b"not json",
            b"[1, 2]",
            b'{"choices": "nope"}',
            b'{"choices": [null, {"delta": "x"}]}',
            b'{"error": {"message": "upstream died"}}',
            chunk("hello world"),
        ],
    )
    u = m.finish(False, tok, 0)
    assert (u.completion_tokens, u.source) == (2, "counted")


def test_null_usage_on_ordinary_chunks_is_not_parsed() -> None:
    m = StreamMeter()
    m.feed(chunk("hi", usage=None))
    assert m.reported is None


def test_last_usage_wins_for_continuous_usage(tok: Tokenizer) -> None:
    m = StreamMeter()
    m.feed(chunk("a", usage={"prompt_tokens": 5, "completion_tokens": 1}))
    m.feed(chunk("b", usage={"prompt_tokens": 5, "completion_tokens": 2}))
    assert m.finish(True, tok, 5).completion_tokens == 2


# --- reconciliation and cost --------------------------------------------------------


def test_reconcile_flags_divergence_beyond_threshold() -> None:
    ok = Usage(100, 100, counted_prompt_tokens=98, counted_completion_tokens=105)
    assert not reconcile(ok, 0.1)
    bad = Usage(100, 100, counted_prompt_tokens=100, counted_completion_tokens=300)
    assert reconcile(bad, 0.1)
    tiny = Usage(2, 2, counted_prompt_tokens=2, counted_completion_tokens=6)
    assert not reconcile(tiny, 0.1)  # within the absolute slack
    assert reconcile(tiny, 0.1, min_tokens=0)
    counted = Usage(1, 1, source="counted", counted_completion_tokens=100)
    assert not reconcile(counted, 0.1)
    template = Usage(200, 10, counted_prompt_tokens=150, counted_completion_tokens=10)
    assert not reconcile(template, 0.1)  # prompt gaps are the upstream's chat template
    assert reconcile(template, 0.1, include_prompt=True)


def test_cost_cached_input_at_own_price() -> None:
    u = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000, cached_tokens=400_000)
    prices = UnitPrices.of(0.59, 0.79, cached_input_per_m=0.295, version="v1")
    assert cost_usd(u, prices) == Decimal("0.6") * Decimal("0.59") + Decimal("0.4") * Decimal(
        "0.295"
    ) + Decimal("0.79")
    no_cached_price = UnitPrices.of(0.59, 0.79)
    assert cost_usd(u, no_cached_price) == Decimal("1.38")


def test_cost_is_exact_for_small_requests() -> None:
    u = Usage(prompt_tokens=10, completion_tokens=3)
    c = cost_usd(u, UnitPrices.of(0.05, 0.08))
    assert c == Decimal("0.00000074")
    assert usd_to_nusd(c) == 740
    assert nusd_to_usd(740) == c
    assert usd_to_nusd(Decimal("0.0000000005")) == 0  # half-even
    assert usd_to_nusd(Decimal("0.0000000015")) == 2


def test_local_chargeback_prices_are_never_free() -> None:
    u = Usage(prompt_tokens=500, completion_tokens=200)
    # A chargeback price computed by the cost model at the batch the request shared:
    # 500 x 0.02 $/M + 200 x 3.82 $/M = 0.00001 + 0.000764 USD.
    assert cost_usd(u, UnitPrices.of(0.02, 3.82, version="gpu:b1")) == Decimal("0.000774")


def test_full_sse_blocks_are_understood(tok: Tokenizer) -> None:
    m = StreamMeter()
    m.feed(b"data: " + chunk("hello"))
    m.feed(b"event: message\r\ndata: " + chunk(" world") + b"\r\n")
    m.feed(b": keep-alive comment")
    m.feed(b"data: " + usage_chunk({"prompt_tokens": 3, "completion_tokens": 2}))
    m.feed(b"data: [DONE]")
    assert m.saw_done
    u = m.finish(True, tok, 3)
    assert (u.completion_tokens, u.counted_completion_tokens) == (2, 2)


# --- bounded stream meters -----------------------------------------------------------


def test_stream_meter_keeps_only_bounded_text_and_estimates_the_rest(tok: Tokenizer) -> None:
    piece = "the of and to in is " * 50  # 1,000 characters, ~300 tokens
    m = StreamMeter(max_chars=10_000)
    for _ in range(40):
        m.feed(b"data: " + chunk(piece))
    assert m.kept_chars == 10_000  # 10 pieces kept, 30 only measured
    usage = m.finish(False, tok, 5)
    assert usage.source == "estimated"  # past the bound the count is an estimate
    exact = tok.count_text(piece * 10)
    assert usage.completion_tokens == exact + 30 * 1000 // 4


def test_stream_meter_under_its_bound_counts_exactly(tok: Tokenizer) -> None:
    m = StreamMeter(max_chars=10_000)
    feed_all(m, [chunk("hello"), chunk(" world"), b"[DONE]"])
    usage = m.finish(True, tok, 5)
    assert (usage.source, usage.completion_tokens, m.kept_chars) == ("counted", 2, 11)
    assert m.saw_done


# --- pinned by mutation testing (make mutation): parsing edge cases, exact values ----------

from gateway.metering.usage import UpstreamTimings, parse_usage_object  # noqa: E402


@pytest.mark.parametrize(
    ("obj", "want"),
    [
        (None, None),
        ([1, 2], None),
        ({}, None),
        ({"prompt_tokens": None, "completion_tokens": "3"}, None),
        # Responses-style names.
        ({"input_tokens": 7, "output_tokens": 2}, (7, 2, 0, 0, 0)),
        # Embeddings: prompt and total only; total alone means input.
        ({"prompt_tokens": 9, "total_tokens": 9}, (9, 0, 0, 0, 0)),
        ({"total_tokens": 12}, (12, 0, 0, 0, 0)),
        # Completion and total only: prompt is the remainder.
        ({"completion_tokens": 4, "total_tokens": 10}, (6, 4, 0, 0, 0)),
        ({"completion_tokens": 4}, (0, 4, 0, 0, 0)),
        # Prompt and total only: completion is the remainder.
        ({"prompt_tokens": 3, "total_tokens": 8}, (3, 5, 0, 0, 0)),
        ({"prompt_tokens": 3}, (3, 0, 0, 0, 0)),
        # Negative counts clamp to 0, floats truncate, booleans are not numbers.
        ({"prompt_tokens": -5, "completion_tokens": 2.9}, (0, 2, 0, 0, 0)),
        ({"prompt_tokens": True, "completion_tokens": 2, "total_tokens": 2}, (0, 2, 0, 0, 0)),
        ({"prompt_tokens": -1.5, "completion_tokens": 1, "total_tokens": 4}, (3, 1, 0, 0, 0)),
        # Details: clamped to what they are part of; cache writes to the uncached rest.
        (
            {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 9},
                "completion_tokens_details": {"reasoning_tokens": 7},
            },
            (10, 5, 4, 5, 6),
        ),
        (
            {
                "input_tokens": 10,
                "output_tokens": 5,
                "input_tokens_details": {"cached_tokens": 12},
                "output_tokens_details": {"reasoning_tokens": 2},
            },
            (10, 5, 10, 2, 0),
        ),
        (
            {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": None},
            (10, 5, 0, 0, 0),
        ),
    ],
)
def test_parse_usage_object(obj: Any, want: tuple[int, int, int, int, int] | None) -> None:
    u = parse_usage_object(obj)
    if want is None:
        assert u is None
        return
    assert u is not None and u.source == "reported"
    got = (u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.reasoning_tokens)
    assert (*got, u.cache_write_tokens) == want


def test_provider_timings_are_kept_as_given_and_absent_ones_are_none() -> None:
    u = parse_usage_object(
        {
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "queue_time": 1,
            "prompt_time": 0.25,
            "completion_time": True,
            "total_time": "2",
        }
    )
    assert u is not None
    assert u.upstream_timings == UpstreamTimings(queue_s=1.0, prompt_s=0.25)
    assert isinstance(u.upstream_timings.queue_s, float)
    u = parse_usage_object({"prompt_tokens": 1, "completion_tokens": 1, "total_time": 0.5})
    assert u is not None and u.upstream_timings == UpstreamTimings(total_s=0.5)
    u = parse_usage_object({"prompt_tokens": 1, "completion_tokens": 2, "completion_time": 0})
    assert u is not None and u.upstream_timings == UpstreamTimings(completion_s=0.0)
    u = parse_usage_object({"prompt_tokens": 1, "completion_tokens": 2})
    assert u is not None and u.upstream_timings is None


def test_a_response_without_choices_or_usage() -> None:
    u = usage_from_response({"id": "x"}, prompt_tokens_estimate=None)
    assert (u.prompt_tokens, u.completion_tokens, u.source) == (0, 0, "estimated")
    assert (u.counted_prompt_tokens, u.counted_completion_tokens) == (None, None)


def test_a_response_counts_what_it_delivered_beside_what_was_reported(tok: Tokenizer) -> None:
    body = {
        "choices": [
            {"index": 0, "message": {"content": "hello world", "refusal": None}},
            {"index": 1, "message": {"content": None, "refusal": "no"}},
            {"index": 2, "text": "legacy"},
            {
                "index": 3,
                "message": {"tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
            },
            "not a choice",
        ],
        "x_groq": {"usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    }
    u = usage_from_response(body, tokenizer=tok, prompt_tokens_estimate=2)
    assert (u.prompt_tokens, u.completion_tokens, u.source) == (3, 4, "reported")
    counted = (
        tok.count_text("hello world") + tok.count_text("no") + tok.count_text("legacy")
        + tok.count_text("f{}")
    )  # fmt: skip
    assert (u.counted_prompt_tokens, u.counted_completion_tokens) == (2, counted)
    body["x_groq"] = "not a mapping"
    u = usage_from_response(body, tokenizer=tok, prompt_tokens_estimate=2)
    assert (u.prompt_tokens, u.completion_tokens, u.source) == (2, counted, "counted")


def test_a_chat_choice_counts_its_message_not_a_text_beside_it(tok: Tokenizer) -> None:
    body = {"choices": [{"index": 0, "text": "hello world", "message": {"content": "hi"}}]}
    u = usage_from_response(body, tokenizer=tok)
    assert u.completion_tokens == tok.count_text("hi")


@pytest.mark.parametrize(
    "block",
    [
        b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6}}',
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6}}',
        b'{"choices":[],"usage" :\r\n\t{"prompt_tokens":5,"completion_tokens":6}}',
        b'data:{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6}}',
        b' {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6}}',
        b'id: 1\r\ndata: {"choices":[],\r\ndata: "usage": {"prompt_tokens":5,"completion_tokens":6}}\r',
        b'data: {"choices":[],"x_groq":{"usage":{"prompt_tokens":5,"completion_tokens":6}},"usage":{"x":1}}',
    ],
)
def test_a_usage_object_is_found_in_every_framing(tok: Tokenizer, block: bytes) -> None:
    m = StreamMeter()
    m.feed(block)
    assert m.reported is not None
    assert (m.reported.prompt_tokens, m.reported.completion_tokens) == (5, 6)
    assert m.events_seen == 1 and not m.saw_done


@pytest.mark.parametrize(
    "block",
    [
        b'{"choices":[],"usage":null}',
        b'{"choices":[],"usage": 3}',
        b'{"choices":[],"usage":',
        b'{"choices":[],"usage"',
        b"[1, 2]",
        b"data: not json",
    ],
)
def test_no_usage_object_no_report(block: bytes) -> None:
    m = StreamMeter()
    m.feed(block)
    assert m.reported is None and not m.saw_done


def test_done_is_recognised_only_as_the_done_event() -> None:
    m = StreamMeter()
    m.feed(b"data: [DONE]")
    assert m.saw_done and m.events_seen == 1
    long_text = StreamMeter()
    long_text.feed(chunk("the text says [DONE] but it is content, long enough"))
    assert not long_text.saw_done


def test_finish_with_reported_usage_keeps_the_count_beside_it(tok: Tokenizer) -> None:
    m = StreamMeter()
    feed_all(m, [chunk("hello world"), usage_chunk({"prompt_tokens": 9, "completion_tokens": 3})])
    u = m.finish(True, tok, 7)
    assert (u.prompt_tokens, u.completion_tokens, u.source) == (9, 3, "reported")
    assert (u.counted_prompt_tokens, u.counted_completion_tokens) == (7, 2)
    u = m.finish(True, tok, 7, count_when_reported=False)
    assert u.counted_completion_tokens is None and u.counted_prompt_tokens == 7


def test_text_past_the_meters_limit_is_estimated_at_four_characters_a_token(
    tok: Tokenizer,
) -> None:
    m = StreamMeter(max_chars=10)
    feed_all(m, [chunk("hello"), chunk("world"), chunk("x" * 9), chunk("yy", index=1)])
    assert m.kept_chars == 10
    u = m.finish(False, tok, 1)
    # Choice 0 keeps "helloworld", 9 more characters are measured: ceil(9 / 4) = 3 tokens;
    # choice 1's 2 characters came after the limit too: ceil(2 / 4) = 1.
    assert u.completion_tokens == tok.count_text("helloworld") + 3 + 1
    assert u.source == "estimated"
    exact = StreamMeter(max_chars=10)
    feed_all(exact, [chunk("hello"), chunk("world")])  # exactly at the limit: all kept
    assert exact.finish(False, tok, 1).source == "counted"


def test_every_fed_event_is_counted() -> None:
    m = StreamMeter()
    assert m.events_seen == 0 and not m.saw_done
    feed_all(m, [chunk("a"), b"data: not json", b"data: [DONE]"])
    assert m.events_seen == 3


def test_cache_writes_are_priced_at_their_own_rate_by_hand() -> None:
    u = Usage(
        prompt_tokens=1_000_000,
        completion_tokens=0,
        cached_tokens=200_000,
        cache_write_tokens=300_000,
    )
    prices = UnitPrices.of(1.0, 2.0, 0.1, cache_write_input_per_m=1.25)
    assert prices.version == ""
    # 500k uncached x 1.0 + 200k cached x 0.1 + 300k written x 1.25, per million.
    assert cost_usd(u, prices) == Decimal("0.5") + Decimal("0.02") + Decimal("0.375")
    # Without a write price, writes cost the input price.
    assert cost_usd(u, UnitPrices.of(1.0, 2.0, 0.1)) == Decimal("0.5") + Decimal("0.02") + Decimal(
        "0.3"
    )
    # Writes are clamped to the uncached part of the prompt: 40 of 80 here.
    clamped = Usage(prompt_tokens=100, completion_tokens=0, cached_tokens=60, cache_write_tokens=80)
    assert cost_usd(clamped, prices) == (60 * Decimal("0.1") + 40 * Decimal("1.25")) / 1_000_000


@pytest.mark.parametrize(
    ("reported", "counted", "min_tokens", "diverges"),
    [
        (100, 109, 8, False),  # gap 9 > 8 tokens, but not more than 10% of 100
        (100, 111, 8, True),  # gap 11 > 8 and > 10
        (100, 110, 8, False),  # gap 10: not more than 10% of 100
        (20, 28, 8, False),  # gap 8: not more than min_tokens
        (20, 29, 8, True),
        (0, 9, 8, True),  # nothing reported: 9 > 0.1 x max(0, 1)
        (1, 10, 8, True),
    ],
)
def test_reconcile_boundaries(reported: int, counted: int, min_tokens: int, diverges: bool) -> None:
    u = Usage(reported, reported, counted_prompt_tokens=counted, counted_completion_tokens=counted)
    assert reconcile(u, 0.1, min_tokens=min_tokens) is diverges
    assert reconcile(u, 0.1, min_tokens=min_tokens, include_prompt=True) is diverges


def test_reconcile_default_slack_is_eight_tokens() -> None:
    u = Usage(20, 20, counted_completion_tokens=29)
    assert reconcile(u, 0.1)
    assert not reconcile(Usage(20, 20, counted_completion_tokens=28), 0.1)
    # A missing count on one side is skipped, the other still compared.
    assert reconcile(
        Usage(20, 20, counted_prompt_tokens=None, counted_completion_tokens=29),
        0.1,
        include_prompt=True,
    )
    assert reconcile(
        Usage(20, 20, counted_prompt_tokens=29, counted_completion_tokens=None),
        0.1,
        include_prompt=True,
    )


# --- pinned by mutation testing, 2026-12-06 (expected counts by hand: the estimate is
# ceil(characters / 4) per choice, at least 1) -----------------------------------------------

from types import MappingProxyType  # noqa: E402


def test_a_stream_usage_beside_an_x_groq_without_usage_is_kept() -> None:
    # Groq's chunks carry `x_groq` (its id) with or without a usage object inside: a usage
    # object at the top level is the report either way.
    m = StreamMeter()
    m.feed(
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6},'
        b'"x_groq":{"id":"req_01"}}'
    )
    assert m.reported is not None
    assert (m.reported.prompt_tokens, m.reported.completion_tokens) == (5, 6)


def test_tool_calls_count_names_and_arguments_and_skip_what_is_not_a_call() -> None:
    calls: list[Any] = [
        None,
        "not a call",
        {"id": "call_1", "type": "function"},  # no function yet
        {"function": None},
        {"function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        # Any Mapping is read, not only a dict.
        {"function": MappingProxyType({"name": "abcd", "arguments": "efgh"})},
    ]
    body = {"choices": [{"index": 0, "message": {"content": None, "tool_calls": calls}}]}
    u = usage_from_response(body, tokenizer=Tokenizer.estimate())
    # "get_weather" 11 + '{"city":"Paris"}' 16 + "abcd" 4 + "efgh" 4 = 35 characters: 9 tokens.
    assert (u.completion_tokens, u.source) == (9, "estimated")


def test_a_response_counted_without_a_tokenizer_is_the_estimate() -> None:
    body = {"choices": [{"index": 0, "message": {"content": "abcdefghi"}}]}
    u = usage_from_response(body)
    # 9 characters: ceil(9 / 4) = 3 tokens.
    assert (u.completion_tokens, u.counted_completion_tokens, u.source) == (3, 3, "estimated")


def test_a_counted_stream_keeps_its_counts_beside_them() -> None:
    m = StreamMeter()
    feed_all(m, [chunk("abcde"), b"data: [DONE]"])
    u = m.finish(True, Tokenizer.estimate(), 20)
    # No usage object: the prompt is the estimate and "abcde" is ceil(5 / 4) = 2 tokens,
    # and both are also the gateway's own counts (what reconciliation would compare).
    assert (u.prompt_tokens, u.completion_tokens, u.source) == (20, 2, "estimated")
    assert (u.counted_prompt_tokens, u.counted_completion_tokens) == (20, 2)


@pytest.mark.parametrize(
    "block",
    [
        # The first "usage" holds the object; a later one is null.
        b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6},'
        b'"x_groq":{"id":"r","usage":null}}',
        # Null first, the object second, null again after it.
        b'{"choices":[],"usage":null,"x_groq":{"usage":{"prompt_tokens":5,"completion_tokens":6}},'
        b'"extra":{"usage":null}}',
    ],
)
def test_the_usage_object_is_found_among_null_usages(block: bytes) -> None:
    m = StreamMeter()
    m.feed(block)
    assert m.reported is not None
    assert (m.reported.prompt_tokens, m.reported.completion_tokens) == (5, 6)


def test_done_is_looked_for_only_in_blocks_under_32_bytes() -> None:
    # A legacy completions chunk of exactly 32 bytes whose text mentions [DONE]: content,
    # counted ("[DONE] " is 7 characters: 2 tokens by the estimate), not the end.
    block = b'{"choices":[{"text":"[DONE] "}]}'
    assert len(block) == 32
    m = StreamMeter()
    m.feed(block)
    assert not m.saw_done
    assert m.finish(True, Tokenizer.estimate(), 0).completion_tokens == 2
    short = StreamMeter()
    short.feed(b"data: [DONE]" + b" " * 19)  # 31 bytes
    assert short.saw_done


class Count(int):
    """An int subclass (as an IntEnum member is): read as the int it is."""


@pytest.mark.parametrize(
    ("obj", "want"),
    [
        ({"prompt_tokens": Count(7), "completion_tokens": Count(-2)}, (7, 0)),
        # 0.0 is a count of zero (not "absent": the total would then give the prompt 4).
        ({"prompt_tokens": 0.0, "completion_tokens": 5, "total_tokens": 9}, (0, 5)),
    ],
)
def test_counts_of_other_number_types(obj: dict[str, Any], want: tuple[int, int]) -> None:
    u = parse_usage_object(obj)
    assert u is not None and (u.prompt_tokens, u.completion_tokens) == want


@pytest.mark.parametrize(
    ("times", "want"),
    [
        ({"queue_time": 0.5}, UpstreamTimings(queue_s=0.5)),
        ({"prompt_time": 0.25}, UpstreamTimings(prompt_s=0.25)),
        # Timings that are all not numbers are no timings.
        ({"queue_time": "soon", "total_time": None}, None),
    ],
)
def test_each_provider_timing_alone(times: dict[str, Any], want: UpstreamTimings | None) -> None:
    u = parse_usage_object({"prompt_tokens": 1, "completion_tokens": 1, **times})
    assert u is not None and u.upstream_timings == want


@pytest.mark.parametrize(
    ("obj", "want"),
    [
        # Completion 0 and no prompt: the prompt is total - 0, or 0 without a total.
        ({"completion_tokens": 0}, (0, 0, 0, 0, 0)),
        ({"completion_tokens": 0, "total_tokens": 10}, (10, 0, 0, 0, 0)),
        # Details that leave a count out: none of it.
        (
            {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 4},
                "completion_tokens_details": {"audio_tokens": 0},
            },
            (10, 5, 4, 0, 0),
        ),
        # Any Mapping is a usage object, not only a dict.
        (MappingProxyType({"prompt_tokens": 3, "completion_tokens": 2}), (3, 2, 0, 0, 0)),
    ],
)
def test_parse_usage_object_fallbacks(obj: Any, want: tuple[int, int, int, int, int]) -> None:
    u = parse_usage_object(obj)
    assert u is not None and u.source == "reported"
    got = (u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.reasoning_tokens)
    assert (*got, u.cache_write_tokens) == want


def test_reconcile_judges_a_report_of_zero_as_one_token() -> None:
    # Nothing reported, 1 counted, no slack: 1 > 0.75 x max(0, 1), so it diverges.
    assert reconcile(Usage(0, 0, counted_completion_tokens=1), 0.75, min_tokens=0)
    assert not reconcile(Usage(0, 0, counted_completion_tokens=1), 1.0, min_tokens=0)


def test_choices_without_an_integer_index_are_choice_0() -> None:
    # One text per choice index, counted as one: "abcd" + "e" + "f" = 6 characters,
    # ceil(6 / 4) = 2 tokens; any of them counted apart would make 3 (a choice's count is
    # at least 1: "abcde" 2 + "f" 1, or "abcdf" 2 + "e" 1).
    body = {
        "choices": [
            {"index": 0, "message": {"content": "abcd"}},
            {"message": {"content": "e"}},  # no index
            {"index": "1", "message": {"content": "f"}},  # not an integer
        ]
    }
    assert usage_from_response(body, tokenizer=Tokenizer.estimate()).completion_tokens == 2
    m = StreamMeter()
    feed_all(m, [chunk("abcd"), b'{"choices":[{"delta":{"content":"e"}}]}'])
    m.feed(b'{"choices":[{"index":null,"delta":{"content":"f"}}]}')
    assert m.finish(True, Tokenizer.estimate(), 0).completion_tokens == 2


def test_a_legacy_function_call_counts_its_name_and_arguments() -> None:
    call = {"name": "get_time", "arguments": "{}"}
    body = {
        "choices": [
            {"index": 0, "message": {"content": None, "function_call": call}},
            {"index": 1, "message": {"content": "abc", "function_call": "not a call"}},
        ]
    }
    # "get_time" 8 + "{}" 2 = 10 characters: 3 tokens; "abc" 1, its junk call nothing.
    assert usage_from_response(body, tokenizer=Tokenizer.estimate()).completion_tokens == 4


def test_choices_and_deltas_may_be_any_mapping() -> None:
    body = {
        "choices": [
            MappingProxyType({"index": 0, "message": {"content": "abcde"}}),
            {"index": 1, "message": MappingProxyType({"content": "fghij"})},
        ]
    }
    # Two choices of 5 characters: 2 tokens each.
    assert usage_from_response(body, tokenizer=Tokenizer.estimate()).completion_tokens == 4
