"""The edge's reading of a client request: just what routing and metering need, the rest untouched.

The whole body is kept as a dict so unknown fields (tools, response_format,
logprobs, seed, anything new) reach the upstream exactly as sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.config import RequestLimitSpec
from gateway.errors import InvalidJSON, InvalidRequest

Endpoint = Literal["chat", "completions", "embeddings"]
PATHS: dict[Endpoint, str] = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}


@dataclass(frozen=True, slots=True)
class InboundRequest:
    """A validated client request."""

    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool  # the client itself asked for the usage chunk
    max_tokens: int | None
    n: int
    size: int = 0  # bytes of the raw body (how much counting its prompt may cost)


def parse_request(raw: bytes, endpoint: Endpoint, limits: RequestLimitSpec) -> InboundRequest:
    """Validate the fields the gateway relies on; raise InvalidRequest naming the bad param."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"We could not parse the JSON body of your request: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        raise InvalidRequest("you must provide a model parameter", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string", param="model")
    stream = _opt_bool(body, "stream")
    if endpoint == "embeddings" and stream:
        raise InvalidRequest("embeddings cannot be streamed", param="stream")
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise InvalidRequest("'stream_options' must be an object", param="stream_options")
        include_usage = _opt_bool(stream_options, "include_usage", "stream_options.")
    max_tokens = _opt_int(body, "max_completion_tokens") or _opt_int(body, "max_tokens")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise InvalidRequest(
            f"max_tokens {max_tokens} is over this key's limit of {limits.max_tokens}",
            param="max_tokens",
        )
    n = _opt_int(body, "n") or 1
    if n > limits.max_n:
        raise InvalidRequest(f"n {n} is over this key's limit of {limits.max_n}", param="n")
    _check_payload(body, endpoint, limits)
    return InboundRequest(endpoint, body, model, stream, include_usage, max_tokens, n, len(raw))


def _check_payload(body: dict[str, Any], endpoint: Endpoint, limits: RequestLimitSpec) -> None:
    if endpoint == "chat":
        messages = body.get("messages")
        if messages is None:
            raise InvalidRequest("you must provide a messages parameter", param="messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty array", param="messages")
        if len(messages) > limits.max_messages:
            raise InvalidRequest(
                f"{len(messages)} messages is over this key's limit of {limits.max_messages}",
                param="messages",
            )
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidRequest(
                    f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]"
                )
    elif endpoint == "completions":
        prompt = body.get("prompt")
        if prompt is None:
            raise InvalidRequest("you must provide a prompt parameter", param="prompt")
        if not isinstance(prompt, str | list):
            raise InvalidRequest("'prompt' must be a string or an array", param="prompt")
    else:
        inp = body.get("input")
        if inp is None:
            raise InvalidRequest("you must provide an input parameter", param="input")
        if not isinstance(inp, str | list):
            raise InvalidRequest("'input' must be a string or an array", param="input")


def _opt_bool(obj: dict[str, Any], key: str, prefix: str = "") -> bool:
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{prefix}{key}' must be a boolean", param=prefix + key)
    return value


def _opt_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"'{key}' must be a positive integer", param=key)
    return value


def upstream_body(req: InboundRequest, backend_model: str) -> bytes:
    """The body sent upstream: the client's, with the backend's model id and usage requested."""
    if req.endpoint == "embeddings" or not req.stream:
        if req.body["model"] == backend_model:
            return orjson.dumps(req.body)
        return orjson.dumps({**req.body, "model": backend_model})
    stream_options = dict(req.body.get("stream_options") or {})
    stream_options["include_usage"] = True
    return orjson.dumps({**req.body, "model": backend_model, "stream_options": stream_options})


def prompt_text_parts(req: InboundRequest) -> list[str]:
    """Prompt text for completions and embeddings, for token estimation."""
    value = req.body.get("prompt" if req.endpoint == "completions" else "input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []
