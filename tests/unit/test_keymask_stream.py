"""The stream key masker's edges: where a split key hides (tool-call arguments, other choices,
choices without an index, `data:` without its space), what stays held, what is released
unchanged, and the bound on held events. Expected texts are written out by hand."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from adapters.keymask import _MAX_HELD, KeyMask
from tests.watchdog import watchdog_after

# A masker that loops (a mutant's `while`) ends the process in seconds, not at mutmut's limit.
watchdog = watchdog_after(10)

KEY = "sk-canary-0123456789abcdef/xyz"  # 30 characters, no character repeats its first ('s')
STARS = "*" * len(KEY)


def _chunk(*choices: dict[str, Any], space: bool = True) -> bytes:
    return (b"data: " if space else b"data:") + json.dumps({"choices": list(choices)}).encode()


def _c(index: int | None, content: str, finish: str | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"delta": {"content": content}, "finish_reason": finish}
    if index is not None:
        choice["index"] = index
    return choice


def _feed_all(key: str, events: list[bytes]) -> list[bytes]:
    masker = KeyMask(key).stream()
    out: list[bytes] = []
    for e in events:
        out.extend(masker.feed(e))
    return out + masker.flush()


def _content(events: list[bytes], index: int | None = 0) -> str:
    text = ""
    for e in events:
        for c in orjson.loads(e[5:])["choices"]:
            if isinstance(c, dict) and c.get("index") == index:
                text += c["delta"].get("content") or ""
    return text


def test_a_key_split_in_the_second_choice_is_masked_there_only() -> None:
    events = [
        _chunk(_c(0, "same"), _c(1, "a " + KEY[:6])),
        _chunk(_c(0, "!"), _c(1, KEY[6:] + " b")),
    ]
    out = _feed_all(KEY, events)
    assert _content(out, 0) == "same!"
    assert _content(out, 1) == "a " + STARS + " b"


def test_choices_without_an_index_are_choice_0() -> None:
    out = _feed_all(KEY, [_chunk(_c(None, "a " + KEY[:6])), _chunk(_c(None, KEY[6:] + " b"))])
    assert _content(out, None) == "a " + STARS + " b"


def test_the_other_choice_with_the_same_text_is_left_alone() -> None:
    # Choice 1 comes first and carries the very text choice 0 holds; only choice 0 goes on
    # into the key, so only choice 0's copy is starred.
    events = [
        _chunk(_c(1, KEY[:8]), _c(0, KEY[:8])),
        _chunk(_c(1, " no"), _c(0, KEY[8:])),
    ]
    out = _feed_all(KEY, events)
    assert _content(out, 1) == KEY[:8] + " no"
    assert _content(out, 0) == STARS


def test_junk_choices_before_the_one_with_the_key_are_skipped() -> None:
    events = [
        _chunk("junk", {"index": "x", "delta": {"content": "zz"}}, _c(0, "a " + KEY[:6])),  # type: ignore[arg-type]
        _chunk("junk", {"index": "x", "delta": {"content": "zz"}}, _c(0, KEY[6:] + " b")),  # type: ignore[arg-type]
    ]
    out = _feed_all(KEY, events)
    assert _content(out, 0) == "a " + STARS + " b"
    assert all(orjson.loads(e[5:])["choices"][1]["delta"]["content"] == "zz" for e in out)


def test_data_without_its_space_is_followed_and_rewritten() -> None:
    events = [_chunk(_c(0, "a " + KEY[:6]), space=False), _chunk(_c(0, KEY[6:]), space=False)]
    out = _feed_all(KEY, events)
    assert _content(out, 0) == "a " + STARS
    assert all(e.startswith((b"data: ", b"data:{")) for e in out)


def test_a_rewritten_event_is_exactly_the_starred_event() -> None:
    first, second = _chunk(_c(0, "a " + KEY[:6])), _chunk(_c(0, KEY[6:] + " b"))
    out = _feed_all(KEY, [first, second])
    assert out == [
        b"data: " + orjson.dumps({"choices": [{**_c(0, "a ******")}]}),
        b"data: " + orjson.dumps({"choices": [{**_c(0, "*" * 24 + " b")}]}),
    ]


def test_an_event_that_ends_where_the_key_starts_passes_untouched() -> None:
    # Choice 0 is held only because choice 1 ends in the key's start; its text ends exactly
    # where the key then begins: its bytes go out as they came, the next ones get the stars.
    e1 = _chunk(_c(0, "hello"), _c(1, "x " + KEY[:4]))
    e2 = _chunk(_c(0, KEY[:5]), _c(1, "!"))
    e3 = _chunk(_c(0, KEY[5:]))
    out = _feed_all(KEY, [e1, e2, e3])
    assert out[0] == e1
    assert _content(out, 0) == "hello" + STARS
    assert _content(out, 1) == "x " + KEY[:4] + "!"


def test_a_key_that_ends_in_the_event_that_starts_a_second_key_keeps_holding() -> None:
    """Both copies are masked: after the first key is found, an event whose text ends in a
    second key's start is still held (it once went out, letting that start reach the client)."""
    masker = KeyMask(KEY).stream()
    assert masker.feed(_chunk(_c(0, "a " + KEY[:5]))) == []
    assert masker.feed(_chunk(_c(0, KEY[5:] + " and " + KEY[:-1]))) == []
    out = masker.feed(_chunk(_c(0, KEY[-1:] + " end"))) + masker.flush()
    assert _content(out, 0) == "a " + STARS + " and " + STARS + " end"


