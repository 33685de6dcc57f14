"""OpenAI request bodies -> what the simulated backends generate: token counts, plans, prefix cache.

Prompt token rule (deterministic, documented so tests can predict it):

- text costs ceil(len(text) / 4) tokens;
- chat: each message costs 4 + its text (string content, or the text parts of a content list;
  every non-text part costs 85; an assistant's `tool_calls` cost their JSON), plus 3 for the
  reply priming; `tools`, when present, cost the length of their JSON;
- completions / embeddings: a string costs its text, a list of ints is token ids (one each).

Completion length: the model "wants" to say `natural_tokens` tokens (the backend's
`default_max_tokens`); it stops there with finish_reason "stop" unless `max_tokens`
(or `max_completion_tokens`) is smaller, in which case it stops at the limit with "length".
`ignore_eos: true` (vLLM's field) makes it run to max_tokens. `min_tokens` raises the natural
length. On chat, model ids containing "reasoning" spend the first half of every answer on
reasoning (`reasoning_content`, counted in reasoning_tokens). A tool-call answer costs
ceil(len(arguments) / 4) tokens. Several completions prompts are answered as one prompt.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from loadtest.sim.common import TextSource

MESSAGE_OVERHEAD = 4
REPLY_PRIMING = 3
NON_TEXT_PART_TOKENS = 85
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_N = 128


class RequestError(Exception):
    """A request the backend rejects; rendered as an OpenAI error with `status`."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


def text_tokens(text: str) -> int:
    """ceil(len(text) / 4): the sim's tokenizer."""
    return (len(text) + 3) // 4


def split_model(name: str) -> tuple[str, str | None]:
    """`llama@cut` -> ("llama", "cut"); the suffix selects a fault."""
    model, sep, fault = name.rpartition("@")
    return (model, fault) if sep and model and fault else (name, None)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The function call a tool-using answer makes."""

    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class GenRequest:
    """What matters of a chat or completions request."""

    endpoint: Literal["chat", "completion"]
    model: str
    model_fault: str | None
    stream: bool
    include_usage: bool
    n: int
    max_tokens: int | None
    ignore_eos: bool
    min_tokens: int
    prompt_tokens: int
    prompt_text: str
    tool: ToolCall | None


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """What matters of an embeddings request."""

    model: str
    model_fault: str | None
    inputs: tuple[str, ...]
    prompt_tokens: int
    dimensions: int | None
    encoding_format: str


def load_body(raw: bytes) -> dict[str, Any]:
    """Parse a JSON object body or raise RequestError."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("Request body must be a JSON object.")
    return body


def _model(body: dict[str, Any]) -> tuple[str, str | None]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("you must provide a model parameter", "model")
    return split_model(model)


def _int_field(body: dict[str, Any], name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi and value > hi):
        bound = f"between {lo} and {hi}" if hi else f"an integer >= {lo}"
        raise RequestError(f"'{name}' must be {bound}, got {value!r}.", name)
    return value


def _stream_fields(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean.", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object.", "stream_options")
    if options and not stream:
        raise RequestError(
            "'stream_options' is only allowed when 'stream' is true.", "stream_options"
        )
    return stream, bool(options and options.get("include_usage") is True)


