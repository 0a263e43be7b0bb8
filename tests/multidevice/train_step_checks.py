"""Run with 8 simulated CPU devices: one full Trainer update (scripted rollout, real update) on a
(data=2, fsdp=2, tensor=2) mesh equals the same update on one device. Prints one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from tiny_policy import AsciiTokenizer, docs, tiny_model  # noqa: E402

from memagent_jax.config import load_config  # noqa: E402
from memagent_jax.models import MeshConfig, make_mesh, shard_state  # noqa: E402
from memagent_jax.rl.trainer import Trainer  # noqa: E402
from memagent_jax.types import SampleOutput  # noqa: E402

TOK = AsciiTokenizer()


def scripted_generate(prompts, *, max_new_tokens, seed, **_):
    """Deterministic replies that depend on the prompt, with made-up sampler log-probs."""
    out = []
    for p in prompts:
        reply = TOK.encode("xyz"[len(p) % 3] + "ab"[sum(p) % 2])[:max_new_tokens]
        out.append(reply + [TOK.eos_id])
    return SampleOutput(tokens=out, logps=[[-2.0] * len(t) for t in out],
                        finish_reasons=["eos"] * len(out))


def reward(t):
    r = float(t.trajectory_id % 3 == 0)
    return r, r


def run(mesh, out_dir: str) -> list[np.ndarray]:
    cfg = load_config(None, [
        "agent.memory_template=Q{prompt}M{memory}C{chunk}>", "agent.final_template=Q{prompt}M{memory}>",
        "agent.first_memory=-", "agent.chunk_size=12", "agent.max_chunks=3",
        "agent.max_memory_tokens=4", "agent.max_final_new_tokens=4", "agent.question_budget=64",
        "rollout.group_size=4", "rl.train_batch_size=4", "rl.gen_batch_size=4",
        "rl.mini_batch_size=2", "rl.filter_groups=false", "rl.micro_batch_tokens=256",
        "rl.kl_coef=0.01", "optim.lr=0.01", "optim.warmup_steps=1",
        # eps 1e-3: Adam would otherwise turn reduction-order noise in near-zero gradients into
        # O(lr) steps (m / sqrt(v) of noise is +-1), hiding real differences behind noise.
        "optim.eps=0.001", f"trainer.out_dir={out_dir}",
        "trainer.progress=false", "trainer.async_checkpoint=false"])
    model = tiny_model(num_heads=2, num_kv_heads=2, hidden_size=32, intermediate_size=64)
    if mesh is not None:
        shard_state(model, mesh)

    def stream():
        while True:
            yield docs(4, 30, seed=1)

    trainer = Trainer(cfg, model, TOK, stream(), mesh=mesh, reward_fn=reward,
                      generate_fn=scripted_generate)
    metrics = trainer.update(trainer.collect())
    params = [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(trainer.state.params)]
    shardings = [str(getattr(x.sharding, "spec", "single")) for x in jax.tree.leaves(trainer.state.params)]
    trainer.close()
    return params, metrics, shardings


def main() -> None:
    assert jax.device_count() == 8, jax.device_count()
    tmp = sys.argv[1]
    single, m1, _ = run(None, f"{tmp}/single")
    sharded, m8, specs = run(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), f"{tmp}/sharded")
    diff = max(float(np.abs(a - b).max()) for a, b in zip(single, sharded))
    moved = max(float(np.abs(a).max()) for a in single)
    print(json.dumps({"max_param_diff": diff, "param_max": moved,
                      "grad_norm": [m1["actor/grad_norm"], m8["actor/grad_norm"]],
                      "kl": [m1["actor/kl"], m8["actor/kl"]], "specs": specs}))


if __name__ == "__main__":
    main()
