"""Async RL across 2 processes x 2 CPU devices: each process samples on its own rollout device
(mesh.rollout_devices=2: one per process) while one train mesh spans both processes' other
devices. Runs 3 RL steps at rl.max_staleness=1, saves, restores. Prints one JSON line.

usage: async_multihost_worker.py OUT_DIR PROCESS_ID NUM_PROCESSES PORT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

out_dir, pid, nproc, port = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from tiny_policy import AsciiTokenizer, docs, letters_reward, tiny_model  # noqa: E402

from memagent_jax.config import load_config  # noqa: E402
from memagent_jax.distributed import to_host  # noqa: E402
from memagent_jax.models import shard_state  # noqa: E402
from memagent_jax.rl.async_trainer import AsyncTrainer, build_async_meshes  # noqa: E402

TOK = AsciiTokenizer()
reward = letters_reward


def main() -> None:
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    cfg = load_config(None, [
        "agent.memory_template=Q{prompt}M{memory}C{chunk}>", "agent.final_template=Q{prompt}M{memory}>",
        "agent.first_memory=-", "agent.chunk_size=12", "agent.max_chunks=3", "agent.max_memory_tokens=4",
        "agent.max_final_new_tokens=4", "agent.question_budget=64", "rollout.group_size=4",
        "rollout.engine=static", "rollout.mode=async", "mesh.rollout_devices=2", "mesh.data=1",
        "mesh.fsdp=-1", "mesh.tensor=1", "rl.max_staleness=1", "rl.train_batch_size=2",
        "rl.gen_batch_size=2", "rl.mini_batch_size=1", "rl.filter_groups=false", "optim.lr=0.01",
        "optim.warmup_steps=1", "trainer.total_steps=3", "trainer.save_every=100",
        f"trainer.out_dir={out_dir}/run", "trainer.progress=false", "trainer.async_checkpoint=false"])
    mesh, rollout_mesh = build_async_meshes(cfg)
    local = docs(8, 30, seed=1 + pid)  # this process's share of the documents

    def stream():
        i = 0
        while True:
            yield [local[i % len(local)]]
            i += 1

    model = shard_state(tiny_model(), mesh)
    trainer = AsyncTrainer(cfg, model, TOK, stream(), mesh=mesh, rollout_mesh=rollout_mesh, reward_fn=reward)
    initial = [to_host(x) for x in jax.tree.leaves(trainer.state.params)]
    versions = []
    update = trainer.update

    def recording_update(collected):
        versions.append((trainer.rl_step, sorted({c.policy_version for c in collected.batch.conversations}),
                         len(collected.batch.trajectories)))
        return update(collected)

    trainer.update = recording_update
    status = trainer.run()
    trainer.checkpointer.wait()
    before = [to_host(x) for x in jax.tree.leaves(trainer.state)]
    restored, meta = trainer.checkpointer.restore(trainer.state)
    same = all(np.array_equal(a, b) for a, b in zip(before, [to_host(x) for x in jax.tree.leaves(restored)]))
    params = [to_host(x) for x in jax.tree.leaves(trainer.state.params)]
    trainer.close()
    moved = max(float(np.abs(a - b).max()) for a, b in zip(initial, params))
    digest = float(sum(np.abs(p).sum() for p in params))
    print(json.dumps({"status": status, "versions": versions, "restore_equal": same,
                      "meta_step": meta["rl_step"], "moved": moved, "digest": digest,
                      "rollout_devices": [d.id for d in rollout_mesh.devices.flat],
                      "train_devices": [d.id for d in mesh.devices.flat]}))


if __name__ == "__main__":
    main()
