"""SSE relay: upstream events pass to the client unchanged, except the usage chunk the client did not ask for.

The relay asks every upstream for `stream_options.include_usage` so each stream
is metered from the backend's own count. When the client did not ask for usage,
the injected `"usage":null` fields and the trailing usage-only chunk are removed
again, so the client sees exactly the stream it asked for.

Every `data:` event other than `[DONE]` must be a JSON object: one that is not
(a broken upstream, a proxy that mangled the stream) is never relayed. The filter
marks it as a protocol error and keeps it in `bad_event`; the caller ends the
client's stream with an OpenAI error event, since an SDK cannot parse the bad one.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from adapters.dialects import stream_error_payload
from gateway.metering.usage import Usage

DONE: Final = b"data: [DONE]"
_NULL_USAGE: Final = (b',"usage":null', b', "usage": null', b',"usage": null')


class EventFilter:
    """Per-stream state of the relay: which events go to the client, and what they carried."""

    __slots__ = (
        "bad_event",
        "done",
        "error_seen",
        "event",
        "events",
        "meta",
        "strip_usage",
        "usage_sent",
    )

    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.done = False
        self.error_seen = False
        self.events = 0
        # The client asked for usage: whether a standard usage object went out, and the
        # chunk fields (id, model, ...) to build one from when the backend sent none.
        self.usage_sent = strip_usage
        self.meta: dict[str, object] | None = None
        self.bad_event: bytes | None = None  # the first event that is not a JSON object
        # The last event's JSON object when it is one data line that parsed as it stands
        # (None otherwise): the stream meter takes it instead of parsing the event again.
        # Read-only: the filter never changes it (a usage event is rebuilt from its own copy).
        self.event: dict[str, Any] | None = None

    def filter(self, block: bytes) -> bytes | None:
        """Return the bytes to send for one upstream event block (without framing), or None to drop."""
        self.event = None
        if block.startswith(DONE):
            self.done = True
            return None  # [DONE] is sent by the caller after the ledger row is committed
        if not block.startswith(b"data:"):
            return block  # comments, event:/id: lines pass through
        self.events += 1
        payload = block[5:].lstrip()
        obj = _loads(payload)
        if obj is None and not is_json_object(payload):  # several data lines, or not JSON
            self.bad_event = block
            return None
        # One data line only: with several, the meter joins the lines its own way.
        self.event = obj if b"\n" not in payload else None
        if self.meta is None and not self.usage_sent:
            self.meta = _chunk_meta(payload) if obj is None else _meta_of(obj)
        # Groq's usage under `x_groq` is a `"usage"` key too; an `x_groq` without one is
        # nothing to strip and passes as it came.
        if b'"usage"' in payload:
            return self._usage_event(block, payload)
        error = stream_error_payload(payload)
        if error is not None:
            # Either shape ends the stream as an error (SGLang and older vLLM send the
            # legacy top-level `"object": "error"` one); the client gets OpenAI's.
            self.error_seen = True
            return block if error is payload else b"data: " + error
        return block

    def _usage_event(self, block: bytes, payload: bytes) -> bytes | None:
        has_null = any(n in payload for n in _NULL_USAGE)
        if not self.strip_usage:
            if not self.usage_sent and not has_null and b'"usage"' in payload:
                obj = _loads(payload)
                self.usage_sent = obj is not None and isinstance(obj.get("usage"), dict)
            return block
        if has_null:
            for n in _NULL_USAGE:
                payload = payload.replace(n, b"")
            return b"data: " + payload
        obj = _loads(payload)
        if obj is None:
            return block
        if not obj.get("choices"):
            return None  # the usage-only chunk the client did not ask for
        obj.pop("usage", None)  # usage riding on a chunk that also has choices
        return b"data: " + orjson.dumps(obj)

    def usage_chunk(self, usage: Usage | None) -> bytes | None:
        """The standard usage chunk a client that asked for usage did not get from the backend.

        Groq's older streams report usage only under `x_groq.usage`; the client asked
        for `stream_options.include_usage` and gets the OpenAI chunk (`"choices": []`)
        built from what the backend reported, before `[DONE]`.
        """
        if self.usage_sent or usage is None or usage.source != "reported":
            return None
        chunk = dict(self.meta or {})
        chunk["choices"] = []
        chunk["usage"] = usage_object(usage)
        return b"data: " + orjson.dumps(chunk)


def usage_object(usage: Usage) -> dict[str, object]:
    """A `Usage` in OpenAI's wire shape (with a provider's timings where it reported them)."""
    out: dict[str, object] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    if usage.reasoning_tokens:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    t = usage.upstream_timings
    if t is not None:
        for key, value in (
            ("queue_time", t.queue_s),
            ("prompt_time", t.prompt_s),
            ("completion_time", t.completion_s),
            ("total_time", t.total_s),
        ):
            if value is not None:
                out[key] = value
    return out


_META_KEYS: Final = ("id", "object", "created", "model", "system_fingerprint")


def _chunk_meta(payload: bytes) -> dict[str, object] | None:
    obj = _loads(payload)
    return None if obj is None else _meta_of(obj)


def _meta_of(obj: dict[str, Any]) -> dict[str, object] | None:
    if "choices" not in obj:
        return None
    return {k: obj[k] for k in _META_KEYS if k in obj}


def _loads(payload: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def is_json_object(payload: bytes) -> bool:
    """Whether one event's data is a JSON object (what every chunk and error event is)."""
    try:
        return isinstance(orjson.loads(payload), dict)
    except orjson.JSONDecodeError:
        if b"\ndata:" not in payload:
            return False
    # An event may spread its data over several `data:` lines (joined by newlines).
    lines = [ln.removeprefix(b"data:").removeprefix(b" ") for ln in payload.split(b"\n")]
    try:
        return isinstance(orjson.loads(b"\n".join(lines)), dict)
    except orjson.JSONDecodeError:
        return False
