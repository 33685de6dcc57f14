"""Response bodies and SSE chunks of chat and text completions, built from a Plan.

Per-token chunks are assembled from pre-encoded byte templates (no JSON encoder per token)
so a simulated backend can emit hundreds of thousands of chunks per second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from loadtest.sim.common import SSE_DONE, TextSource, sse
from loadtest.sim.parse import GenRequest, Plan

FINGERPRINT = "fp_neogate_sim"


@dataclass(frozen=True, slots=True)
class Meta:
    """Identity of one response and the extra (non-OpenAI) fields it carries."""

    id: str
    created: int
    model: str
    extra: Mapping[str, Any] = field(default_factory=dict)  # first chunk and non-stream body


class Renderer(Protocol):
    """Bytes of one generation, streamed or whole."""

    req: GenRequest

    def head(self) -> bytes: ...
    def tokens(self, start: int, end: int) -> bytes: ...
    def tail(self, usage: Mapping[str, Any], last_extra: Mapping[str, Any] | None) -> bytes: ...
    def body(self, usage: Mapping[str, Any]) -> dict[str, Any]: ...


class _Base:
    object_name = ""
    chunk_object = ""

    def __init__(self, meta: Meta, req: GenRequest, plan: Plan, text: TextSource) -> None:
        self.meta = meta
        self.req = req
        self.plan = plan
        self.text = text
        self._prefix = (
            b'data: {"id":'
            + orjson.dumps(meta.id)
            + b',"object":"'
            + self.chunk_object.encode()
            + b'","created":'
            + str(meta.created).encode()
            + b',"model":'
            + orjson.dumps(meta.model)
            + b',"system_fingerprint":"'
            + FINGERPRINT.encode()
            + b'","choices":[{"index":'
        )
        self._suffix = b'}],"usage":null}\n\n' if req.include_usage else b"}]}\n\n"
        self._indices = [str(c).encode() for c in range(req.n)]

    def _envelope(self, obj: str, **fields: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.meta.id,
            "object": obj,
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": FINGERPRINT,
        }
        out.update(fields)
        return out

    def _chunk(self, choices: list[dict[str, Any]], extra: Mapping[str, Any] | None) -> bytes:
        obj = self._envelope(self.chunk_object, choices=choices)
        if self.req.include_usage:
            obj["usage"] = None
        if extra:
            obj.update(extra)
        return sse(obj)

    def _piece_chunk(self, choice: int, middle: bytes) -> bytes:
        return self._prefix + self._indices[choice] + middle + self._suffix

    def tokens(self, start: int, end: int) -> bytes:
        """Chunks for token positions [start, end) of every choice, choices interleaved."""
        out: list[bytes] = []
        for pos in range(start, end):
            for choice in range(self.req.n):
                out.append(self._piece_chunk(choice, self._middle(choice, pos)))
        return b"".join(out)

    def _middle(self, choice: int, pos: int) -> bytes:
        raise NotImplementedError

    def tail(self, usage: Mapping[str, Any], last_extra: Mapping[str, Any] | None) -> bytes:
        """Finish chunks, the usage chunk when asked for, and [DONE]."""
        parts = [
            self._chunk([self._finish(c)], last_extra if c == self.req.n - 1 else None)
            for c in range(self.req.n)
        ]
        if self.req.include_usage:
            parts.append(sse(self._envelope(self.chunk_object, choices=[], usage=dict(usage))))
        parts.append(SSE_DONE)
        return b"".join(parts)

    def _finish(self, choice: int) -> dict[str, Any]:
        raise NotImplementedError


class ChatRenderer(_Base):
    """`chat.completion` bodies and `chat.completion.chunk` events."""

    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _tool_call(self, choice: int, arguments: str) -> dict[str, Any]:
        assert self.plan.tool is not None
        return {
            "index": 0,
            "id": self.plan.tool_ids[choice],
            "type": "function",
            "function": {"name": self.plan.tool.name, "arguments": arguments},
        }

    def head(self) -> bytes:
        """The first chunk of every choice: the assistant role."""
        parts = []
        for c in range(self.req.n):
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
            if self.plan.tool is not None:
                delta = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [self._tool_call(c, "")],
                }
            choice = {"index": c, "delta": delta, "logprobs": None, "finish_reason": None}
            parts.append(self._chunk([choice], self.meta.extra if c == 0 else None))
        return b"".join(parts)

    def _middle(self, choice: int, pos: int) -> bytes:
        piece = self.text.encoded(self.plan.pieces[choice][pos])
        if self.plan.tool is not None:
            delta = b'{"tool_calls":[{"index":0,"function":{"arguments":' + piece + b"}}]}"
        elif pos < self.plan.reasoning_per_choice:
            delta = b'{"reasoning_content":' + piece + b"}"
        else:
            delta = b'{"content":' + piece + b"}"
        return b',"delta":' + delta + b',"logprobs":null,"finish_reason":null'

    def _finish(self, choice: int) -> dict[str, Any]:
        return {
            "index": choice,
            "delta": {},
            "logprobs": None,
            "finish_reason": self.plan.finish_reason,
        }

    def body(self, usage: Mapping[str, Any]) -> dict[str, Any]:
        """The non-streamed `chat.completion` object."""
        choices = []
        split = self.plan.reasoning_per_choice
        for c, pieces in enumerate(self.plan.pieces):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces[split:])}
            if split:
                message["reasoning_content"] = "".join(pieces[:split])
            if self.plan.tool is not None:
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [self._tool_call(c, "".join(pieces))],
                }
            choices.append(
                {
                    "index": c,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self.plan.finish_reason,
                }
            )
        out = self._envelope(self.object_name, choices=choices, usage=dict(usage))
        out.update(self.meta.extra)
        return out


class CompletionRenderer(_Base):
    """`text_completion` bodies and stream events."""

    object_name = "text_completion"
    chunk_object = "text_completion"

    def head(self) -> bytes:
        """Text completions have no role chunk."""
        return b""

    def _middle(self, choice: int, pos: int) -> bytes:
        piece = self.text.encoded(self.plan.pieces[choice][pos])
        return b',"text":' + piece + b',"logprobs":null,"finish_reason":null'

    def tokens(self, start: int, end: int) -> bytes:
        """Token chunks; the sim's extra fields ride on the very first one."""
        if start == 0 and end > 0 and self.meta.extra:
            first = self._chunk([self._text_choice(0, 0)], self.meta.extra)
            rest = [self._piece_chunk(c, self._middle(c, 0)) for c in range(1, self.req.n)]
            return first + b"".join(rest) + super().tokens(1, end)
        return super().tokens(start, end)

    def _text_choice(self, choice: int, pos: int) -> dict[str, Any]:
        text = self.plan.pieces[choice][pos]
        return {"index": choice, "text": text, "logprobs": None, "finish_reason": None}

    def _finish(self, choice: int) -> dict[str, Any]:
        return {
            "index": choice,
            "text": "",
            "logprobs": None,
            "finish_reason": self.plan.finish_reason,
        }

    def body(self, usage: Mapping[str, Any]) -> dict[str, Any]:
        """The non-streamed `text_completion` object."""
        choices = [
            {
                "index": c,
                "text": "".join(pieces),
                "logprobs": None,
                "finish_reason": self.plan.finish_reason,
            }
            for c, pieces in enumerate(self.plan.pieces)
        ]
        out = self._envelope(self.object_name, choices=choices, usage=dict(usage))
        out.update(self.meta.extra)
        return out


def renderer_for(meta: Meta, req: GenRequest, plan: Plan, text: TextSource) -> Renderer:
    """The renderer of the request's endpoint."""
    cls = ChatRenderer if req.endpoint == "chat" else CompletionRenderer
    return cls(meta, req, plan, text)
