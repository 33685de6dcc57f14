"""Metering: reported and counted usage, streams, reconciliation and cost."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from gateway.tokenizer import Tokenizer
from gateway.usage import (
    StreamMeter,
    UnitPrices,
    Usage,
    cost_usd,
    nusd_to_usd,
    reconcile,
    usage_from_response,
    usd_to_nusd,
)


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
