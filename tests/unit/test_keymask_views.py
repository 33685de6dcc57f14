"""A key an upstream spreads over a stream must not reach a client in any way the client can read
the stream: raw bytes, any decoded JSON string, the text of each choice (and each tool call)
put together, and the text of naive clients (`choices[0]` of every chunk; every choice in
order). No view may hold more than the key's first HOLD_PREFIX - 1 characters either."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from adapters.keymask import HOLD_PREFIX, KeyMask
from tests.watchdog import watchdog_after

# A masker that loops (a mutant's `while`) ends the process in seconds, not at mutmut's limit.
watchdog = watchdog_after(10)

KEY = "sk-canary-0123456789abcdef/xyz"
A, B = KEY[:12], KEY[12:]  # each starts and ends away from a repeat of "s"


def _event(*choices: dict[str, Any], raw: str | None = None) -> bytes:
    return b"data: " + (raw.encode() if raw else json.dumps({"choices": list(choices)}).encode())


def _c(index: int, content: str | None = None, **delta: Any) -> dict[str, Any]:
    if content is not None:
        delta["content"] = content
    return {"index": index, "delta": delta, "finish_reason": None}


def _call(i: int, args: str) -> dict[str, Any]:
    return {"index": i, "function": {"arguments": args}}


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def views(events: list[bytes]) -> dict[str, str]:
    """Every text a client can put together from the events it received."""
    out: dict[str, str] = {"raw": b"\n\n".join(events).decode("utf-8", "replace")}
    for n, e in enumerate(events):
        if e.startswith(b"data:") and e[5:].strip() != b"[DONE]":
            for m, s in enumerate(_strings(orjson.loads(e[5:]))):
                out[f"string {n}.{m}"] = s

    def add(view: str, text: object) -> None:
        if isinstance(text, str):
            out[view] = out.get(view, "") + text

    for e in events:
        if not e.startswith(b"data:") or e[5:].strip() == b"[DONE]":
            continue
        choices = orjson.loads(e[5:]).get("choices") or []
        for pos, c in enumerate(choices):
            for name, value in (c.get("delta") or {}).items():
                if name == "tool_calls":
                    for call in value:
                        args = call["function"]["arguments"]
                        add(f"choice {c.get('index')} call {call.get('index')}", args)
                        add("every text in order", args)
                        if pos == 0:
                            add("choices[0] calls", args)
                    continue
                add(f"choice {c.get('index')} {name}", value)
                add(f"every {name} in order", value)
                add("every text in order", value)
                if pos == 0:
                    add(f"choices[0] {name}", value)
    return out


def feed(events: list[bytes]) -> list[bytes]:
    masker = KeyMask(KEY).stream()
    out = [o for e in events for o in masker.feed(e)]
    return out + masker.flush()


def assert_no_key(events: list[bytes]) -> None:
    for view, text in views(events).items():
        assert KEY not in text, (view, text)
        assert KEY[:HOLD_PREFIX] not in text, ("more than the key's public start", view, text)


CASES: dict[str, list[bytes]] = {
    # n=2 streamed one choice per chunk: choices[0] of every chunk joins the halves.
    "halves in two choices, a chunk each": [_event(_c(0, "x " + A)), _event(_c(1, B + " y"))],
    # n=2 in one chunk: a client joining every choice in order joins the halves.
    "halves in two choices of one chunk": [_event(_c(0, "x " + A), _c(1, B + " y"))],
    "halves in two choices, then both go on": [
        _event(_c(0, "x " + A), _c(1, "z")),
        _event(_c(1, B + " y")),
        _event(_c(0, " w")),
    ],
    # A chunk without text (the other choice's role, an empty content, the usage) between
    # the halves released the first half.
    "a role-only chunk of the other choice between": [
        _event(_c(0, "x " + A)),
        _event(_c(1, role="assistant")),
        _event(_c(0, B + " y")),
    ],
    "an empty content between": [
        _event(_c(0, "x " + A)),
        _event(_c(0, "")),
        _event(_c(0, B + " y")),
    ],
    # Parallel tool calls: a client joins each call's arguments.
    "a tool call's halves with another call between": [
        _event(_c(0, tool_calls=[_call(0, '{"k": "' + A)])),
        _event(_c(0, tool_calls=[_call(1, '{"q": 1}')])),
        _event(_c(0, tool_calls=[_call(0, B + '"}')])),
    ],
    "two tool calls in one chunk": [
        _event(_c(0, tool_calls=[_call(0, '{"k": "' + A)])),
        _event(_c(0, tool_calls=[_call(0, B + '"}'), _call(1, '{"q": 1}')])),
    ],
    "the same choice twice in one chunk": [
        _event(_c(0, "x " + A), _c(0, B + " y")),
    ],
    # The halves written with JSON \u escapes, a different spelling in each event.
    "escaped halves in two events": [
        _event(raw='{"choices":[{"index":0,"delta":{"content":"x \\u0073k-canary-01"}}]}'),
        _event(raw='{"choices":[{"index":0,"delta":{"content":"\\u00323456789abcdef\\/xyz"}}]}'),
    ],
    "escaped halves in two choices": [
        _event(raw='{"choices":[{"index":0,"delta":{"content":"x \\u0073k-canary-01"}}]}'),
        _event(raw='{"choices":[{"index":1,"delta":{"content":"\\u00323456789abcdef\\/xyz"}}]}'),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_split_key_reaches_no_view_of_the_stream(case: str) -> None:
    events = CASES[case]
    assert any(KEY in text for text in views(events).values()), "the case shows the key"
    out = feed(events)
    assert_no_key(out)
    assert len(out) == len(events), "every event passes on, one for one"
    for got, sent in zip(out, events, strict=True):
        assert orjson.loads(got[5:]).keys() == orjson.loads(sent[5:]).keys()


def test_text_without_the_key_passes_unchanged_in_every_view() -> None:
    events = [
        _event(_c(0, "sk-c"), _c(1, "an")),  # the key's start, then text that is not the key
        _event(_c(0, "at"), _c(1, "ary")),
        _event(_c(1, role="assistant")),
        _event(_c(0, tool_calls=[_call(0, "sk-can")]), _c(1, "")),
        _event(_c(0, tool_calls=[_call(0, "dle")])),
    ]
    assert feed(events) == events
