"""The one masker of a backend's API key in everything relayed from that backend.

Some upstreams echo the `Authorization` header they were sent: in an error body,
in a whole 200 answer, in stream events. Every byte an adapter hands on passes
through a `KeyMask` first, so the key never reaches a client, a log or the ledger.

What it catches:
- the key as bytes, and in any JSON-escaped spelling (`\\u0073k-...`, `\\/`), in
  one body or one stream event (`mask`);
- a key that a stream spreads over several events' text (`"content": "sk-ca"`,
  then `"content": "nary..."`): `StreamMask` follows the text of every way a
  client can put a stream's text together (a view): each choice's field and each
  tool call's arguments, as the API means them, and the naive ones, across
  choices: `choices[0]` of every chunk, every choice in order (per field, and all
  text). It holds back an event where any view ends in the first `HOLD_PREFIX`
  or more characters of the key (with every event after it, text or not) until
  a later one shows whether the key goes on, and stars the key's characters in
  every event it spans. At most the first `HOLD_PREFIX - 1` characters of a key
  can reach a client that way (`sk-` for the common shape, which is public). A
  choice that ended (finish_reason) holds nothing in its own view; the views
  across choices hold to the next text or the stream's end.

Cost: a whole body is a substring test or two (a regex only where the body holds
a `\\u` or `\\/` escape). A stream from a backend with a key has each event's
JSON parsed once more (~1 us) to follow its text; with nothing passed on that
ends in a start of the key, an event costs one look at the end of each text;
otherwise each view is read (~2 us more, `python -m loadtest.bench_keymask`).
Backends without a key (local workers, usually) pay nothing.
"""

from __future__ import annotations

import re
from typing import Any, Final

import orjson

MASK: Final = b"***"
HOLD_PREFIX: Final = 4  # shortest key prefix at an event's end that holds the event back
_MAX_HELD: Final = 256  # a key is shorter than this many events; never hold more
_TEXT_FIELDS: Final = frozenset(("content", "reasoning_content", "reasoning", "text", "refusal"))


def _escaped_pattern(key: str) -> re.Pattern[bytes]:
    """The key with every character literal or JSON-escaped (`\\uXXXX` any case, `\\/`)."""
    parts = []
    for ch in key:
        code = ord(ch)
        alts = [re.escape(ch.encode())]
        hex4 = f"{code:04x}"
        alts.append(rb"\\u" + b"".join(b"[%b%b]" % (c.encode(), c.upper().encode()) for c in hex4))
        if ch == "/":
            alts.append(rb"\\/")
        parts.append(b"(?:" + b"|".join(alts) + b")")
    return re.compile(b"".join(parts))


class KeyMask:
    """Masks one backend's API key; shared by every request to that backend (holds no request state)."""

    __slots__ = ("_key", "_pattern", "key_text")

    def __init__(self, key: str | None) -> None:
        self.key_text = key or None
        self._key = key.encode() if key else None
        self._pattern = _escaped_pattern(key) if key else None

    @property
    def active(self) -> bool:
        return self._key is not None

    def mask(self, data: bytes) -> bytes:
        """`data` with every copy of the key, plain or JSON-escaped, replaced by `***`."""
        key = self._key
        if key is None:
            return data
        if key in data:
            data = data.replace(key, MASK)
        if b"\\" in data and (b"\\u" in data or b"\\/" in data):
            assert self._pattern is not None
            data = self._pattern.sub(MASK, data)
        return data

    def stream(self) -> StreamMask:
        """The masker of one stream's events."""
        return StreamMask(self)


