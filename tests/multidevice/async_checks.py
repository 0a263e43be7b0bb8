"""Run with 2 simulated CPU devices: async RL on split meshes (1 rollout + 1 train device).

Checks: the weight reshard puts every weight on the rollout device with the source's values; an
on-policy async run (max_staleness 0) on split meshes equals a sync run on the train device alone,
bit for bit; a max_staleness 1 run keeps its staleness bound. Prints one JSON line."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from tiny_policy import AsciiTokenizer, docs, letters_reward, tiny_model  # noqa: E402

from memagent_jax.config import load_config  # noqa: E402
from memagent_jax.data.loader import loader_state, make_loader, restore_loader  # noqa: E402
from memagent_jax.models import MeshConfig, make_mesh  # noqa: E402
from memagent_jax.rl.async_trainer import AsyncTrainer, WeightBroker, build_async_meshes  # noqa: E402
from memagent_jax.rl.trainer import Trainer  # noqa: E402

TOK = AsciiTokenizer()
reward = letters_reward


def cfg_for(out, *extra):
    return load_config(None, [
        "agent.memory_template=Q{prompt}M{memory}C{chunk}>", "agent.final_template=Q{prompt}M{memory}>",
        "agent.first_memory=-", "agent.chunk_size=12", "agent.max_chunks=3", "agent.max_memory_tokens=4",
        "agent.max_final_new_tokens=4", "agent.question_budget=64", "rollout.group_size=4",
        "rollout.engine=static", "rl.train_batch_size=2", "rl.gen_batch_size=2", "rl.mini_batch_size=1",
        "rl.filter_groups=false", "optim.lr=0.01", "optim.warmup_steps=1", "trainer.total_steps=3",
        "trainer.save_every=100", f"trainer.out_dir={out}", "trainer.progress=false",
        "trainer.async_checkpoint=false", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", *extra])


def make(cls, cfg, **kwargs):
    it = make_loader(docs(16, 30, seed=3), batch_size=2, seed=5, shuffle=True, shard_index=0, shard_count=1)
    return cls(cfg, tiny_model(), TOK, it, reward_fn=reward,
               data_state=(lambda: loader_state(it), lambda s: restore_loader(it, s)), **kwargs)


def params(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)]


def main(out: Path) -> None:
    devices = jax.devices()
    assert len(devices) == 2, devices
    split = ["rollout.mode=async", "mesh.rollout_devices=1"]
    train_mesh, rollout_mesh = build_async_meshes(cfg_for(out, *split))
    result = {"train_devices": [d.id for d in train_mesh.devices.flat],
              "rollout_devices": [d.id for d in rollout_mesh.devices.flat]}

    # the reshard: every weight on the rollout device, equal to the source
    model = tiny_model()
    from memagent_jax.models import shard_state

    shard_state(model, train_mesh)
    broker = WeightBroker(rollout_mesh)
    result["sync_seconds"] = broker.publish(model, 0)
    _, rolled = broker.latest()
    src = dict(nnx.to_flat_state(nnx.state(model)))
    dst = dict(nnx.to_flat_state(nnx.state(rolled)))
    result["reshard_equal"] = all(np.array_equal(np.asarray(src[k].get_value()), np.asarray(v.get_value()))
                                  for k, v in dst.items())
    result["reshard_on_rollout_device"] = all(
        {d.id for d in v.get_value().devices()} == set(result["rollout_devices"]) for v in dst.values())

    # on-policy async on split meshes == sync on the train device
    sync = make(Trainer, cfg_for(out / "sync"), mesh=make_mesh(MeshConfig(1, 1, 1), devices[1:]))
    assert sync.run() == "done"
    expected = params(sync)
    sync.close()
    cfg = cfg_for(out / "async0", *split, "rl.max_staleness=0")
    tm, rm = build_async_meshes(cfg)
    a = make(AsyncTrainer, cfg, mesh=tm, rollout_mesh=rm)
    assert a.run() == "done"
    result["on_policy_max_diff"] = max(float(np.max(np.abs(x - y))) for x, y in zip(expected, params(a)))
    a.close()

    # bounded staleness on split meshes
    cfg = cfg_for(out / "async1", *split, "rl.max_staleness=1", "trainer.total_steps=4")
    tm, rm = build_async_meshes(cfg)
    a = make(AsyncTrainer, cfg, mesh=tm, rollout_mesh=rm)
    assert a.run() == "done"
    a.close()
    rows = [json.loads(line) for line in (out / "async1" / "metrics.jsonl").read_text().splitlines()]
    result["staleness_max"] = max(r["async/staleness_max"] for r in rows)
    result["steps"] = len(rows)
    print(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
