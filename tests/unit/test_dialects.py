"""Dialects on the real shapes in tests/fixtures/wire/ (see SOURCES.md there for where each came from)."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import orjson
import pytest

from adapters.dialects import dialect_for, openai_error_body, stream_error_payload
from gateway.config import LOCAL_KINDS, BackendKind
from gateway.metering.stream_meter import StreamMeter
from gateway.metering.usage import reconcile
from policies.headroom import Headroom, KnownLimits, OwnUsage, near_limit, with_own_usage

WIRE = Path(__file__).resolve().parents[1] / "fixtures" / "wire"


def wire(name: str) -> bytes:
    return (WIRE / name).read_bytes().strip()


def events(name: str) -> list[bytes]:
    return [b for b in (WIRE / name).read_bytes().split(b"\n\n") if b.strip()]


class Words:
    """A tokenizer stand-in that counts whitespace-separated words (exact for this test's text)."""

    exact = True

    def count_text(self, text: str) -> int:
        return len(text.split())


class Chars:
    """A tokenizer stand-in that counts characters."""

    exact = True

    def count_text(self, text: str) -> int:
        return len(text)


@pytest.mark.parametrize("name", ["error_sglang.json", "error_vllm_legacy.json"])
def test_legacy_error_bodies_become_openai_shaped(name: str) -> None:
    legacy = orjson.loads(wire(name))
    out = orjson.loads(dialect_for("sglang").error_body(wire(name)))
    assert out == {
        "error": {
            "message": legacy["message"],
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }


def test_nested_error_bodies_pass_byte_for_byte() -> None:
    body = wire("error_vllm_current.json")
    assert openai_error_body(body) is body
    assert dialect_for("vllm").error_body(b"not json") == b"not json"


def test_stream_error_payloads() -> None:
    legacy = wire("error_sglang.json")
    out = stream_error_payload(legacy)
    assert out is not None and orjson.loads(out)["error"]["message"].startswith("No data iterator")
    nested = wire("error_vllm_current.json")
    assert stream_error_payload(nested) is nested
    for ev in events("together_stream_chunks.sse"):  # ordinary chunks are no errors
        assert stream_error_payload(ev.removeprefix(b"data: ")) is None


def _together_stream(words: list[str], usage_tokens: int) -> list[bytes]:
    """Together chunks in the recorded shape, each word in both `text` and `delta.content`."""
    template = orjson.loads(events("together_stream_chunks.sse")[1].removeprefix(b"data: "))
    out = []
    for i, w in enumerate(words):
        chunk = orjson.loads(orjson.dumps(template))
        chunk["choices"][0]["text"] = chunk["choices"][0]["delta"]["content"] = w
        last = i == len(words) - 1
        chunk["choices"][0]["finish_reason"] = "eos" if last else None
        chunk["usage"] = (
            {
                "prompt_tokens": 12,
                "completion_tokens": usage_tokens,
                "total_tokens": 12 + usage_tokens,
            }
            if last
            else None
        )
        out.append(orjson.dumps(chunk))
    return out


def test_together_text_mirror_is_counted_once_and_reconciles() -> None:
    words = [f" w{i}" for i in range(40)]
    meter = StreamMeter()
    for ev in _together_stream(words, usage_tokens=40):
        meter.feed(ev)
    usage = meter.finish(True, Words(), 12)
    assert usage.counted_completion_tokens == 40  # not 80
    assert not reconcile(usage, 0.1)


def test_the_recorded_together_chunks_count_each_piece_once() -> None:
    meter = StreamMeter()
    for ev in events("together_stream_chunks.sse"):
        meter.feed(ev.removeprefix(b"data: "))
    assert meter.delivered_tokens(Chars()) == len("ABC" * 2)  # each chunk's "ABC" once, not twice


# --- rate-limit headers in each provider's windows ------------------------------------


def headers(name: str) -> dict[str, str]:
    out = {}
    for line in (WIRE / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition(":")
            out[k.strip()] = v.strip()
    return out


def test_groq_request_headers_are_a_daily_bucket_not_the_minute() -> None:
    h = dialect_for("groq").headroom(headers("headers_groq.txt"), 100.0, Headroom())
    assert (h.limit_requests, h.remaining_requests) == (None, None)
    assert (h.daily_limit_requests, h.daily_remaining_requests) == (14400, 14370)
    assert h.daily_reset_at == pytest.approx(100.0 + 179.56)
    assert (h.limit_tokens, h.remaining_tokens) == (18000, 17997)
    assert h.reset_tokens_at == pytest.approx(107.66)
    assert not near_limit(h, 500, 100.0)
    # The per-minute request limit Groq does not send, from the operator, against our traffic:
    busy = with_own_usage(h, OwnUsage(requests_per_min=29.5), KnownLimits(requests_per_minute=30))
    assert (busy.limit_requests, busy.remaining_requests) == (30, 0)
    assert near_limit(busy, 500, 100.0)
    # A spent day is near whatever the minute says.
    spent = dialect_for("groq").headroom(
        {**headers("headers_groq.txt"), "x-ratelimit-remaining-requests": "0"}, 100.0, Headroom()
    )
    assert near_limit(spent, 1, 100.0)


def test_generic_dialect_still_reads_openai_request_headers_per_minute() -> None:
    h = dialect_for("openai").headroom(headers("headers_groq.txt"), 0.0, Headroom())
    assert (h.limit_requests, h.daily_limit_requests) == (14400, None)


def test_together_headers_per_second_and_the_429_wait() -> None:
    hdrs = headers("headers_together.txt")
    d = dialect_for("together")
    h = d.headroom(hdrs, 50.0, Headroom())
    assert (h.limit_requests, h.remaining_requests) == (10, 9)
    assert (h.limit_tokens, h.remaining_tokens) == (200000, 199000)
    assert h.window_s == 1.0 and h.reset_requests_at == 52.0
    assert d.retry_after_s(hdrs) == 2.0  # x-ratelimit-reset: no retry-after on Together's 429
    assert d.retry_after_s({**hdrs, "retry-after": "5"}) == 5.0
    assert dialect_for("openai_compatible").retry_after_s(hdrs) is None
    # Without a reset (a 200), the per-second window still refills.
    ok = {k: v for k, v in hdrs.items() if k != "x-ratelimit-reset"}
    low = d.headroom({**ok, "x-ratelimit-remaining": "0"}, 50.0, Headroom())
    assert near_limit(low, 10, 50.0) and not near_limit(low, 10, 51.5)


def test_fireworks_limits_only_are_met_by_our_own_traffic() -> None:
    h = dialect_for("fireworks").headroom(headers("headers_fireworks.txt"), 0.0, Headroom())
    # Tokens per second in the header; enforced per minute.
    assert (h.limit_tokens, h.limit_output_tokens) == (3_600_000 * 60, 36_000 * 60)
    assert h.remaining_tokens is None
    small = dialect_for("fireworks").headroom(
        {"X-Ratelimit-Limit-Tokens-Prompt": "1000", "X-Ratelimit-Limit-Tokens-Generated": "10"},
        0.0,
        Headroom(),
    )
    quiet = with_own_usage(small, OwnUsage(1, 1000, 100))
    assert (quiet.remaining_tokens, quiet.remaining_output_tokens) == (59_000, 500)
    assert not near_limit(quiet, 2000, 0.0, output_tokens=200)
    busy = with_own_usage(small, OwnUsage(1, 1000, 560))
    assert near_limit(busy, 2000, 0.0, output_tokens=200)  # the generated budget binds


def test_every_configurable_kind_has_its_own_dialect() -> None:
    kinds = get_args(BackendKind)
    assert {dialect_for(k).kind for k in kinds} == set(kinds)
    assert {k for k in kinds if dialect_for(k).is_local} == set(LOCAL_KINDS)
    assert dialect_for("something-else").kind == "openai_compatible"
