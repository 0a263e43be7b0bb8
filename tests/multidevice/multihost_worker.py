"""One full RL step (real sampler rollout, dynamic-sampling filter, update) plus a checkpoint save
and restore, in one of N cooperating processes (or alone with 8 devices as the reference).

usage: multihost_worker.py OUT_DIR PROCESS_ID NUM_PROCESSES PORT [ENGINE [TEMPERATURE]]
(NUM_PROCESSES=1: reference). ENGINE is rollout.engine (static, the default, or continuous);
TEMPERATURE is rollout.temperature (default 0: greedy). Writes
OUT_DIR/params_<N>proc_<ENGINE>_t<TEMPERATURE>.npz (process 0) with the final weights, and prints
a digest of every kept conversation's sampled tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

out_dir, pid, nproc, port = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
engine = sys.argv[5] if len(sys.argv) > 5 else "static"
temperature = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid)

import hashlib  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from tiny_policy import AsciiTokenizer, docs, tiny_model  # noqa: E402

from memagent_jax.config import load_config  # noqa: E402
from memagent_jax.distributed import to_host  # noqa: E402
from memagent_jax.engine import STATS  # noqa: E402
from memagent_jax.models import MeshConfig, make_mesh, shard_state  # noqa: E402
from memagent_jax.rl.trainer import Trainer  # noqa: E402

TOK = AsciiTokenizer()
G = 4


def reward(t):
    """Even documents: every member right (a zero-variance group, filtered out); odd: mixed."""
    doc = int(t.ground_truths[0][1:])
    r = 1.0 if doc % 2 == 0 else float((t.trajectory_id % G) % 2)
    return r, r


def main() -> None:
    assert jax.device_count() == 8, jax.device_count()
    cfg = load_config(None, [
        "agent.memory_template=Q{prompt}M{memory}C{chunk}>", "agent.final_template=Q{prompt}M{memory}>",
        "agent.first_memory=-", "agent.chunk_size=12", "agent.max_chunks=3",
        "agent.max_memory_tokens=4", "agent.max_final_new_tokens=4", "agent.question_budget=64",
        f"rollout.group_size={G}", f"rollout.temperature={temperature}", "rl.train_batch_size=2",
        "rl.gen_batch_size=4", "rl.mini_batch_size=1", "rl.filter_groups=true",
        "rl.micro_batch_tokens=256", "optim.lr=0.01", "optim.eps=0.001", "optim.warmup_steps=1",
        f"rollout.engine={engine}", "rollout.engine_decode_steps=2",
        # 2 engine slots per process; the static path in one call per turn
        f"rollout.max_rows_per_call={4 if engine == 'continuous' else 0}",
        f"trainer.out_dir={out_dir}/run_{nproc}proc_{engine}_t{temperature}", "trainer.progress=false",
        "trainer.async_checkpoint=false", "trainer.total_steps=1"])
    all_docs = docs(4, 30, seed=1)
    for i, d in enumerate(all_docs):  # chunk counts differ: 3, 1, 2, 3 chunks
        d["context"] = d["context"][: (36, 10, 24, 36)[i]]
        d["answers"] = [f"a{i}"]
    share = len(all_docs) // nproc
    local = all_docs[pid * share:(pid + 1) * share]  # this process's shard of the batch

    def stream():
        while True:
            yield local

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = shard_state(tiny_model(num_heads=2, num_kv_heads=2), mesh)
    trainer = Trainer(cfg, model, TOK, stream(), mesh=mesh, reward_fn=reward)
    initial = [to_host(x) for x in jax.tree.leaves(trainer.state.params)]
    update, sampled = trainer.update, hashlib.sha256()

    def recording_update(collected):  # the kept conversations' tokens, in trainer order
        for c in collected.batch.conversations:
            sampled.update(np.asarray(c.prompt + [-1] + c.response, np.int64).tobytes())
        return update(collected)

    trainer.update = recording_update
    metrics = trainer.train_step()
    trainer.save(force=True)
    trainer.checkpointer.wait()
    before = [to_host(x) for x in jax.tree.leaves(trainer.state)]
    restored, meta = trainer.checkpointer.restore(trainer.state)
    after = [to_host(x) for x in jax.tree.leaves(restored)]
    same = all(np.array_equal(a, b) for a, b in zip(before, after))
    params = [to_host(x) for x in jax.tree.leaves(trainer.state.params)]
    trainer.close()
    if jax.process_index() == 0:
        np.savez(out_dir / f"params_{nproc}proc_{engine}_t{temperature}.npz", *params)
        moved = max(float(np.abs(a - b).max()) for a, b in zip(initial, params))
        print(json.dumps({"restore_equal": same, "meta_step": meta["rl_step"], "moved": moved,
                          "kept": metrics["batch/trajectories"],
                          "gen_batches": metrics["dynamic/gen_batches"],
                          "conversations": metrics["batch/conversations"],
                          "sampled": sampled.hexdigest(),
                          "engine_calls": [STATS.prefill_calls, STATS.decode_calls]}))
    else:  # every process joined every engine call
        print(json.dumps({"engine_calls": [STATS.prefill_calls, STATS.decode_calls]}))


if __name__ == "__main__":
    main()