def test_a_stream_never_holds_more_than_max_held_events() -> None:
    masker = KeyMask(KEY).stream()
    assert masker.feed(_chunk(_c(0, KEY[:-1]))) == []
    other = _chunk(_c(1, "x"))
    for _ in range(_MAX_HELD - 2):
        assert masker.feed(other) == []
    released = masker.feed(other)  # the 256th held event: all go out
    assert len(released) == _MAX_HELD
    # What went out is still remembered: the key's last character is starred.
    out = masker.feed(_chunk(_c(0, KEY[-1:] + "!"))) + masker.flush()
    assert _content(out, 0) == "*!"


def test_held_text_of_a_choice_keeps_the_released_start_of_the_next_key() -> None:
    # Choice 0's "s" went out, then "k" and "-" are held beside choice 1's prefix; after the
    # release, the rest of a key that began with that "s" is still recognised.
    events = [
        _chunk(_c(0, "xs")),
        _chunk(_c(0, "k"), _c(1, "q " + KEY[:4])),
        _chunk(_c(0, "-"), _c(1, "a")),
        _chunk(_c(1, "!")),
        _chunk(_c(0, KEY[3:] + " end")),
    ]
    out = _feed_all(KEY, events)
    assert _content(out, 0) == "xsk-" + "*" * (len(KEY) - 3) + " end"
    assert KEY[3:] not in b"".join(out).decode()


def test_a_released_short_start_is_kept_after_a_flush() -> None:
    # Choice 1 ended a flushed text with "sk-" (3 characters, not held); the key goes on in
    # the next event and is masked there.
    events = [
        _chunk(_c(0, "a " + KEY[:4]), _c(1, "sk-")),
        _chunk(_c(0, "!")),
        _chunk(_c(1, KEY[3:])),
    ]
    out = _feed_all(KEY, events)
    assert _content(out, 1) == "sk-" + "*" * (len(KEY) - 3)


def test_a_finished_choice_ending_in_a_prefix_holds_until_the_next_text() -> None:
    """Its own text ends there, but a client joining every choice reads on into the next
    chunk's text (test_keymask_views): the prefix is held until that text shows no key."""
    masker = KeyMask(KEY).stream()
    e1 = _chunk(_c(0, "x " + KEY[:4]))
    assert masker.feed(e1) == []
    e2 = _chunk(_c(0, "!"), _c(1, "y " + KEY[:5], finish="stop"))
    assert masker.feed(e2) == []
    e3 = _chunk(_c(0, " more"))
    assert masker.feed(e3) == [e1, e2, e3]


def test_a_finished_choice_does_not_end_the_check_of_the_others() -> None:
    masker = KeyMask(KEY).stream()
    assert masker.feed(_chunk(_c(1, "y " + KEY[:4]))) == []
    # Choice 1 finishes (its prefix no longer matters) while choice 0 now ends in the key's start.
    assert masker.feed(_chunk(_c(1, "a", finish="stop"), _c(0, "x " + KEY[:4]))) == []
    out = masker.feed(_chunk(_c(0, KEY[4:]))) + masker.flush()
    assert _content(out, 0) == "x " + STARS


def _tool(args: Any, *junk: Any) -> bytes:
    calls = [*junk, {"index": 0, "function": {"arguments": args}}]
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"tool_calls": calls}}]})


