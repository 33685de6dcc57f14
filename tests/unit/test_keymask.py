"""The backend key masker on plain values: every spelling of the key, split or whole."""

from __future__ import annotations

import json

import orjson
import pytest

from adapters.keymask import KeyMask
from tests.watchdog import watchdog_after

# A masker that loops (a mutant's `while`) ends the process in seconds, not at mutmut's limit.
watchdog = watchdog_after(10)

KEY = "sk-canary-0123456789abcdef/xyz"


def _escaped(key: str, every: int = 1) -> str:
    """The key with every `every`-th character written as a JSON \\u escape."""
    return "".join(f"\\u{ord(c):04X}" if i % every == 0 else c for i, c in enumerate(key))


@pytest.mark.parametrize(
    "spelling",
    [
        KEY,
        _escaped(KEY),
        _escaped(KEY, 3).lower(),
        KEY.replace("/", "\\/"),
        json.dumps(KEY, ensure_ascii=True)[1:-1],
    ],
)
def test_every_spelling_of_the_key_in_one_body_is_masked(spelling: str) -> None:
    body = ('{"error": {"message": "auth=Bearer ' + spelling + '", "code": null}}').encode()
    out = KeyMask(KEY).mask(body)
    assert b"***" in out
    assert KEY.encode() not in out and spelling.encode() not in out
    assert KEY not in json.dumps(json.loads(out))
    assert KEY[4:] not in json.loads(out)["error"]["message"]


def test_a_body_without_the_key_is_the_same_object() -> None:
    body = b'{"choices": [{"text": "caf\\u00e9 sk-other"}]}'
    assert KeyMask(KEY).mask(body) is body
    assert KeyMask(None).mask(body) is body


def _event(content: str, index: int = 0, finish: str | None = None) -> bytes:
    chunk = {"choices": [{"index": index, "delta": {"content": content}, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode()


def _run(events: list[bytes]) -> list[bytes]:
    masker = KeyMask(KEY).stream()
    out: list[bytes] = []
    for e in events:
        out.extend(masker.feed(e))
    out.extend(masker.flush())
    return out


def _text(events: list[bytes], index: int = 0) -> str:
    text = ""
    for e in events:
        for c in orjson.loads(e[5:])["choices"]:
            if c["index"] == index:
                text += c["delta"].get("content") or ""
    return text


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 10, len(KEY) - 1])
def test_a_key_split_over_two_events_is_masked(cut: int) -> None:
    events = [_event("hello auth=Bearer " + KEY[:cut]), _event(KEY[cut:] + " bye")]
    out = _run(events)
    assert len(out) == 2
    text = _text(out)
    assert text.startswith("hello auth=Bearer ") and text.endswith(" bye")
    assert KEY[3:] not in text and KEY[-12:] not in text
    # At most the key's public-looking start (the first 3 characters) got out before the hold.
    assert text.count("*") >= len(KEY) - 3


def test_a_key_echoed_token_by_token_is_masked_and_other_choices_pass() -> None:
    pieces = [KEY[i : i + 2] for i in range(0, len(KEY), 2)]
    events = []
    for p in pieces:
        events.append(_event(p, index=0))
        events.append(_event("x", index=1))
    out = _run(events)
    assert len(out) == len(events)
    assert KEY[3:] not in _text(out) and "*" * (len(KEY) - 3) in _text(out)
    assert _text(out, 1) == "x" * len(pieces)


def test_only_text_ending_in_the_keys_first_four_characters_is_held_back() -> None:
    masker = KeyMask(KEY).stream()
    for word in ("sk", "-", "the", "s", "k-"):
        assert masker.feed(_event(word)) == [_event(word)]
    assert masker.feed(_event("c")) == []  # "sk-c" now ends the text
    assert masker.feed(_event("at")) == [_event("c"), _event("at")]
    assert masker.flush() == []


def test_a_held_event_is_released_unchanged_when_the_key_does_not_follow() -> None:
    first, second = _event("see sk-can"), _event("dy shop")
    masker = KeyMask(KEY).stream()
    assert masker.feed(first) == []
    assert masker.feed(second) == [first, second]


def test_a_choice_that_ends_on_a_key_prefix_holds_only_until_the_next_text() -> None:
    """Its own text is over, but a client joining every choice reads on into the next
    chunk's (test_keymask_views): held until text that shows no key, then never again."""
    masker = KeyMask(KEY).stream()
    ended = _event("the end: sk-c", index=0, finish="stop")
    assert masker.feed(ended) == []
    held = _event("so: sk-c", index=1)
    assert masker.feed(held) == []
    done = _event("", index=1, finish="length")
    assert masker.feed(done) == []
    other = _event("more", index=2)
    assert masker.feed(other) == [ended, held, done, other]
    for _ in range(3):
        assert masker.feed(other) == [other]
