"""SSE relay: upstream events pass to the client unchanged, except the usage chunk the client did not ask for.

The relay asks every upstream for `stream_options.include_usage` so each stream
is metered from the backend's own count. When the client did not ask for usage,
the injected `"usage":null` fields and the trailing usage-only chunk are removed
again, so the client sees exactly the stream it asked for.
"""

from __future__ import annotations

from typing import Final

import orjson

from adapters.dialects import stream_error_payload

DONE: Final = b"data: [DONE]"
_NULL_USAGE: Final = (b',"usage":null', b', "usage": null', b',"usage": null')


class EventFilter:
    """Per-stream state of the relay: which events go to the client, and what they carried."""

    __slots__ = ("done", "error_seen", "events", "strip_usage")

    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.done = False
        self.error_seen = False
        self.events = 0

    def filter(self, block: bytes) -> bytes | None:
        """Return the bytes to send for one upstream event block (without framing), or None to drop."""
        if block.startswith(DONE):
            self.done = True
            return None  # [DONE] is sent by the caller after the ledger row is committed
        if not block.startswith(b"data:"):
            return block  # comments, event:/id: lines pass through
        self.events += 1
        payload = block[5:].lstrip()
        if b'"usage"' in payload or b'"x_groq"' in payload:
            return self._usage_event(block, payload)
        error = stream_error_payload(payload)
        if error is not None:
            # Either shape ends the stream as an error (SGLang and older vLLM send the
            # legacy top-level `"object": "error"` one); the client gets OpenAI's.
            self.error_seen = True
            return block if error is payload else b"data: " + error
        return block

    def _usage_event(self, block: bytes, payload: bytes) -> bytes | None:
        if not self.strip_usage:
            return block
        has_null = any(n in payload for n in _NULL_USAGE)
        if has_null:
            for n in _NULL_USAGE:
                payload = payload.replace(n, b"")
            return b"data: " + payload
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return block
        if not isinstance(obj, dict):
            return block
        if not obj.get("choices"):
            return None  # the usage-only chunk the client did not ask for
        obj.pop("usage", None)  # usage riding on a chunk that also has choices
        return b"data: " + orjson.dumps(obj)