def _args(events: list[bytes]) -> str:
    out = ""
    for e in events:
        for call in orjson.loads(e[5:])["choices"][0]["delta"]["tool_calls"]:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                out += call["function"].get("arguments") or ""
    return out


@pytest.mark.parametrize("junk", [(), (None, {"index": 1, "function": None}, {"index": 2})])
def test_a_key_split_over_tool_call_arguments_is_masked(junk: tuple[Any, ...]) -> None:
    events = [_tool('{"auth": "' + KEY[:7], *junk), _tool(KEY[7:] + '"}', *junk)]
    out = _feed_all(KEY, events)
    assert _args(out) == '{"auth": "' + STARS + '"}'


def test_tool_call_arguments_that_are_not_text_pass() -> None:
    event = _tool({"a": KEY[:6]})
    assert KeyMask(KEY).stream().feed(event) == [event]


def test_only_tool_calls_lists_are_followed() -> None:
    event = b"data: " + orjson.dumps(
        {"choices": [{"index": 0, "delta": {"other": [{"function": {"arguments": KEY[:6]}}]}}]}
    )
    assert KeyMask(KEY).stream().feed(event) == [event]


@pytest.mark.parametrize(
    "payload",
    [b"[1, 2]", b'"sk-canary"', b'{"choices": [{"index": 0, "delta": {"content": ["sk-can"]}}]}'],
)
def test_events_that_are_not_a_text_chunk_pass(payload: bytes) -> None:
    event = b"data: " + payload
    assert KeyMask(KEY).stream().feed(event) == [event]


def test_a_key_of_eight_characters_split_over_events_is_masked() -> None:
    key = "k8-abcde"
    out = _feed_all(key, [_chunk(_c(0, "a " + key[:4])), _chunk(_c(0, key[4:] + " b"))])
    assert _content(out, 0) == "a ******** b"


def test_a_key_under_eight_characters_is_masked_whole_only() -> None:
    key = "k7-abcd"
    event = _chunk(_c(0, "a " + key[:5]))
    assert KeyMask(key).stream().feed(event) == [event]  # not held: too short to follow


@pytest.mark.parametrize("text", ["abcab", "aabcab", "xa abcab"])
def test_any_start_of_the_key_at_the_text_end_holds(text: str) -> None:
    # The key repeats its first character: the start that matters is not the first nor the
    # last 'a' of the text's end.
    key = "abcabd-0123456789"
    masker = KeyMask(key).stream()
    assert masker.feed(_chunk(_c(0, text))) == []
    out = masker.feed(_chunk(_c(0, key[5:]))) + masker.flush()
    assert _content(out, 0) == text[:-5] + "*" * len(key)


def test_a_key_starting_with_the_placeholder_letters_is_told_from_fresh_text() -> None:
    # A key that starts with "XXXX": text new to a choice has nothing released before it.
    key = "XXXXabcdefgh"
    masker = KeyMask(key).stream()
    assert masker.feed(_chunk(_c(0, "a"))) == [_chunk(_c(0, "a"))]
    e1 = _chunk(_c(1, "XXXXab"))
    assert masker.feed(e1) == []
    e2 = _chunk(_c(1, "!"), _c(2, "abcdefgh!"))
    assert masker.feed(e2) == [e1, e2]
    e3 = _chunk(_c(1, "XXXXab"))
    assert masker.feed(e3) == []
    e4 = _chunk(_c(1, "!"), _c(3, "a"))
    assert masker.feed(e4) == [e3, e4]


def test_released_text_of_a_fresh_choice_is_only_its_own() -> None:
    # Choice 1's first text comes out in a flush: what is remembered of it is "ab", so its
    # next text "cdefgh" is no key (only "XXXX" + "ab" + "cdefgh" would be).
    key = "XXXXabcdefgh"
    masker = KeyMask(key).stream()
    e1 = _chunk(_c(0, "q XXXX"))
    assert masker.feed(e1) == []
    e2 = _chunk(_c(0, "!"), _c(1, "ab"))
    assert masker.feed(e2) == [e1, e2]
    e3 = _chunk(_c(1, "cdefgh"))
    assert masker.feed(e3) == [e3]


def test_text_that_only_looks_like_the_rest_of_a_key_is_not_starred() -> None:
    # The stream's first text begins with the key but for its first 3 characters and ends
    # in those 3: no key was sent, so nothing is starred, then or after.
    out = _feed_all(KEY, [_chunk(_c(0, KEY[3:] + " then sk-")), _chunk(_c(0, "!"))])
    assert _content(out) == KEY[3:] + " then sk-!"


