"""The one masker of a backend's API key in everything relayed from that backend.

Some upstreams echo the `Authorization` header they were sent: in an error body,
in a whole 200 answer, in stream events. Every byte an adapter hands on passes
through a `KeyMask` first, so the key never reaches a client, a log or the ledger.

What it catches:
- the key as bytes, and in any JSON-escaped spelling (`\\u0073k-...`, `\\/`), in
  one body or one stream event (`mask`);
- a key that a stream spreads over several events' text (`"content": "sk-ca"`,
  then `"content": "nary..."`): `StreamMask` follows the text of each choice
  across events, holds back an event whose text ends in the first
  `HOLD_PREFIX` or more characters of the key until the next one shows whether
  the key goes on, and masks the key's characters in every event it spans. At
  most the first `HOLD_PREFIX - 1` characters of a key can reach a client that
  way (`sk-` for the common shape, which is public).

Cost: a whole body is a substring test or two (a regex only where the body holds
a `\\u` or `\\/` escape). A stream from a backend with a key has each event's
JSON parsed once more (~1-2 us) to follow its text; backends without a key
(local workers, usually) pay nothing.
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

    __slots__ = ("_finished", "_held", "_mask", "_pieces", "_released")

    def __init__(self, mask: KeyMask) -> None:
        self._mask = mask
        # Per text field (choice index, field name): the last characters already passed on,
        # and the pieces of text in held events, as (index in `_held`, text).
        self._released: dict[tuple[int, str], str] = {}
        self._pieces: dict[tuple[int, str], list[tuple[int, str]]] = {}
        self._held: list[Any] = []  # held events: bytes, or parsed objects once rewritten
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
        texts, finished = _texts(block)
        if not texts:
            self._finished.update(finished)
            return [*self.flush(), block] if self._held else [block]
        if not self._held and self._passes(texts, finished, key):
            return [block]  # the common case: nothing held, no key, no key's start
        index = len(self._held)
        self._held.append(block)
        for field, text in texts.items():
            pieces = self._pieces.setdefault(field, [])
            pieces.append((index, text))
            before = self._released.get(field, "")
            joined = before + "".join(t for _, t in pieces)
            at = joined.find(key)
            while at >= 0:
                self._redact(field, pieces, at - len(before), at - len(before) + len(key))
                joined = before + "".join(t for _, t in pieces)
                at = joined.find(key)
        self._finished.update(finished)
        if len(self._held) < _MAX_HELD:
            # Even after a key was starred here: the text may end in the next key's start.
            # A choice that ended (finish_reason) on a key's first characters holds nothing.
            for field, pieces in self._pieces.items():
                if field[0] in self._finished:
                    continue
                joined = self._released.get(field, "") + "".join(t for _, t in pieces)
                if _ends_in_prefix(joined, key):
                    return []
        return self.flush()

    def _passes(self, texts: dict[tuple[int, str], str], finished: list[int], key: str) -> bool:
        """Whether this event, with nothing held, goes on as it is (and note its text)."""
        released = self._released
        joined = [(f, released.get(f, "") + t) for f, t in texts.items()]
        for field, text in joined:
            if key in text or (field[0] not in finished and _ends_in_prefix(text, key)):
                return False
        keep = 1 - len(key)
        for field, text in joined:
            released[field] = text[keep:]
        if finished:
            self._finished.update(finished)
        return True

    def flush(self) -> list[bytes]:
        """The events still held (at the end of the stream, or once no key is under way)."""
        key = self._mask.key_text or ""
        for field, pieces in self._pieces.items():
            text = self._released.get(field, "") + "".join(t for _, t in pieces)
            self._released[field] = text[-(len(key) - 1) :]
        self._pieces = {}
        out = [b if isinstance(b, bytes) else _dump(b) for b in self._held]
        self._held = []
        return out

    def _redact(
        self, field: tuple[int, str], pieces: list[tuple[int, str]], lo: int, hi: int
    ) -> None:
        """Star characters lo..hi of the joined held text (lo < 0: already passed on)."""
        pos = 0
        for n, (index, text) in enumerate(pieces):
            start, end = pos, pos + len(text)
            pos = end
            a, b = max(lo, start), min(hi, end)
            if a >= b:
                continue
            new = text[: a - start] + "*" * (b - a) + text[b - start :]
            pieces[n] = (index, new)
            held = self._held[index]
            obj = orjson.loads(held[5:]) if isinstance(held, bytes) else held
            _set_text(obj, field, text, new)
            self._held[index] = obj


def _ends_in_prefix(text: str, key: str) -> bool:
    """Whether `text` ends in the first HOLD_PREFIX or more characters of `key` (not all of it)."""
    tail = text[-(len(key) - 1) :]
    first = key[0]
    at = tail.find(first)
    while at >= 0:
        rest = tail[at:]
        if len(rest) >= HOLD_PREFIX and key.startswith(rest):
            return True
        at = tail.find(first, at + 1)
    return False


def _texts(block: bytes) -> tuple[dict[tuple[int, str], str], list[int]]:
    """The text fields of one `data: {json}` event, per (choice index, field name), and the
    choices it ends."""
    out: dict[tuple[int, str], str] = {}
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
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        idx = choice.get("index", 0)
        if not isinstance(idx, int):
            continue
        if choice.get("finish_reason") is not None:
            finished.append(idx)
        for holder in (choice.get("delta"), choice):
            if not isinstance(holder, dict):
                continue
            for name, value in holder.items():  # a handful of keys: cheaper than lookups
                if name in _TEXT_FIELDS:
                    if isinstance(value, str) and value:
                        out[(idx, name)] = value
                elif name == "tool_calls" and isinstance(value, list):
                    for call in value:
                        fn = call.get("function") if isinstance(call, dict) else None
                        args = fn.get("arguments") if isinstance(fn, dict) else None
                        if isinstance(args, str) and args:
                            out[(idx, "tool_calls")] = args
    return out, finished


def _set_text(obj: Any, field: tuple[int, str], old: str, new: str) -> None:
    """Write `new` where `_texts` found `old` for `field` in the parsed event `obj`."""
    idx, name = field
    for choice in obj.get("choices", ()):
        if not isinstance(choice, dict) or choice.get("index", 0) != idx:
            continue
        for holder in (choice.get("delta"), choice):
            if not isinstance(holder, dict):
                continue
            if name == "tool_calls":
                for call in holder.get("tool_calls") or ():
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and fn.get("arguments") == old:
                        fn["arguments"] = new
                        return
            elif holder.get(name) == old:
                holder[name] = new
                return


def _dump(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj)
