"""Pure metering: what one attempt consumed as a `Usage` value, reported upstream or counted.

No I/O here. A non-streamed answer's body is metered by `usage_from_response`; the
text it delivered (content, reasoning, tool calls) is counted per choice by
`Delivered`, which the stream meter (`gateway.metering.stream_meter`) shares.
`reconcile` flags reported counts that stray from the gateway's own; what a Usage
costs is `gateway.metering.money`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeGuard

from gateway.metering.tokenizer import estimate_tokens

TokenSource = Literal["reported", "counted", "estimated"]


class TokenCounter(Protocol):
    """What metering needs from a tokenizer (gateway.metering.tokenizer.Tokenizer satisfies it)."""

    @property
    def exact(self) -> bool: ...

    def count_text(self, text: str) -> int: ...


@dataclass(frozen=True, slots=True)
class UpstreamTimings:
    """Provider-reported timings in seconds (Groq: queue_time, prompt_time, ...)."""

    queue_s: float | None = None
    prompt_s: float | None = None
    completion_s: float | None = None
    total_s: float | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one attempt consumed and where the counts came from.

    `prompt_tokens` includes `cached_tokens`; `completion_tokens` includes
    `reasoning_tokens` (the OpenAI convention). `counted_*` are the gateway's own
    counts, kept beside reported ones for reconciliation (None: not counted).
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    source: TokenSource = "reported"
    counted_prompt_tokens: int | None = None
    counted_completion_tokens: int | None = None
    upstream_timings: UpstreamTimings | None = None
    # Prompt tokens written to the provider's prompt cache (part of `prompt_tokens`,
    # OpenRouter's `prompt_tokens_details.cache_write_tokens`): priced at the write rate.
    cache_write_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# --- parsing upstream usage objects ------------------------------------------------


def _int(value: Any) -> int | None:
    if type(value) is int:  # the common case first (bool is not `int` here)
        return value if value > 0 else 0
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, float) and value >= 0:
        return int(value)
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _timings(obj: Mapping[str, Any]) -> UpstreamTimings | None:
    queue, prompt = obj.get("queue_time"), obj.get("prompt_time")
    completion, total = obj.get("completion_time"), obj.get("total_time")
    if queue is None and prompt is None and completion is None and total is None:
        return None  # most providers: no timings, and nothing to build
    t = UpstreamTimings(
        queue_s=_float(queue),
        prompt_s=_float(prompt),
        completion_s=_float(completion),
        total_s=_float(total),
    )
    return None if t == _NO_TIMINGS else t


_NO_TIMINGS = UpstreamTimings()


def parse_usage_object(
    obj: Any,
    *,
    counted_prompt_tokens: int | None = None,
    counted_completion_tokens: int | None = None,
) -> Usage | None:
    """An OpenAI `usage` object -> Usage(source="reported"); None if it has no counts.

    `counted_*`: the gateway's own counts to keep beside the reported ones.
    """
    if type(obj) is not dict and not isinstance(obj, Mapping):
        return None
    prompt = _int(obj.get("prompt_tokens"))
    if prompt is None:
        prompt = _int(obj.get("input_tokens"))  # Responses-style naming
    completion = _int(obj.get("completion_tokens"))
    if completion is None:
        completion = _int(obj.get("output_tokens"))
    total = _int(obj.get("total_tokens"))
    if prompt is None and completion is None:
        if total is None:
            return None
        prompt = total  # embeddings report only prompt/total; total alone means input
    if prompt is None:
        prompt = max(0, (total or 0) - (completion or 0))
    if completion is None:
        # Embeddings omit completion_tokens: the remainder of total, usually zero.
        completion = max(0, (total or prompt) - prompt)
    cached = written = 0
    details = obj.get("prompt_tokens_details") or obj.get("input_tokens_details")
    if isinstance(details, Mapping):
        cached = min(_int(details.get("cached_tokens")) or 0, prompt)
        written = min(_int(details.get("cache_write_tokens")) or 0, prompt - cached)
    reasoning = 0
    details = obj.get("completion_tokens_details") or obj.get("output_tokens_details")
    if isinstance(details, Mapping):
        reasoning = min(_int(details.get("reasoning_tokens")) or 0, completion)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
        source="reported",
        counted_prompt_tokens=counted_prompt_tokens,
        counted_completion_tokens=counted_completion_tokens,
        upstream_timings=_timings(obj),
        cache_write_tokens=written,
    )


# --- delivered content ------------------------------------------------------------


class Delivered:
    """Text delivered per choice index: content, reasoning, tool-call names and arguments.

    Keeps at most `limit` characters in all; what comes after is only measured
    (`overflow` characters per choice), and counted as ~4 characters per token.
    """

    __slots__ = ("chars", "limit", "overflow", "parts")

    def __init__(self, limit: int | None = None) -> None:
        self.parts: dict[int, list[str]] = {}
        self.overflow: dict[int, int] = {}
        self.chars = 0
        self.limit = limit

    def add_choice(self, choice: Any, *, delta_key: str) -> None:
        # Called for every streamed event: parsed JSON is plain dicts, so `type(x) is dict`
        # answers first; isinstance(x, Mapping) goes through the ABC machinery in Python
        # (~2 calls each, three per event, measured with cProfile).
        if type(choice) is not dict and not isinstance(choice, Mapping):
            return
        index = choice.get("index", 0)
        index = index if isinstance(index, int) else 0
        texts: list[str] = []
        body = choice.get(delta_key)
        if body is None or (type(body) is not dict and not isinstance(body, Mapping)):
            text = choice.get("text")  # legacy completions
            if isinstance(text, str):
                texts.append(text)
        else:
            # A chat choice's `text` is not part of the chat protocol: Together sends each
            # piece in both `text` and `delta.content` (adapters.dialects), so only the
            # delta counts.
            for key in ("content", "reasoning_content", "reasoning", "refusal"):
                value = body.get(key)
                if isinstance(value, str):
                    texts.append(value)
            calls = body.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    fn = call.get("function") if _is_mapping(call) else None
                    if _is_mapping(fn):
                        _add_function(texts, fn)
            fn = body.get("function_call")
            if fn is not None and _is_mapping(fn):
                _add_function(texts, fn)
        for value in texts:
            self._add(index, value)

    def _add(self, index: int, value: str) -> None:
        if not value:
            return
        if self.limit is not None and self.chars + len(value) > self.limit:
            self.overflow[index] = self.overflow.get(index, 0) + len(value)
            return
        self.chars += len(value)
        self.parts.setdefault(index, []).append(value)

    @property
    def overflowed(self) -> bool:
        return bool(self.overflow)

    def count(self, tokenizer: TokenCounter) -> int:
        total = 0
        for index in sorted(self.parts.keys() | self.overflow.keys()):
            text = "".join(self.parts.get(index, ()))
            # Text past the limit was only measured: ~4 characters per token.
            extra = -(-self.overflow.get(index, 0) // 4)
            if text or extra:
                # Never zero when something was delivered.
                total += max(1, tokenizer.count_text(text) + extra)
        return total


def _is_mapping(value: object) -> TypeGuard[Mapping[str, Any]]:
    """isinstance(value, Mapping), answered without the ABC check for dicts and None."""
    if value is None:
        return False
    return type(value) is dict or isinstance(value, Mapping)


def _add_function(parts: list[str], fn: Mapping[str, Any]) -> None:
    for key in ("name", "arguments"):
        value = fn.get(key)
        if isinstance(value, str):
            parts.append(value)


class _Estimate:
    """Character estimate used when no tokenizer was passed."""

    exact = False

    def count_text(self, text: str) -> int:
        return estimate_tokens(text)


def counted_source(tokenizer: TokenCounter) -> TokenSource:
    """The source label for counts made with `tokenizer`."""
    return "counted" if tokenizer.exact else "estimated"


def usage_from_response(
    body: Mapping[str, Any],
    *,
    tokenizer: TokenCounter | None = None,
    prompt_tokens_estimate: int | None = None,
) -> Usage:
    """Usage of a non-streamed chat, completions or embeddings response body.

    Reported usage wins; the gateway's count of the delivered text is kept beside it
    when a tokenizer is given. Without reported usage the delivered text is counted
    and the prompt falls back to `prompt_tokens_estimate`.
    """
    counter: TokenCounter = tokenizer if tokenizer is not None else _Estimate()
    counted: int | None = None
    choices = body.get("choices")
    if isinstance(choices, list):
        delivered = Delivered()
        for choice in choices:
            delivered.add_choice(choice, delta_key="message")
        counted = delivered.count(counter)
    reported = parse_usage_object(
        body.get("usage"),
        counted_prompt_tokens=prompt_tokens_estimate,
        counted_completion_tokens=counted,
    )
    if reported is None and isinstance(body.get("x_groq"), Mapping):
        reported = parse_usage_object(
            body["x_groq"].get("usage"),
            counted_prompt_tokens=prompt_tokens_estimate,
            counted_completion_tokens=counted,
        )
    if reported is not None:
        return reported
    source = counted_source(counter)
    return Usage(
        prompt_tokens=prompt_tokens_estimate or 0,
        completion_tokens=counted or 0,
        source=source,
        counted_prompt_tokens=prompt_tokens_estimate,
        counted_completion_tokens=counted,
    )


# --- reconciliation -----------------------------------------------------------------


def reconcile(
    usage: Usage, threshold: float, *, min_tokens: int = 8, include_prompt: bool = False
) -> bool:
    """True when reported and gateway-counted tokens diverge beyond `threshold`.

    A pair diverges when |reported - counted| exceeds both `threshold` x reported
    and `min_tokens` (absolute slack: tokenizer differences make tiny counts noisy).
    Completions are compared by default; prompts only with `include_prompt`,
    because the upstream's chat template (e.g. Llama's default system header)
    adds tokens the gateway cannot see, a systematic gap rather than an error.
    """
    if usage.source != "reported":
        return False
    pairs = [(usage.completion_tokens, usage.counted_completion_tokens)]
    if include_prompt:
        pairs.append((usage.prompt_tokens, usage.counted_prompt_tokens))
    for reported, counted in pairs:
        if counted is None:
            continue
        gap = abs(reported - counted)
        if gap > min_tokens and gap > threshold * max(reported, 1):
            return True
    return False