def test_a_key_across_two_choices_of_one_event_is_starred_in_both() -> None:
    # A client that joins every choice's text reads "a " + KEY + " b" from this one event.
    out = _feed_all(KEY, [_chunk(_c(0, "a sk-"), _c(1, KEY[3:] + " b"))])
    assert _content(out, 0) == "a ***"
    assert _content(out, 1) == "*" * (len(KEY) - 3) + " b"


def test_a_keys_start_that_broke_off_is_forgotten() -> None:
    # "sk-", then other text: the key's rest arriving later is no key, whether the start
    # was let through at once or held and released.
    let_through = [_chunk(_c(0, "a sk-")), _chunk(_c(0, "hello")), _chunk(_c(0, KEY[3:]))]
    out = _feed_all(KEY, let_through)
    assert _content(out) == "a sk-hello" + KEY[3:]
    held = [
        _chunk(_c(0, "a sk-")),
        _chunk(_c(0, "ca")),
        _chunk(_c(0, "t!")),
        _chunk(_c(0, KEY[3:])),
    ]
    out = _feed_all(KEY, held)
    assert _content(out) == "a sk-cat!" + KEY[3:]


def test_a_new_choices_first_text_has_nothing_before_it_in_its_own_view() -> None:
    # The key begins with "X". Choice 0 ends in "X" (let through: one character); choice 1's
    # first text "ab" has nothing before it in its own view, so its later "-secret..." is no
    # key there (only "X" + "ab" + "-secret..." would be).
    key = "Xab-secret-0123456789"
    events = [
        _chunk(_c(0, "hi X")),
        _chunk(_c(0, " ok"), _c(1, "ab")),
        _chunk(_c(1, "-secret-0123456789 done")),
    ]
    out = _feed_all(key, events)
    assert _content(out, 0) == "hi X ok"
    assert _content(out, 1) == "ab-secret-0123456789 done"


def test_a_key_split_from_reasoning_into_content_is_starred_where_all_text_joins() -> None:
    # "sk" ends the reasoning (2 characters: let through), "-ca" begins the content: a client
    # that joins all of a stream's text reads "sk-ca", the key's start, so the content is
    # held until the key is whole, then starred.
    def reasoning(text: str) -> bytes:
        choice = {"index": 0, "delta": {"reasoning_content": text}, "finish_reason": None}
        return b"data: " + json.dumps({"choices": [choice]}).encode()

    events = [reasoning("think sk"), _chunk(_c(0, "-ca")), _chunk(_c(0, KEY[5:] + " done"))]
    masker = KeyMask(KEY).stream()
    assert masker.feed(events[0]) == [events[0]]
    assert masker.feed(events[1]) == []
    out = masker.feed(events[2]) + masker.flush()
    assert _content(out) == "***" + "*" * (len(KEY) - 5) + " done"


def test_tool_calls_without_an_index_are_told_apart_by_their_place() -> None:
    # Two calls without an index in one event are calls 0 and 1: the first one's arguments
    # end in the key's start (held, though the second's do not), and the key's rest comes as
    # call 0's arguments of the next event.
    def calls(*args: str) -> bytes:
        listed = [{"function": {"arguments": a}} for a in args]
        return b"data: " + orjson.dumps(
            {"choices": [{"index": 0, "delta": {"tool_calls": listed}}]}
        )

    masker = KeyMask(KEY).stream()
    first = calls('{"a": "' + KEY[:5], '{"b": 1}')
    assert masker.feed(first) == []
    out = masker.feed(calls(KEY[5:] + '"}')) + masker.flush()
    assert _args(out) == '{"a": "' + "*****" + '{"b": 1}' + "*" * (len(KEY) - 5) + '"}'


def test_a_choice_without_an_index_and_choice_0_are_one_text() -> None:
    # Choice 0's text begins in a choice without an index and goes on in one that says 0;
    # another choice before each keeps the views across choices from joining them.
    events = [
        _chunk(_c(2, "x"), _c(None, "a " + KEY[:5])),
        _chunk(_c(2, "y"), _c(0, KEY[5:] + " b")),
    ]
    out = _feed_all(KEY, events)
    assert _content(out, None) + _content(out, 0) == "a " + STARS + " b"
    assert _content(out, 2) == "xy"
