"""Held-out scenarios: a fleet, a trace shape, prices and rate limits drawn from a seed at run time.

`neogate simulate --suite heldout --seed N` scores the router on scenarios nobody tuned it
for: each is drawn from documented ranges (below, and docs/benchmarks.md), so a claim made
on the shipped scenarios can be checked on seeds chosen after the code was written. The
same (seed, index) always gives the same scenario; `--save-heldout DIR` writes them as
ordinary scenario files.

Ranges (uniform unless said; "8B" and "70B" fleets with equal odds):

- 8B fleet: 1-3 GPUs, all one profile, `llama-3.1-8b-h100` ($1.80-$3.50/h, KV 412k tokens)
  or `llama-3.1-8b-h200` ($2.50-$4.50/h, KV 830k tokens, at most 256 sequences);
  reserved, or on_demand with odds 1/4. 1-3 providers: input $0.02-$0.25, output $0.03-$0.30
  per M (output >= input).
- 70B fleet: one `llama-3.1-70b-2xh200-tp2` pair ($5-$9/h, KV 333k tokens); 1-2 providers:
  input $0.40-$1.00, output $0.50-$1.20 per M.
- Providers: Groq-like (TTFT ~0.2 s, ~750 tokens/s per stream) or Together-like (TTFT
  ~0.35 s, ~200 tokens/s), each with odds 1/2; with odds 1/4 the cheapest has a TPM limit
  (8B: 100k-600k, 70B: 50k-300k tokens per minute).
- Trace: steady (offered concurrency 8B: 2-48, 70B: 2-10), bursty, or diurnal (peak
  8B: 10-48, 70B: 4-12), 600 s (diurnal 1200 s); interactive share 0.6-0.95, the rest batch;
  interactive prompt median 300-2000 tokens (sigma 0.9), output median 80-300.
- With odds 1/4 one provider changes its price at a time in the middle half of the trace,
  by a factor 0.4-1.5.
"""

from __future__ import annotations

import random
from typing import Any

from loadtest.simulate.scenario_file import LoadedScenario, ScenarioFile
from loadtest.simulate.suite import SCENARIO_DIR

DEFAULT_COUNT = 10

_GROQ_LIKE = {
    "ttft_median_s": 0.20,
    "ttft_sigma": 0.35,
    "prefill_tokens_per_s": 40000,
    "itl_median_s": 0.00133,
    "itl_sigma": 0.15,
}
_TOGETHER_LIKE = {
    "ttft_median_s": 0.35,
    "ttft_sigma": 0.35,
    "prefill_tokens_per_s": 20000,
    "itl_median_s": 0.005,
    "itl_sigma": 0.20,
}
_SLO = {
    "interactive": {"max_ttft_s": 1.0, "max_itl_s": 0.05},
    "batch": {"max_total_s": 600, "max_queue_wait_s": 30},
}


def _r(rng: random.Random, lo: float, hi: float, nd: int = 2) -> float:
    return round(rng.uniform(lo, hi), nd)


