"""Token counting with a configurable BPE source and an estimated fallback, without network I/O.

Sources (``Tokenizer.from_source``):

- ``"auto"``: tiktoken's own cache file if it is already on disk, else the BPE data
  bundled in the ``bpe_openai`` wheel, else the ~4 characters/token estimate;
- ``"tiktoken"``: tiktoken's cache only (never its download path);
- ``"bpe-openai"``: the wheel's ``bpe_openai/data/<encoding>.tiktoken.gz``;
- ``"file"``: a ``.tiktoken`` file (base64 token, space, rank per line; may be gzipped);
- ``"estimate"``: no BPE at all.

Whatever fails to load falls back to the estimate and ``exact`` is then False, so
counts made with it are recorded as ``"estimated"`` rather than ``"counted"``.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import importlib.util
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

log = logging.getLogger(__name__)

TokenizerSource = Literal["auto", "tiktoken", "bpe-openai", "file", "estimate"]

# Facts of the two OpenAI encodings as tiktoken defines them (tiktoken_ext.openai_public):
# where the rank file lives, its SHA-256, the pre-tokenisation regex and special tokens.
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_BLOB = "https://openaipublic.blob.core.windows.net/encodings/"
_ENCODINGS: Final[Mapping[str, tuple[str, str, str, Mapping[str, int]]]] = {
    "cl100k_base": (
        _BLOB + "cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        _CL100K_PAT,
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    "o200k_base": (
        _BLOB + "o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _O200K_PAT,
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
}

# OpenAI's published accounting for chat prompts: every message is wrapped in
# <|start|>{role/name}\n{content}<|end|>\n (3 tokens), a name costs one more, and the
# reply is primed with <|start|>assistant<|message|> (3 tokens).
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3
# An image part is billed by resolution we cannot see here; 85 is the low-detail base.
_IMAGE_PART_TOKENS = 85
_CHARS_PER_TOKEN = 4
_NO_SPECIAL: Final[frozenset[str]] = frozenset()


def estimate_tokens(text: str) -> int:
    """About four characters per token, and at least one for any non-empty text."""
    if not text:
        return 0
    return max(1, (len(text) + _CHARS_PER_TOKEN - 1) // _CHARS_PER_TOKEN)


def tiktoken_cache_path(encoding: str, environ: Mapping[str, str] | None = None) -> Path | None:
    """Where tiktoken would keep its downloaded rank file for `encoding` (None: caching off).

    Mirrors tiktoken's own lookup (TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR, then
    <tmp>/data-gym-cache, keyed by the SHA-1 of the URL) so we can read the file
    ourselves and never reach tiktoken's download branch.
    """
    spec = _ENCODINGS.get(encoding)
    if spec is None:
        return None
    env = os.environ if environ is None else environ
    if "TIKTOKEN_CACHE_DIR" in env:
        cache_dir = env["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in env:
        cache_dir = env["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return None
    return Path(cache_dir) / hashlib.sha1(spec[0].encode()).hexdigest()


def parse_tiktoken_ranks(data: bytes) -> dict[bytes, int]:
    """Parse a .tiktoken rank file (``<base64 token> <rank>`` per line)."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if not line.strip():
            continue
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


