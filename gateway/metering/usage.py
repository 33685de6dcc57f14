"""Pure metering: an upstream response or its streamed events -> one `Usage` value, and its cost.

No I/O here. Streams are metered by `StreamMeter`, which the relay feeds every SSE
``data:`` payload; it parses each event once and keeps only the text it delivered
(content, reasoning, tool calls), up to `MAX_METER_CHARS` per stream: past that only
the length is kept and the rest is estimated. The raw events are never held, so a
stream's meter costs at most that much memory however long the stream runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Literal, Protocol, TypeGuard

import orjson

from gateway.metering.tokenizer import estimate_tokens

TokenSource = Literal["reported", "counted", "estimated"]

_MILLION = Decimal(1_000_000)
NUSD_PER_USD = 1_000_000_000
# Delivered text a stream's meter keeps for the count at its end (~256 KiB of str at
# one byte per character); beyond it, characters are only counted and estimated.
MAX_METER_CHARS = 1 << 18


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
    t = UpstreamTimings(
        queue_s=_float(obj.get("queue_time")),
        prompt_s=_float(obj.get("prompt_time")),
        completion_s=_float(obj.get("completion_time")),
        total_s=_float(obj.get("total_time")),
    )
    return None if t == UpstreamTimings() else t


def parse_usage_object(obj: Any) -> Usage | None:
    """An OpenAI `usage` object -> Usage(source="reported"); None if it has no counts."""
    if not isinstance(obj, Mapping):
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
        upstream_timings=_timings(obj),
        cache_write_tokens=written,
    )


def _usage_in_event(event: Mapping[str, Any]) -> Usage | None:
    usage = parse_usage_object(event.get("usage"))
    x_groq = event.get("x_groq")
    if usage is None and isinstance(x_groq, Mapping):
        usage = parse_usage_object(x_groq.get("usage"))
    return usage


# --- delivered content ------------------------------------------------------------


class _Delivered:
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
        delivered = _Delivered()
        for choice in choices:
            delivered.add_choice(choice, delta_key="message")
        counted = delivered.count(counter)
    reported = parse_usage_object(body.get("usage"))
    if reported is None and isinstance(body.get("x_groq"), Mapping):
        reported = parse_usage_object(body["x_groq"].get("usage"))
    if reported is not None:
        return replace(
            reported,
            counted_prompt_tokens=prompt_tokens_estimate,
            counted_completion_tokens=counted,
        )
    source = counted_source(counter)
    return Usage(
        prompt_tokens=prompt_tokens_estimate or 0,
        completion_tokens=counted or 0,
        source=source,
        counted_prompt_tokens=prompt_tokens_estimate,
        counted_completion_tokens=counted,
    )


class StreamMeter:
    """Meters one streamed response from the raw SSE ``data:`` payloads the relay sees.

    `feed` is called per event on the hot path: one JSON parse, keeping the usage
    object if there is one and the delivered text (bounded by `max_chars`). The
    count of that text is left to `finish`, which callers may run off the loop.
    """

    __slots__ = ("_delivered", "_done", "_usage", "events_seen")

    def __init__(self, max_chars: int = MAX_METER_CHARS) -> None:
        self._delivered = _Delivered(max_chars)
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


# --- cost ---------------------------------------------------------------------------


def to_decimal(value: Decimal | float | int | str) -> Decimal:
    """Exact decimal of a price: floats go through their shortest repr (0.05 -> 0.05)."""
    if isinstance(value, Decimal):
        return value
    return Decimal(str(value))


@dataclass(frozen=True, slots=True)
class UnitPrices:
    """USD per million tokens in force for one attempt, and the price book version.

    `cached_input_per_m` None means cached input is billed at the input price. For a
    local GPU the caller passes chargeback prices from the batch-aware cost model at
    the batch the request shared.
    """

    input_per_m: Decimal
    output_per_m: Decimal
    cached_input_per_m: Decimal | None = None
    version: str = ""
    # Prompt tokens written to a provider's prompt cache (None: the input price).
    cache_write_input_per_m: Decimal | None = None
    # The same prices in the ledger's integer nano-dollars per million, converted once.
    nusd: tuple[int, int, int | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cached = self.cached_input_per_m
        nusd = (
            usd_to_nusd(self.input_per_m),
            usd_to_nusd(self.output_per_m),
            None if cached is None else usd_to_nusd(cached),
        )
        object.__setattr__(self, "nusd", nusd)

    @classmethod
    def of(
        cls,
        input_per_m: Decimal | float | str,
        output_per_m: Decimal | float | str,
        cached_input_per_m: Decimal | float | str | None = None,
        version: str = "",
        *,
        cache_write_input_per_m: Decimal | float | str | None = None,
    ) -> UnitPrices:
        """Build from plain numbers (floats are taken at their printed value)."""
        return cls(
            to_decimal(input_per_m),
            to_decimal(output_per_m),
            None if cached_input_per_m is None else to_decimal(cached_input_per_m),
            version,
            None if cache_write_input_per_m is None else to_decimal(cache_write_input_per_m),
        )


def cost_usd(usage: Usage, prices: UnitPrices) -> Decimal:
    """Exact cost in USD (Decimal: sums of many small costs must not drift like floats)."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    written = min(usage.cache_write_tokens, usage.prompt_tokens - cached)
    uncached = usage.prompt_tokens - cached - written
    cached_price = (
        prices.input_per_m if prices.cached_input_per_m is None else prices.cached_input_per_m
    )
    write_price = (
        prices.input_per_m
        if prices.cache_write_input_per_m is None
        else prices.cache_write_input_per_m
    )
    total = (
        uncached * prices.input_per_m
        + cached * cached_price
        + written * write_price
        + usage.completion_tokens * prices.output_per_m
    )
    return total / _MILLION


def usd_to_nusd(usd: Decimal) -> int:
    """USD -> integer nano-dollars (the ledger's unit), rounded half-even."""
    return int((usd * NUSD_PER_USD).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def nusd_to_usd(nusd: int) -> Decimal:
    """Integer nano-dollars -> USD."""
    return Decimal(nusd) / NUSD_PER_USD