def heldout_data(seed: int, index: int) -> dict[str, Any]:
    """The scenario file (as a mapping) of held-out scenario `index` of `seed`."""
    rng = random.Random(f"neogate-heldout/{seed}/{index}")
    big = rng.random() < 0.5
    name = f"heldout-{seed}-{index}"
    if big:
        model, served = "llama-3.3-70b", "meta-llama/Llama-3.3-70B-Instruct"
        profile, n_gpus, price, kv, max_batch = (
            "llama-3.1-70b-2xh200-tp2",
            1,
            (5.0, 9.0),
            333000,
            None,
        )
        n_prov, p_in, p_out, tpm = rng.randint(1, 2), (0.40, 1.00), (0.50, 1.20), (50, 300)
    else:
        model, served = "llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct"
        if rng.random() < 0.5:
            profile, price, kv, max_batch = "llama-3.1-8b-h100", (1.8, 3.5), 412000, None
        else:
            profile, price, kv, max_batch = "llama-3.1-8b-h200", (2.5, 4.5), 830000, 256
        n_gpus = rng.randint(1, 3)
        n_prov, p_in, p_out, tpm = rng.randint(1, 3), (0.02, 0.25), (0.03, 0.30), (100, 600)
    mode = "on_demand" if rng.random() < 0.25 else "reserved"
    gpu = {"price_per_hour": _r(rng, *price), "mode": mode, "profile": profile}
    backends: list[dict[str, Any]] = []
    physics: dict[str, Any] = {}
    for g in range(n_gpus):
        gname = f"gpu-{g}"
        backends.append(
            {
                "name": gname,
                "kind": "vllm",
                "base_url": "http://sim.invalid/v1",
                "models": {model: served},
                "gpu": gpu,
            }
        )
        physics[gname] = {"profile": profile, "kv_capacity_tokens": kv}
        if max_batch is not None:
            physics[gname]["max_batch"] = max_batch
    providers: dict[str, Any] = {}
    prices: list[tuple[float, str]] = []
    for k in range(n_prov):
        pname = f"prov-{k}"
        groq_like = rng.random() < 0.5
        pin = _r(rng, *p_in, 3)
        pout = max(pin, _r(rng, *p_out, 3))
        backends.append(
            {
                "name": pname,
                "kind": "groq" if groq_like else "together",
                "base_url": "http://sim.invalid/v1",
                "models": {model: f"{served}-{pname}"},
                "price": {"input_per_million": pin, "output_per_million": pout},
            }
        )
        providers[pname] = dict(_GROQ_LIKE if groq_like else _TOGETHER_LIKE)
        prices.append((pin + pout, pname))
    if rng.random() < 0.25:
        cheapest = min(prices)[1]
        providers[cheapest]["tpm_limit"] = 1000 * rng.randint(*tpm)
    shape = rng.choice(("steady", "bursty", "diurnal"))
    trace: dict[str, Any] = {"shape": shape, "duration_s": 1200 if shape == "diurnal" else 600}
    if shape == "steady":
        trace["concurrency"] = _r(rng, 2, 10 if big else 48, 1)
    elif shape == "diurnal":
        trace["concurrency"] = _r(rng, 4, 12, 1) if big else _r(rng, 10, 48, 1)
        trace["low"] = 1
    share = _r(rng, 0.6, 0.95)
    trace["classes"] = {"interactive": share, "batch": round(1 - share, 2)}
    trace["shapes"] = {
        "interactive": {
            "prompt_median": _r(rng, 300, 2000, 0),
            "output_median": _r(rng, 80, 300, 0),
        }
    }
    changes = []
    if rng.random() < 0.25:
        pname = rng.choice([p for _, p in prices])
        b = next(x for x in backends if x["name"] == pname)["price"]
        f = rng.uniform(0.4, 1.5)
        changes.append(
            {
                "at_s": _r(rng, 0.25, 0.75) * trace["duration_s"],
                "backend": pname,
                "input_per_million": round(b["input_per_million"] * f, 4),
                "output_per_million": round(b["output_per_million"] * f, 4),
            }
        )
    desc = (
        f"held-out (seed {seed}, #{index}): {n_gpus} x {profile} at ${gpu['price_per_hour']}/h "
        f"{mode}; {n_prov} provider(s); {shape} trace"
    )
    return {
        "name": name,
        "description": desc,
        "policy": {
            "backends": backends,
            "models": [
                {
                    "name": model,
                    "backends": [b["name"] for b in backends],
                    "policy": {"kind": "cost"},
                    "expected_output_tokens": 200,
                }
            ],
            "slo_classes": _SLO,
        },
        "simulate": {
            "model": model,
            "seed": seed * 100 + index,
            "trace": trace,
            "physics": physics,
            "providers": providers,
            "price_changes": changes,
        },
    }


def heldout_scenario(seed: int, index: int) -> LoadedScenario:
    """Held-out scenario `index` of `seed`, checked by the scenario file's own validators."""
    spec = ScenarioFile.model_validate(
        heldout_data(seed, index), context={"base_dir": SCENARIO_DIR}
    )
    assert spec.policy is not None
    return LoadedScenario(spec, spec.policy, SCENARIO_DIR)


def heldout_suite(seed: int, count: int = DEFAULT_COUNT) -> list[LoadedScenario]:
    """`count` held-out scenarios of `seed`."""
    return [heldout_scenario(seed, i) for i in range(count)]