class Tokenizer:
    """Counts tokens of texts and chat prompts; built once per app (loading costs ~0.5 s)."""

    def __init__(self, encoding: Any | None, name: str, origin: str) -> None:
        # `encoding` is a tiktoken.Encoding, or None for the estimate.
        self._enc = encoding
        self.name = name
        self.origin = origin
        core = getattr(encoding, "_core_bpe", None)
        # The Rust encoder's count without a token list (tiktoken >= 0.7), else None.
        self._buffered = core if hasattr(core, "encode_to_tiktoken_buffer") else None
        # Role names and the like: a handful of short strings, counted once each.
        self._labels: dict[str, int] = {}

    @property
    def exact(self) -> bool:
        """True when counts come from a real BPE; False for the character estimate."""
        return self._enc is not None

    @classmethod
    def estimate(cls) -> Tokenizer:
        """The no-BPE tokenizer (~4 characters per token)."""
        return cls(None, "estimate", "estimate")

    @classmethod
    def from_source(
        cls,
        source: str,
        encoding: str = "cl100k_base",
        path: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> Tokenizer:
        """Load `encoding` from `source`; never raises, never touches the network."""
        if source == "estimate":
            return cls.estimate()
        if encoding not in _ENCODINGS:
            log.warning("tokenizer: unknown encoding %r, counts are estimated", encoding)
            return cls.estimate()
        attempts: list[str]
        if source == "auto":
            attempts = ["tiktoken", "bpe-openai"]
        elif source in ("tiktoken", "bpe-openai", "file"):
            attempts = [source]
        else:
            log.warning("tokenizer: unknown source %r, counts are estimated", source)
            return cls.estimate()
        for attempt in attempts:
            try:
                data = _read_ranks(attempt, encoding, path, environ)
            except (OSError, ValueError, ImportError, binascii.Error) as exc:
                log.info("tokenizer: %s source for %s unavailable: %s", attempt, encoding, exc)
                continue
            if data is None:
                continue
            try:
                enc = _build_encoding(encoding, data)
            except (ValueError, ImportError, binascii.Error) as exc:
                log.warning("tokenizer: %s data for %s unusable: %s", attempt, encoding, exc)
                continue
            return cls(enc, encoding, attempt)
        log.warning("tokenizer: no BPE data for %s found locally, counts are estimated", encoding)
        return cls.estimate()

    def count_text(self, text: str) -> int:
        """Tokens in `text`; special-token strings in user text count as plain text."""
        if not text:
            return 0
        if self._enc is None:
            return estimate_tokens(text)
        core = self._buffered
        if core is None:
            return len(self._enc.encode_ordinary(text))
        # The count without a list of Python ints: building that list holds the GIL
        # (~20 ms for 4 MB), the buffer does not. Special tokens stay plain text, as in
        # encode_ordinary; lone surrogates are replaced as tiktoken itself does.
        try:
            buffer = core.encode_to_tiktoken_buffer(text, _NO_SPECIAL)
        except UnicodeEncodeError:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            buffer = core.encode_to_tiktoken_buffer(text, _NO_SPECIAL)
        return memoryview(buffer).nbytes // 4

    def count_messages(self, messages: Sequence[Any]) -> int:
        """Prompt tokens of an OpenAI chat `messages` list, including per-message overhead."""
        total = 0
        for message in messages:
            if not isinstance(message, Mapping):
                continue
            total += _TOKENS_PER_MESSAGE
            for key, value in message.items():
                if key == "name" and isinstance(value, str):
                    total += self.count_text(value) + _TOKENS_PER_NAME
                elif key == "content":
                    total += self._count_content(value)
                elif key == "tool_calls" and isinstance(value, list):
                    total += self._count_tool_calls(value)
                elif key == "function_call" and isinstance(value, Mapping):
                    total += self._count_function(value)
                elif key == "role" and isinstance(value, str):
                    total += self._count_label(value)
                elif key in ("tool_call_id", "refusal") and isinstance(value, str):
                    total += self.count_text(value)
        return total + _REPLY_PRIMING

    def _count_label(self, text: str) -> int:
        """`count_text` of a role: remembered for up to 256 short strings (~1 us a message)."""
        n = self._labels.get(text)
        if n is None:
            n = self.count_text(text)
            if len(text) <= 32 and len(self._labels) < 256:
                self._labels[text] = n
        return n

    def count_prompt(self, body: Mapping[str, Any]) -> int:
        """Prompt tokens of a chat, completions or embeddings request body (for estimation)."""
        messages = body.get("messages")
        if isinstance(messages, list):
            total = self.count_messages(messages)
            tools = body.get("tools") or body.get("functions")
            if isinstance(tools, list) and tools:
                total += self.count_text(_compact_json(tools))
            return total
        for key in ("prompt", "input"):
            if key in body:
                return self._count_inputs(body[key])
        return 0

    def _count_inputs(self, value: Any) -> int:
        if isinstance(value, str):
            return self.count_text(value)
        if isinstance(value, list):
            if value and all(isinstance(v, int) for v in value):
                return len(value)  # already token ids
            return sum(self._count_inputs(v) for v in value)
        return 0

    def _count_content(self, content: Any) -> int:
        if isinstance(content, str):
            return self.count_text(content)
        if not isinstance(content, list):
            return 0
        total = 0
        for part in content:
            if isinstance(part, str):
                total += self.count_text(part)
            elif isinstance(part, Mapping):
                kind = part.get("type")
                if kind in ("image_url", "input_image", "image"):
                    total += _IMAGE_PART_TOKENS
                elif isinstance(part.get("text"), str):
                    total += self.count_text(part["text"])
                elif isinstance(part.get("refusal"), str):
                    total += self.count_text(part["refusal"])
        return total

    def _count_tool_calls(self, calls: list[Any]) -> int:
        total = 0
        for call in calls:
            if isinstance(call, Mapping):
                fn = call.get("function")
                if isinstance(fn, Mapping):
                    total += self._count_function(fn)
        return total

    def _count_function(self, fn: Mapping[str, Any]) -> int:
        total = 0
        for key in ("name", "arguments"):
            value = fn.get(key)
            if isinstance(value, str):
                total += self.count_text(value)
        return total


def _compact_json(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _read_ranks(
    attempt: str, encoding: str, path: str | None, environ: Mapping[str, str] | None
) -> bytes | None:
    if attempt == "tiktoken":
        cache = tiktoken_cache_path(encoding, environ)
        if cache is None or not cache.is_file():
            return None
        return cache.read_bytes()
    if attempt == "bpe-openai":
        return gzip.decompress(_bpe_openai_data(encoding).read_bytes())
    if path is None:
        raise ValueError("source 'file' needs a path")
    raw = Path(path).read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def _bpe_openai_data(encoding: str) -> Path:
    # Locate the wheel's data without importing bpe_openai: its package import loads
    # every encoding eagerly (seconds, and a DeprecationWarning on Python 3.11).
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("bpe_openai is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"{encoding}.tiktoken.gz"


def _build_encoding(encoding: str, data: bytes) -> Any:
    import tiktoken

    _url, expected_sha256, pat_str, special = _ENCODINGS[encoding]
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        # A custom file is allowed to differ; it still needs the encoding's regex.
        log.info("tokenizer: %s rank data differs from the published file", encoding)
    return tiktoken.Encoding(
        name=f"neogate-{encoding}",
        pat_str=pat_str,
        mergeable_ranks=parse_tiktoken_ranks(data),
        special_tokens=dict(special),
    )
