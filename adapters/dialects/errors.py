"""Error bodies and error events as backends really send them -> OpenAI's `{"error": {...}}` shape.

Two shapes are in the wild. OpenAI, Groq, Together, Fireworks, Nebius and current vLLM
nest the error: `{"error": {"message", "type", "param", "code"}}`. SGLang, and vLLM
before its `ErrorResponse(error=ErrorInfo)` change, answer with the fields at the top:
`{"object": "error", "message", "type", "param", "code"}`, both as an HTTP error body
and as a `data:` event in the middle of a stream. The shapes cannot be mistaken for one
another, so every dialect reads both.
"""

from __future__ import annotations

from typing import Any

import orjson


def error_fields(obj: Any) -> dict[str, Any] | None:
    """The `{"message", "type", "param", "code"}` of a decoded error body or event; None if it is none."""
    if not isinstance(obj, dict):
        return None
    nested = obj.get("error")
    if isinstance(nested, dict):
        inner = nested
    elif obj.get("object") == "error" and isinstance(obj.get("message"), str):
        inner = obj  # the legacy local-worker shape
    else:
        return None
    message = inner.get("message")
    return {
        "message": message if isinstance(message, str) else "",
        "type": inner.get("type") if isinstance(inner.get("type"), str) else "upstream_error",
        "param": inner.get("param"),
        "code": inner.get("code"),
    }


def openai_error_body(body: bytes) -> bytes | None:
    """`body` in OpenAI's nested shape (unchanged if it already is); None if it is no error body."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        return body  # already OpenAI's shape: passes through byte for byte
    fields = error_fields(obj)
    return None if fields is None else orjson.dumps({"error": fields})


def stream_error_payload(payload: bytes) -> bytes | None:
    """The OpenAI-shaped payload of a `data:` event that reports an error; None for any other event.

    Cheap for ordinary chunks: only a payload whose head says `"object": "error"` is
    decoded (the legacy shape puts `object` first; chunks say `chat.completion.chunk`).
    """
    if payload.startswith(b'{"error"'):
        return payload
    head = payload[:64]
    if b'"object":"error"' not in head and b'"object": "error"' not in head:
        return None
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    fields = error_fields(obj)
    if fields is None:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        return payload
    return orjson.dumps({"error": fields})