def _content_text(content: Any) -> tuple[str, int]:
    """Text of a message content and the token cost of its non-text parts."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    if isinstance(content, list):
        texts: list[str] = []
        extra = 0
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            else:
                extra += NON_TEXT_PART_TOKENS
        return "".join(texts), extra
    raise RequestError("message content must be a string, an array of parts or null.", "messages")


def _tool_call(body: dict[str, Any], text: TextSource, key: int) -> ToolCall | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RequestError("'tools' must be an array of tool objects.", "tools")
    functions = [t.get("function") or {} for t in tools]
    chosen = functions[0]
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        matches = [f for f in functions if f.get("name") == wanted]
        if not matches:
            raise RequestError(f"tool_choice names unknown function {wanted!r}.", "tool_choice")
        chosen = matches[0]
    name = chosen.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError("every tool needs a function name.", "tools")
    return ToolCall(name, fake_arguments(chosen.get("parameters"), text, key))


def fake_arguments(parameters: Any, text: TextSource, key: int) -> str:
    """JSON arguments that follow the top level of a JSON schema."""
    props = parameters.get("properties") if isinstance(parameters, dict) else None
    args: dict[str, Any] = {}
    for i, (name, schema) in enumerate((props or {}).items()):
        kind = schema.get("type") if isinstance(schema, dict) else None
        if isinstance(schema, dict) and schema.get("enum"):
            args[name] = schema["enum"][0]
        elif kind in ("integer", "number"):
            args[name] = 42 if kind == "integer" else 3.5
        elif kind == "boolean":
            args[name] = True
        elif kind == "array":
            args[name] = []
        elif kind == "object":
            args[name] = {}
        else:
            args[name] = "".join(text.pieces(key + i * 31, 2)).strip()
    return orjson.dumps(args).decode()


def parse_chat(body: dict[str, Any], text: TextSource) -> GenRequest:
    """Validate a chat completions body."""
    model, fault = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array.", "messages")
    tokens = REPLY_PRIMING
    parts: list[str] = []
    for msg in messages:
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise RequestError("each message needs a 'role'.", "messages")
        content, extra = _content_text(msg.get("content"))
        if msg.get("tool_calls"):
            content += orjson.dumps(msg["tool_calls"]).decode()
        tokens += MESSAGE_OVERHEAD + text_tokens(content) + extra
        parts.append(f"<{msg['role']}>{content}")
    if body.get("tools"):
        tokens += text_tokens(orjson.dumps(body["tools"]).decode())
    prompt = "".join(parts)
    max_tokens = _int_field(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens", 1)
    stream, include_usage = _stream_fields(body)
    return GenRequest(
        endpoint="chat",
        model=model,
        model_fault=fault,
        stream=stream,
        include_usage=include_usage,
        n=_int_field(body, "n", 1, MAX_N) or 1,
        max_tokens=max_tokens,
        ignore_eos=body.get("ignore_eos") is True,
        min_tokens=_int_field(body, "min_tokens", 0) or 0,
        prompt_tokens=tokens,
        prompt_text=prompt,
        tool=_tool_call(body, text, zlib.crc32(prompt.encode())),
    )


def _prompt_inputs(value: Any, param: str) -> tuple[list[str], int]:
    """Prompts of a completions/embeddings body: (texts, token count)."""
    if isinstance(value, str):
        return [value], text_tokens(value)
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [" ".join(map(str, value))], len(value)
        texts: list[str] = []
        tokens = 0
        for item in value:
            sub, count = _prompt_inputs(item, param)
            if len(sub) != 1 or (isinstance(item, list) and not item):
                raise RequestError(f"'{param}' has an invalid element.", param)
            texts.extend(sub)
            tokens += count
        return texts, tokens
    raise RequestError(f"'{param}' must be a string, an array of strings or token ids.", param)


def parse_completion(body: dict[str, Any]) -> GenRequest:
    """Validate a (legacy) completions body; several prompts are joined into one."""
    model, fault = _model(body)
    texts, tokens = _prompt_inputs(body.get("prompt"), "prompt")
    stream, include_usage = _stream_fields(body)
    max_tokens = _int_field(body, "max_tokens", 1)
    return GenRequest(
        endpoint="completion",
        model=model,
        model_fault=fault,
        stream=stream,
        include_usage=include_usage,
        n=_int_field(body, "n", 1, MAX_N) or 1,
        max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        ignore_eos=body.get("ignore_eos") is True,
        min_tokens=_int_field(body, "min_tokens", 0) or 0,
        prompt_tokens=max(tokens, 1),
        prompt_text="\n".join(texts),
        tool=None,
    )


def parse_embedding(body: dict[str, Any]) -> EmbedRequest:
    """Validate an embeddings body."""
    model, fault = _model(body)
    texts, tokens = _prompt_inputs(body.get("input"), "input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise RequestError("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    return EmbedRequest(
        model=model,
        model_fault=fault,
        inputs=tuple(texts),
        prompt_tokens=tokens,
        dimensions=_int_field(body, "dimensions", 1, 8192),
        encoding_format=encoding,
    )


@dataclass(frozen=True, slots=True)
class Plan:
    """The answer decided up front: per choice one piece of text per token."""

    tokens_per_choice: int
    reasoning_per_choice: int
    finish_reason: str
    pieces: tuple[tuple[str, ...], ...]
    tool: ToolCall | None
    tool_ids: tuple[str, ...]


def make_plan(
    req: GenRequest, text: TextSource, natural_tokens: int, tool_ids: tuple[str, ...] = ()
) -> Plan:
    """Decide length, finish reason and content of every choice of `req`."""
    key = zlib.crc32(req.prompt_text.encode())
    if req.tool is not None:
        args = req.tool.arguments
        arg_pieces = tuple(args[i : i + 4] for i in range(0, len(args), 4)) or ("",)
        finish = "tool_calls"
        if req.max_tokens is not None and len(arg_pieces) > req.max_tokens:
            arg_pieces, finish = arg_pieces[: req.max_tokens], "length"
        return Plan(len(arg_pieces), 0, finish, (arg_pieces,) * req.n, req.tool, tool_ids)
    natural = max(natural_tokens, req.min_tokens, 1)
    if req.max_tokens is not None and (req.ignore_eos or natural > req.max_tokens):
        count, finish = req.max_tokens, "length"
    else:
        count, finish = natural, "stop"
    reasoning = count // 2 if req.endpoint == "chat" and "reasoning" in req.model.lower() else 0
    pieces = tuple(tuple(text.pieces(key + c * 7919, count)) for c in range(req.n))
    return Plan(count, reasoning, finish, pieces, None, ())


class PrefixCache:
    """Automatic prefix caching: 16-token (64-character) blocks chained by hash, LRU-bounded.

    A prompt's cached tokens are the whole leading blocks seen before, never the full prompt
    (the last token is always computed, as in vLLM).
    """

    BLOCK_CHARS = 64
    BLOCK_TOKENS = 16

    def __init__(self, max_blocks: int = 65536) -> None:
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._max = max_blocks

    def lookup_and_insert(self, prompt_text: str, prompt_tokens: int) -> int:
        """Cached tokens of this prompt; its blocks are cached from now on."""
        data = prompt_text.encode()
        h = 0
        hits = 0
        missed = False
        for start in range(0, len(data) - self.BLOCK_CHARS + 1, self.BLOCK_CHARS):
            h = zlib.crc32(data[start : start + self.BLOCK_CHARS], h)
            if not missed and h in self._blocks:
                hits += 1
                self._blocks.move_to_end(h)
            else:
                missed = True
                self._blocks[h] = None
        while len(self._blocks) > self._max:
            self._blocks.popitem(last=False)
        cached = hits * self.BLOCK_TOKENS
        if cached >= prompt_tokens:
            cached = (prompt_tokens - 1) // self.BLOCK_TOKENS * self.BLOCK_TOKENS
        return max(cached, 0)
