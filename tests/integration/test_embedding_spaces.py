"""Embeddings stay in one vector space: never routed by cost across embedding models (issue 13, 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI

from gateway.config import ConfigError, parse_config
from loadtest.sim.provider import ProviderOptions, create_provider_app
from tests.conftest import GatewayFactory
from tests.integration.test_routing_e2e import PUBLIC, policy, sims


def provider(name: str, url: str, model_id: str, usd_per_m: float, **extra: Any) -> dict[str, Any]:
    price = {"input_per_million": usd_per_m, "output_per_million": usd_per_m}
    return {"name": name, "kind": "openai_compatible", "base_url": url,
            "models": {PUBLIC: model_id}, "price": price, **extra}  # fmt: skip


async def dims_and_backend(oai: AsyncOpenAI) -> tuple[int, str]:
    raw = await oai.embeddings.with_raw_response.create(model=PUBLIC, input=["a b c"])
    reply = raw.parse()
    return len(reply.data[0].embedding), raw.headers["x-neogate-backend"]


@pytest.mark.parametrize("declared", [False, True])
async def test_embeddings_route_only_within_the_first_backends_space(
    gateway_factory: GatewayFactory, tmp_path: Path, declared: bool
) -> None:
    # `dear` returns 768-dim vectors, `cheap` 1024-dim: different embedding models. Chat goes
    # to the cheaper one; embeddings only where the model's first backend's vectors live,
    # unless the operator declares both to be one embedding model (as providers name one
    # model differently).
    async with sims(
        dear=create_provider_app(
            ProviderOptions(model_ids=("bge-large",), embedding_dims=768, ttft_s_mean=0.01)
        ),
        cheap=create_provider_app(
            ProviderOptions(model_ids=("bge-large-en-v1.5",), embedding_dims=1024, ttft_s_mean=0.01)
        ),
    ) as s:
        same = {"embeddings": {PUBLIC: "BAAI/bge-large-en-v1.5"}} if declared else {}
        data = policy(
            [provider("dear", s.urls["dear"], "bge-large", 0.2, **same),
             provider("cheap", s.urls["cheap"], "bge-large-en-v1.5", 0.1, **same)],
            ["dear", "cheap"],
            tmp_path,
        )  # fmt: skip
        gw = await gateway_factory(data)
        async with AsyncOpenAI(base_url=gw.v1, api_key="anonymous", max_retries=0) as oai:
            chat = await oai.chat.completions.with_raw_response.create(
                model=PUBLIC, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert chat.headers["x-neogate-backend"] == "cheap"
            answers = {await dims_and_backend(oai) for _ in range(4)}
    if declared:
        assert answers == {(1024, "cheap")}  # one space: by cost
    else:
        assert answers == {(768, "dear")}  # never by cost across spaces


CONFIG = """
backends:
  - name: gpu-a
    kind: vllm
    base_url: http://127.0.0.1:9/v1
    models: {embed: BAAI/bge-small-en-v1.5}
    gpu: {price_per_hour: 2.95}
    embeddings: {embed: BAAI/bge-small-en-v1.5}
  - name: sim-groq
    kind: groq
    base_url: http://127.0.0.1:9/v1
    models: {embed: nomic-embed-text-v1.5}
    price: {input_per_million: 0.01, output_per_million: 0.0}
    embeddings: {embed: nomic-ai/nomic-embed-text-v1.5}
models:
  - name: embed
    backends: [gpu-a, sim-groq]
"""


def test_a_config_mixing_embedding_models_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(CONFIG)
    text = str(err.value)
    assert "model 'embed' mixes embedding models" in text
    assert "gpu-a serves BAAI/bge-small-en-v1.5" in text
    assert "sim-groq serves nomic-ai/nomic-embed-text-v1.5" in text
    assert "line" in text
    stray = CONFIG.replace("embeddings: {embed: BAAI/bge-small-en-v1.5}", "embeddings: {x: y}")
    with pytest.raises(ConfigError, match="embeddings names models this backend does not map"):
        parse_config(stray)
