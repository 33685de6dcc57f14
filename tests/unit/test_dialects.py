"""Dialects on the real shapes in tests/fixtures/wire/ (see SOURCES.md there for where each came from)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from adapters.dialects import dialect_for, openai_error_body, stream_error_payload
from gateway.usage import StreamMeter, reconcile

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
