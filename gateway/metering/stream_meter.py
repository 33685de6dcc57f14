"""A streamed response's meter: the SSE events the relay sees -> one `Usage` value.

No I/O here. The relay feeds `StreamMeter` every SSE ``data:`` payload; it parses each
event once and keeps only the text it delivered (content, reasoning, tool calls), up to
`MAX_METER_CHARS` per stream: past that only the length is kept and the rest is
estimated. The raw events are never held, so a stream's meter costs at most that much
memory however long the stream runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import orjson

from gateway.metering.usage import (
    Delivered,
    TokenCounter,
    TokenSource,
    Usage,
    counted_source,
    parse_usage_object,
)

# Delivered text a stream's meter keeps for the count at its end (~256 KiB of str at
# one byte per character); beyond it, characters are only counted and estimated.
MAX_METER_CHARS = 1 << 18


def _usage_in_event(event: Mapping[str, Any]) -> Usage | None:
    usage = parse_usage_object(event.get("usage"))
    x_groq = event.get("x_groq")
    if usage is None and isinstance(x_groq, Mapping):
        usage = parse_usage_object(x_groq.get("usage"))
    return usage


class StreamMeter:
    """Meters one streamed response from the raw SSE ``data:`` payloads the relay sees.

    `feed` is called per event on the hot path: one JSON parse, keeping the usage
    object if there is one and the delivered text (bounded by `max_chars`). The
    count of that text is left to `finish`, which callers may run off the loop.
    """

    __slots__ = ("_delivered", "_done", "_usage", "events_seen")

    def __init__(self, max_chars: int = MAX_METER_CHARS) -> None:
        self._delivered = Delivered(max_chars)
        self._usage: Usage | None = None
        self._done = False
        self.events_seen = 0

    @property
    def reported(self) -> Usage | None:
        """The last usage object seen in the stream, if any."""
        return self._usage

    @property
    def saw_done(self) -> bool:
        """True once ``[DONE]`` went by."""
        return self._done

    @property
    def kept_chars(self) -> int:
        """Characters of delivered text held for the final count (what counting it costs)."""
        return self._delivered.chars

    def feed(self, block: bytes, event: Mapping[str, Any] | None = None) -> None:
        """One SSE event as relayed: its data payload, or the raw ``data: ...`` block.

        `event`: the block's JSON object when the caller parsed it already (the relay's
        filter does), so it is not parsed twice; it is only read.
        """
        self.events_seen += 1
        # Inside JSON strings quotes are escaped, so a raw `"usage"` is always a key.
        at = block.find(b'"usage"')
        if at < 0 and len(block) < 32 and b"[DONE]" in block:
            self._done = True
            return
        if event is None:
            event = _parse_event(block)
            if event is None:
                return
        if at >= 0 and _usage_object_at_or_after(block, at):  # not only "usage": null
            usage = _usage_in_event(event)
            if usage is not None:
                self._usage = usage
        choices = event.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                self._delivered.add_choice(choice, delta_key="delta")

    def delivered_tokens(self, tokenizer: TokenCounter) -> int:
        """Tokens of everything delivered so far across all choices (content, reasoning, tools)."""
        return self._delivered.count(tokenizer)

    def finish(
        self,
        completed: bool,
        tokenizer: TokenCounter,
        prompt_tokens_estimate: int,
        *,
        count_when_reported: bool = True,
    ) -> Usage:
        """The stream's Usage: reported if a usage object arrived, else counted.

        `completed` is whether the stream ended normally; without reported usage the
        delivered text is counted either way (a cut stream is billed for what was
        delivered, never for max_tokens). `count_when_reported=False` skips the
        reconciliation count when usage was reported. Text past the meter's limit is
        estimated, and the counts are then labelled "estimated".
        """
        del completed  # the outcome is recorded by the caller; counting is the same
        if self._usage is not None:
            counted = self.delivered_tokens(tokenizer) if count_when_reported else None
            return replace(
                self._usage,
                counted_prompt_tokens=prompt_tokens_estimate,
                counted_completion_tokens=counted,
            )
        counted = self.delivered_tokens(tokenizer)
        source: TokenSource = (
            "estimated" if self._delivered.overflowed else counted_source(tokenizer)
        )
        return Usage(
            prompt_tokens=prompt_tokens_estimate,
            completion_tokens=counted,
            source=source,
            counted_prompt_tokens=prompt_tokens_estimate,
            counted_completion_tokens=counted,
        )


def _parse_event(block: bytes) -> Mapping[str, Any] | None:
    """The JSON object of one event (payload or full SSE block); None when it is not one."""
    if block[:1] != b"{":
        # A full block: join its data lines (SSE allows several) and drop other fields.
        lines = [ln.rstrip(b"\r") for ln in block.split(b"\n")]
        data = [ln[5:].removeprefix(b" ") for ln in lines if ln.startswith(b"data:")]
        block = b"\n".join(data) if data else block.strip()
    try:
        event = orjson.loads(block)
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, Mapping) else None


def _usage_object_at_or_after(payload: bytes, at: int) -> bool:
    """True if some `"usage"` key from `at` on holds an object: a top-level `"usage": null`
    may come before `x_groq.usage` in the same event."""
    while at >= 0:
        if _object_follows(payload, at + 7):
            return True
        at = payload.find(b'"usage"', at + 7)
    return False


def _object_follows(payload: bytes, pos: int) -> bool:
    """True if the JSON value after the key at `pos` starts with '{'."""
    n = len(payload)
    while pos < n and payload[pos] in b" \t\r\n:":
        pos += 1
    return pos < n and payload[pos] == 0x7B  # '{'