class StreamMask:
    """The key masker of one SSE stream: `feed` each event block, `flush` at the end."""

    __slots__ = ("_finished", "_held", "_mask", "_pieces", "_released", "_starred")

    def __init__(self, mask: KeyMask) -> None:
        self._mask = mask
        # Per view (see `_slots`): the last characters already passed on (none when no
        # key can start in them), and the pieces of text in held events.
        self._released: dict[View, str] = {}
        self._pieces: dict[View, list[_Piece]] = {}
        self._held: list[bytes] = []  # events held back, in order
        self._starred: dict[int, list[_Piece]] = {}  # held events to rewrite, by index
        self._finished: set[int] = set()  # choices that sent their finish_reason

    def feed(self, block: bytes) -> list[bytes]:
        """The events to pass on now (none while a key may be under way)."""
        mask = self._mask
        key = mask.key_text
        if key is None:
            return [block]
        block = mask.mask(block)
        if len(key) < HOLD_PREFIX * 2:
            return [block]  # too short to hold back a prefix of: masked whole only
        slots, finished = _slots(block)
        if finished:
            self._finished.update(finished)
        if not self._held and (not slots or self._passes(slots, key)):
            return [block]  # the common case: nothing held, no key, no key's start
        index = len(self._held)
        self._held.append(block)
        touched: dict[View, list[_Piece]] = {}
        for slot in slots:
            piece = _Piece(index, slot[4], slot[5])
            for view in _views(slot):
                pieces = self._pieces.get(view)
                if pieces is None:
                    pieces = self._pieces[view] = []
                pieces.append(piece)
                touched[view] = pieces
        for view, pieces in touched.items():
            before = self._released.get(view, "")
            joined = before + "".join([p.text for p in pieces])
            at = joined.find(key)
            while at >= 0:
                self._star(pieces, at - len(before), at - len(before) + len(key))
                joined = before + "".join([p.text for p in pieces])
                at = joined.find(key)
        if len(self._held) < _MAX_HELD:
            # Even after a key was starred here: the text may end in the next key's start.
            # A choice that ended (finish_reason) on a key's first characters holds nothing
            # in its own view; the views across choices hold to the stream's end.
            for view, pieces in self._pieces.items():
                if view[0] == "choice" and view[1] in self._finished:
                    continue
                joined = self._released.get(view, "") + "".join([p.text for p in pieces])
                if len(_key_start(joined, key)) >= HOLD_PREFIX:
                    return []
        return self.flush()

    def _passes(self, slots: list[Slot], key: str) -> bool:
        """Whether this event, with nothing held, goes on as it is (and note its text)."""
        released = self._released
        if not released:
            # Nothing passed on ends in a key's start: a key can only begin in this event,
            # and run on past a text's end only where that text ends in its start.
            starts = [_key_start(slot[5], key) for slot in slots]
            if not any(starts):
                return True  # the common case: one look at each text's end
            if len(slots) == 1:
                start = starts[0]
                if len(start) >= HOLD_PREFIX:
                    return False
                for view in _views(slots[0]):
                    released[view] = start
                return True
        texts: dict[View, str] = {}
        for slot in slots:
            for view in _views(slot):
                texts[view] = texts.get(view, "") + slot[5]
        finished = self._finished
        starts_of: dict[View, str] = {}
        seen: dict[str, str] = {}  # the views of one choice mostly read the same text
        for view, new in texts.items():
            text = released.get(view, "") + new
            known = seen.get(text)
            if known is None:
                if key in text:
                    return False
                known = seen[text] = _key_start(text, key)
            start = known
            starts_of[view] = start
            if len(start) >= HOLD_PREFIX and (view[0] != "choice" or view[1] not in finished):
                return False
        for view, start in starts_of.items():
            if start:
                released[view] = start
            else:
                released.pop(view, None)
        return True

    def flush(self) -> list[bytes]:
        """The events still held (at the end of the stream, or once no key is under way)."""
        key = self._mask.key_text
        released = self._released
        for view, pieces in self._pieces.items() if key else ():
            assert key is not None
            start = _key_start(released.get(view, "") + "".join([p.text for p in pieces]), key)
            if start:
                released[view] = start
            else:
                released.pop(view, None)
        self._pieces = {}
        out = self._held
        for index, pieces in self._starred.items():
            obj = orjson.loads(out[index][5:])
            for piece in pieces:
                _set_text(obj, piece.path, piece.text)
            out[index] = _dump(obj)
        self._held, self._starred = [], {}
        return out

    def _star(self, pieces: list[_Piece], lo: int, hi: int) -> None:
        """Star characters lo..hi of the joined held text of a view (lo < 0: passed on)."""
        pos = 0
        for piece in pieces:
            text = piece.text
            start, end = pos, pos + len(text)
            pos = end
            a, b = max(lo, start), min(hi, end)
            if a >= b:
                continue
            piece.text = text[: a - start] + "*" * (b - a) + text[b - start :]
            starred = self._starred.setdefault(piece.event, [])
            if piece not in starred:
                starred.append(piece)


