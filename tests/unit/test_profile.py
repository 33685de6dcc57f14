"""Measured profiles: the shipped files, interpolation in batch and context, loading by name or path."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, parse_config
from gateway.profiles import load_profile, shipped_profiles
from policies.costmodel import GpuModel
from policies.profile import Profile, parse_profile


def test_the_four_profiles_ship_with_their_provenance() -> None:
    assert set(shipped_profiles()) >= {
        "llama-3.1-8b-h100",
        "llama-3.1-70b-h100",
        "llama-3.1-8b-h200",
        "llama-3.1-70b-2xh200-tp2",
    }
    for name in shipped_profiles():
        spec = load_profile(name)
        assert spec.name == name
        assert spec.source and spec.measured and spec.describes


def test_h200_figures_are_the_measured_ones() -> None:
    spec = load_profile("llama-3.1-8b-h200")
    assert spec.decode_tokens_per_s[1024][384] == 17540
    assert spec.decode_tokens_per_s[4096][128] == 6036
    assert spec.decode_tokens_per_s[256][512] == 31206
    assert spec.prefill_tokens_per_s == {512: 41900, 2048: 46500, 8192: 39900}
    tp2 = load_profile("llama-3.1-70b-2xh200-tp2")
    assert tp2.decode_tokens_per_s[1024][192] == 5834
    assert tp2.decode_tokens_per_s[4096][64] == 2147


def test_seventy_b_tp2_costs_match_the_issue_at_7_dollars_an_hour() -> None:
    gpu = GpuModel.from_profile(load_profile("llama-3.1-70b-2xh200-tp2"), 7.0)
    # $7/h / 3600 / T(b): 1/51 -> $38.1/M, 1/2817 -> $0.690/M, 1/4806 -> $0.405/M.
    assert gpu.cost_per_output_token(1) * 1e6 == pytest.approx(38.13, abs=0.01)
    assert gpu.cost_per_output_token(64) * 1e6 == pytest.approx(0.690, abs=0.001)
    assert gpu.cost_per_output_token(128) * 1e6 == pytest.approx(0.405, abs=0.001)


def test_interpolation_is_linear_in_batch_per_context_and_linear_in_context() -> None:
    p = Profile.from_spec(load_profile("llama-3.1-8b-h200"))
    # On a measured point.
    assert p.decode_tokens_per_s(32, 1024) == 5023
    # Batch 48 at context 1024: halfway between 32 (5023) and 64 (8476).
    assert p.decode_tokens_per_s(48, 1024) == pytest.approx((5023 + 8476) / 2)
    # Batch 32 at context 2560: halfway between 1024 (5023) and 4096 (3472) in context.
    assert p.decode_tokens_per_s(32, 2560) == pytest.approx((5023 + 3472) / 2)
    # Batch 64 at context 640: between 256 and 1024. At 256, batch 64 lies between 32 (5664)
    # and 256 (26788): 5664 + 21124 * 32 / 224 = 8681.71; at 1024 it is 8476 measured.
    at256 = 5664 + (26788 - 5664) * 32 / 224
    assert p.decode_tokens_per_s(64, 640) == pytest.approx(at256 + (8476 - at256) * 384 / 768)
    # Below the first batch point: proportional to batch (4096 curve: 190 at 1 -> 8: 1274).
    assert p.decode_tokens_per_s(4, 4096) == pytest.approx(190 + (1274 - 190) * 3 / 7)
    # Past the last measured batch: flat; past the measured contexts: the nearest curve.
    assert p.decode_tokens_per_s(256, 4096) == 6036
    assert p.decode_tokens_per_s(32, 32768) == 3472
    assert p.decode_tokens_per_s(32, 10) == 5664
    # No context given: the reference curve (the one nearest 1024 tokens).
    assert p.reference_context == 1024
    assert p.decode_tokens_per_s(64) == 8476


def test_prefill_speed_by_prompt_length() -> None:
    p = Profile.from_spec(load_profile("llama-3.1-8b-h200"))
    assert p.prefill_tokens_per_s(512) == 41900
    assert p.prefill_tokens_per_s(1280) == pytest.approx((41900 + 46500) / 2)
    assert p.prefill_tokens_per_s(100) == 41900  # clamped below
    assert p.prefill_tokens_per_s(65536) == 39900  # clamped above
    assert p.prefill_time_s(8192) == pytest.approx(8192 / 39900)
    assert p.prefill_time_s(0) == 0.0


def test_a_flat_profile_is_one_curve_for_every_context() -> None:
    spec = parse_profile("decode_tokens_per_s: {1: 100, 10: 800}\nprefill_tokens_per_s: 5000\n")
    p = Profile.from_spec(spec)
    assert p.decode_tokens_per_s(10, 100) == p.decode_tokens_per_s(10, 100_000) == 800
    assert p.prefill_tokens_per_s(50_000) == 5000


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("- 1\n- 2\n", "mapping"),
        ("decode_tokens_per_s: {1024: {0: 10}}\n", "positive"),
        ("decode_tokens_per_s: {1: 10}\nspeed: 3\n", "Extra inputs"),
        ("decode_tokens_per_s: [1, 2\n", "YAML"),
    ],
)
def test_bad_profile_text_says_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_profile(text)


CONFIG = """
backends:
  - name: gpu
    kind: vllm
    base_url: http://127.0.0.1:9/v1
    models: {m: m}
    gpu:
      price_per_hour: 3.5
      profile: PROFILE
models:
  - name: m
    backends: [gpu]
"""


def test_gpu_profile_accepts_a_shipped_name() -> None:
    config = parse_config(CONFIG.replace("PROFILE", "llama-3.1-8b-h200"))
    gpu = config.backend("gpu").gpu
    assert gpu is not None and gpu.profile.name == "llama-3.1-8b-h200"
    assert gpu.profile.decode_tokens_per_s[4096][1] == 190


def test_gpu_profile_accepts_a_file_relative_to_the_policy(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text(
        "name: mine\nsource: my bench\nmeasured: 2026-12-01\n"
        "decode_tokens_per_s: {1: 50, 16: 600}\nprefill_tokens_per_s: 3000\nmax_batch: 16\n",
        encoding="utf-8",
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(CONFIG.replace("PROFILE", "mine.yaml"), encoding="utf-8")
    from gateway.config import load_config

    gpu = load_config(policy).backend("gpu").gpu
    assert gpu is not None and gpu.profile.name == "mine" and gpu.profile.max_batch == 16
    assert gpu.profile.measured == "2026-12-01"
    assert GpuModel.from_spec(gpu).throughput(16) == 600


def test_an_unknown_profile_is_refused_naming_the_shipped_ones() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(CONFIG.replace("PROFILE", "h900-dreams"))
    text = str(err.value)
    assert "backends.0.gpu" in text and "llama-3.1-8b-h200" in text and "line" in text
