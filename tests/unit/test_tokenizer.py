"""Tokenizer sources, fallbacks and chat prompt accounting."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from pathlib import Path

import pytest

from gateway.metering.tokenizer import Tokenizer, estimate_tokens, tiktoken_cache_path


@pytest.fixture(scope="module")
def cl100k() -> Tokenizer:
    return Tokenizer.from_source("bpe-openai", "cl100k_base")


def _bundled(encoding: str) -> bytes:
    spec = importlib.util.find_spec("bpe_openai")
    assert spec is not None and spec.submodule_search_locations
    base = Path(next(iter(spec.submodule_search_locations)))
    return (base / "data" / f"{encoding}.tiktoken.gz").read_bytes()


def test_bpe_openai_source_is_exact_and_matches_published_counts(cl100k: Tokenizer) -> None:
    assert cl100k.exact
    assert cl100k.origin == "bpe-openai"
    # Known cl100k_base facts: "hello world" is 2 tokens, "tiktoken is great!" is 6.
    assert cl100k.count_text("hello world") == 2
    assert cl100k.count_text("tiktoken is great!") == 6
    assert cl100k.count_text("") == 0


def test_special_token_text_is_counted_as_plain_text(cl100k: Tokenizer) -> None:
    assert cl100k.count_text("<|endoftext|>") > 1


def test_estimate_source_counts_four_chars_per_token() -> None:
    tok = Tokenizer.from_source("estimate")
    assert not tok.exact
    assert tok.count_text("abcdefgh") == 2
    assert tok.count_text("a") == 1
    assert estimate_tokens("abcde") == 2


def test_tiktoken_source_without_cache_falls_back_to_estimate(tmp_path: Path) -> None:
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path)}
    tok = Tokenizer.from_source("tiktoken", "cl100k_base", environ=env)
    assert not tok.exact


def test_tiktoken_source_reads_existing_cache_file(tmp_path: Path) -> None:
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path)}
    cache = tiktoken_cache_path("cl100k_base", env)
    assert cache is not None and cache.parent == tmp_path
    # tiktoken keys its cache by the SHA-1 of the download URL.
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    assert cache.name == hashlib.sha1(url.encode()).hexdigest()
    cache.write_bytes(gzip.decompress(_bundled("cl100k_base")))
    tok = Tokenizer.from_source("auto", "cl100k_base", environ=env)
    assert tok.exact and tok.origin == "tiktoken"
    assert tok.count_text("hello world") == 2


def test_auto_without_cache_uses_bundled_data(tmp_path: Path) -> None:
    tok = Tokenizer.from_source("auto", "cl100k_base", environ={"TIKTOKEN_CACHE_DIR": ""})
    assert tok.exact and tok.origin == "bpe-openai"


def test_file_source_plain_and_gzipped(tmp_path: Path) -> None:
    gz = tmp_path / "enc.tiktoken.gz"
    gz.write_bytes(_bundled("cl100k_base"))
    assert Tokenizer.from_source("file", "cl100k_base", str(gz)).count_text("hello world") == 2
    missing = Tokenizer.from_source("file", "cl100k_base", str(tmp_path / "nope.tiktoken"))
    assert not missing.exact


def test_broken_file_falls_back_to_estimate(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"this is not a rank file\n")
    tok = Tokenizer.from_source("file", "cl100k_base", str(bad))
    assert not tok.exact
    assert tok.count_text("abcd") == 1


def test_unknown_encoding_and_source_estimate() -> None:
    assert not Tokenizer.from_source("bpe-openai", "no_such_base").exact
    assert not Tokenizer.from_source("carrier-pigeon").exact


def test_count_messages_openai_overhead(cl100k: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "hello world"},
    ]
    expected = (
        3 + cl100k.count_text("system") + cl100k.count_text("You are a helpful assistant.")
    ) + (3 + cl100k.count_text("user") + 2)
    assert cl100k.count_messages(messages) == expected + 3


def test_count_messages_name_parts_and_tool_calls(cl100k: Tokenizer) -> None:
    base = cl100k.count_messages([{"role": "user", "content": "hi"}])
    named = cl100k.count_messages([{"role": "user", "content": "hi", "name": "bob"}])
    assert named == base + cl100k.count_text("bob") + 1
    parts = cl100k.count_messages(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}]
    )
    assert parts == base + 85
    args = '{"city": "Paris", "unit": "celsius"}'
    with_tools = cl100k.count_messages(
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": args},
                    }
                ],
            }
        ]
    )
    assert with_tools >= cl100k.count_text(args) + cl100k.count_text("weather") + 3 + 3


def test_count_prompt_request_kinds(cl100k: Tokenizer) -> None:
    assert cl100k.count_prompt({"prompt": "hello world"}) == 2
    assert cl100k.count_prompt({"input": ["hello world", "hello world"]}) == 4
    assert cl100k.count_prompt({"input": [1, 2, 3]}) == 3
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    tools = {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert cl100k.count_prompt(tools) > cl100k.count_prompt(chat)
    assert cl100k.count_prompt({}) == 0


def test_count_without_a_token_list_matches_encode_ordinary(cl100k: Tokenizer) -> None:
    enc = cl100k._enc
    for text in [
        "hello world",
        "<|endoftext|> and <|fim_prefix|>",
        "caf\u00e9 \ud800 x",
        "1234567",
    ]:
        assert cl100k.count_text(text) == len(enc.encode_ordinary(text))