# A view is one way a client puts a stream's text together, keyed by its kind:
# ("choice", index, field) and ("call", index, tool call index) as the API means it;
# ("first", field): the first choice of every chunk (`chunk.choices[0].delta.content`);
# ("every", field): every choice in order; ("every",): every text in order.
View = tuple[Any, ...]
# One text of an event: choice index, the choice's place in the list, field name, tool
# call index (None: not a call's arguments), where it is in the event, the text.
Slot = tuple[int, int, str, Any, tuple[Any, ...], str]


class _Piece:
    """One text of a held event, shared by the views it belongs to."""

    __slots__ = ("event", "path", "text")

    def __init__(self, event: int, path: tuple[Any, ...], text: str) -> None:
        self.event = event
        self.path = path
        self.text = text


_EVERY: Final[View] = ("every",)


def _key_start(text: str, key: str) -> str:
    """The longest end of `text` that is a start of `key` (not all of it); "" when none."""
    tail = text[1 - len(key) :]
    first = key[0]
    at = tail.find(first)
    while at >= 0:
        rest = tail[at:]
        if key.startswith(rest):
            return rest
        at = tail.find(first, at + 1)
    return ""


def _views(slot: Slot) -> tuple[View, ...]:
    idx, pos, name, call, _, _ = slot
    own = ("choice", idx, name) if call is None else ("call", idx, call)
    if pos == 0:
        return own, ("every", name), _EVERY, ("first", name)
    return own, ("every", name), _EVERY


def _slots(block: bytes) -> tuple[list[Slot], list[int]]:
    """The texts of one `data: {json}` event, each with its views and where it is, and the
    choices the event ends."""
    out: list[Slot] = []
    finished: list[int] = []
    if not block.startswith(b"data:"):
        return out, finished
    try:
        obj = orjson.loads(block[5:])
    except orjson.JSONDecodeError:
        return out, finished
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list):
        return out, finished
    for pos, choice in enumerate(choices):
        if not isinstance(choice, dict):
            continue
        idx = choice.get("index", 0)
        if not isinstance(idx, int):
            continue
        if choice.get("finish_reason") is not None:
            finished.append(idx)
        delta = choice.get("delta")
        for holder, where in ((delta, ("choices", pos, "delta")), (choice, ("choices", pos))):
            if not isinstance(holder, dict):
                continue
            for name, value in holder.items():  # a handful of keys: cheaper than lookups
                if name in _TEXT_FIELDS:
                    if isinstance(value, str) and value:
                        out.append((idx, pos, name, None, (*where, name), value))
                elif name == "tool_calls" and isinstance(value, list):
                    for n, call in enumerate(value):
                        fn = call.get("function") if isinstance(call, dict) else None
                        args = fn.get("arguments") if isinstance(fn, dict) else None
                        if isinstance(args, str) and args:
                            assert isinstance(call, dict)
                            path = (*where, name, n, "function", "arguments")
                            out.append((idx, pos, name, call.get("index", n), path, args))
    return out, finished


def _set_text(obj: Any, path: tuple[Any, ...], new: str) -> None:
    """Write `new` at `path` (from `_slots`) in the parsed event `obj`."""
    *parents, last = path
    for step in parents:
        obj = obj[step]
    obj[last] = new


def _dump(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj)
