"""Decode with LoRA adapters: applied at every step vs merged into the weights first (same run).

The trainer's rollout samples from the adapted policy either way; this measures which is faster
for generation: `applied` runs the sampler on the model with its adapters (two extra skinny
matmuls per target per token), `merged` folds W + (alpha/rank) A @ B first (once per call here,
as the trainer does once per RL step) and decodes the plain model. Prints one JSON line.

    .venv/bin/python bench/lora_rollout.py [--rank 8] [--rows 128] [--prompt 96] [--new 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from timing import interleaved, ratio_spread, spread  # noqa: E402

from memagent_jax import sampler  # noqa: E402
from memagent_jax.models import ModelConfig, init_model  # noqa: E402
from memagent_jax.models.lora import LoraConfig, add_lora, merged, split_trainable  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--prompt", type=int, default=96)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64, help="the demo's tiny policy by default")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=5.0)
    a = p.parse_args()
    cfg = ModelConfig(vocab_size=1024, hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                      num_layers=a.layers, num_heads=4, num_kv_heads=4, tie_word_embeddings=True,
                      max_position_embeddings=512, scan_layers=False)
    model = add_lora(init_model(cfg), LoraConfig(rank=a.rank, alpha=2.0 * a.rank))
    graphdef, adapters, frozen = split_trainable(model)  # trained-looking adapters (B != 0)
    adapters = jax.tree.map(lambda x: x + 0.02 * np.random.default_rng(0).standard_normal(x.shape)
                            .astype(x.dtype), adapters)
    model = nnx.merge(graphdef, adapters, frozen)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(4, 1000, a.prompt).tolist() for _ in range(a.rows)]

    def run(policy_fn):
        return lambda: sampler.generate(policy_fn(), prompts, max_new_tokens=a.new, temperature=0.0)

    t0 = time.perf_counter()
    jax.block_until_ready(jax.tree.leaves(nnx.state(merged(model))))
    merge_s = time.perf_counter() - t0
    times, outs = interleaved({"applied": run(lambda: model), "merged": run(lambda: merged(model))},
                              repeats=a.repeats, min_seconds=a.min_seconds)
    same = outs["applied"].tokens == outs["merged"].tokens
    print(json.dumps({
        "bench": "lora_rollout", "machine": platform.processor() or platform.machine(),
        "rank": a.rank, "rows": a.rows, "prompt": a.prompt, "new_tokens": a.new,
        "hidden": a.hidden, "layers": a.layers,
        "applied_s": spread(times["applied"]), "merged_s": spread(times["merged"]),
        "merged_speedup": ratio_spread(times["applied"], times["merged"]),
        "merge_once_s": round(merge_s, 4), "same_tokens": same,
    }))


if __name__ == "__main__":
    main()
