"""Projected RL step time of a TPU config in sync vs async mode: an ESTIMATE, not a measurement.

Two lanes per step: rollout (prefill + decode on the engine) and training (log-prob pass +
gradients). Sync mode runs them one after the other on all chips; async mode on their own chips at
the same time, so its step is the slower lane (`rollout.mode: async`, full overlap assumed; the
weight sync is not counted). Each lane's seconds come from the model's arithmetic at 100% of peak
(`compile.recipe_estimate`: matmul FLOPs at peak, decode steps bound by HBM) and, with
`--sync-compile/--async-compile` (the JSON of `memagent-jax compile CONFIG --topology T --estimate
--json`), from the compiler's own per-program estimates.

Both sources count every reply at its token budget. The replies' real lengths change the two
modes differently, so the decode part is rescaled by a simulation of the engine's slots over one
step's conversations (each document's turns one after the other; a slot takes the next waiting
turn the moment it frees) with reply lengths drawn from the demo's measured distribution
(`reply_share` in `bench/async_rl.py`'s JSON line: lengths as shares of their budgets): sync decode
lasts until the step's last conversation ends (the slots drain: the tail), async decode is the
step's tokens over full slots (the next step's documents fill the slots the tail frees).

    python bench/async_projection.py --sync qwen2_5_7b_memagent_v5p32 \\
        --async qwen2_5_7b_memagent_v5p32_async --topology v5p-32 --bench async_rl.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import heapq
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)  # bench/async_rl.py's reply_share quantiles


def draw_shares(rng: np.random.Generator, quantiles: list[float], n: int) -> np.ndarray:
    """n reply lengths as shares of the budget from a measured distribution's quantiles (inverse
    CDF, linear between them; the lowest share below q10 is taken as q10's half)."""
    probs = np.array([0.0, *QUANTILES])
    values = np.array([quantiles[0] / 2, *quantiles])
    return np.interp(rng.random(n), probs, values)


def engine_steps(turn_lengths: np.ndarray, slots: int) -> int:
    """Decode steps until every trajectory's turns (rows of `turn_lengths`, in order) are done on
    `slots` slots; a trajectory's next turn waits for its previous one; free slots take the
    earliest waiting turn."""
    free = [0] * slots  # when each slot frees
    heapq.heapify(free)
    ready = [(0, i, 0) for i in range(turn_lengths.shape[0])]  # (ready time, trajectory, turn)
    heapq.heapify(ready)
    end = 0
    while ready:
        t_ready, i, k = heapq.heappop(ready)
        start = max(t_ready, heapq.heappop(free))
        finish = start + int(turn_lengths[i, k])
        heapq.heappush(free, finish)
        end = max(end, finish)
        if k + 1 < turn_lengths.shape[1]:
            heapq.heappush(ready, (finish, i, k + 1))
    return end


def lane_split(cfg, topology: str, rollout: bool):
    """(config, target) of one lane of an async config: the rollout or the train devices."""
    from memagent_jax.rl.async_trainer import split_devices
    from memagent_jax.tpu_topology import load_target

    target, desc = load_target(topology)
    rdevs, tdevs = split_devices(cfg, list(desc.devices))
    n = len(rdevs if rollout else tdevs)
    lane_target = dataclasses.replace(target, devices=n, chips=n * target.chips // target.devices)
    if not rollout:
        return cfg, lane_target
    m = cfg.mesh
    mesh = dataclasses.replace(m, data=m.rollout_data, fsdp=m.rollout_fsdp, tensor=m.rollout_tensor)
    return dataclasses.replace(cfg, mesh=mesh), lane_target


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sync", required=True, help="the sync config (name or YAML)")
    p.add_argument("--async", dest="async_", required=True, help="the async config")
    p.add_argument("--topology", required=True)
    p.add_argument("--bench", default="", help="bench/async_rl.py's JSON line (reply_share); "
                   "default: every reply at its budget")
    p.add_argument("--sync-compile", default="", help="`compile --estimate --json` of --sync")
    p.add_argument("--async-compile", default="", help="`compile --estimate --json` of --async")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from memagent_jax.compile import recipe_estimate
    from memagent_jax.config import load_config
    from memagent_jax.plan import resolve_model
    from memagent_jax.tpu_topology import load_target

    sync_cfg, async_cfg = load_config(args.sync), load_config(args.async_)
    _, model = resolve_model(sync_cfg)
    target, _ = load_target(args.topology)
    sync = recipe_estimate(sync_cfg, model, target)
    train_cfg, train_target = lane_split(async_cfg, args.topology, rollout=False)
    roll_cfg, roll_target = lane_split(async_cfg, args.topology, rollout=True)
    a_train = recipe_estimate(train_cfg, model, train_target)
    a_roll = recipe_estimate(roll_cfg, model, roll_target)

    # one step's conversations: (documents x group) trajectories of max_chunks memory turns + final
    a, r, rl = sync_cfg.agent, sync_cfg.rollout, sync_cfg.rl
    rng = np.random.default_rng(args.seed)
    n_traj = rl.gen_batch_size * r.group_size
    share = json.loads(Path(args.bench).read_text().strip().splitlines()[-1])["reply_share"] if args.bench else None
    if share:
        memory = draw_shares(rng, share["memory"]["quantiles"], n_traj * a.max_chunks).reshape(n_traj, a.max_chunks)
        final = draw_shares(rng, share["final"]["quantiles"], n_traj)
    else:
        memory, final = np.ones((n_traj, a.max_chunks)), np.ones(n_traj)
    lengths = np.maximum(1, np.round(np.concatenate(
        [memory * a.max_memory_tokens, final[:, None] * a.max_final_new_tokens], axis=1))).astype(int)
    tokens = int(lengths.sum())
    sync_steps = engine_steps(lengths, int(sync["slots"]))
    tail = sync_steps / sync["decode_steps"]  # vs the upper bound's steps (every reply at budget)
    fill = tokens / a_roll["slots"] / a_roll["decode_steps"]  # full slots: the step's tokens only

    def lanes(prefill: float, decode_upper: float, train: float, factor: float) -> dict:
        return {"rollout": prefill + decode_upper * factor, "train": train}

    out: dict = {"bench": "async_projection", "sync_config": args.sync, "async_config": args.async_,
                 "topology": args.topology, "estimate": True,
                 "reply_lengths": "measured shares (demo)" if share else "every reply at its budget",
                 "conversation_tokens": tokens, "sync_engine_steps": sync_steps,
                 "sync_slot_occupancy": round(tokens / (sync_steps * sync["slots"]), 3)}
    arithmetic = {
        "sync": lanes(sync["prefill_seconds"], sync["decode_seconds"], sync["train_compute_seconds"], tail),
        "async": lanes(a_roll["prefill_seconds"], a_roll["decode_seconds"], a_train["train_compute_seconds"], fill)}
    out["model_arithmetic"] = arithmetic

    def compiler(path: str) -> tuple[float, float, float]:
        rep = json.loads(Path(path).read_text())
        prog = {p["name"]: p["calls_per_step"] * p["compiler_seconds"] for p in rep["programs"]}
        decode = prog.get("engine decode", 0.0)
        prefill = prog.get("engine prefill", 0.0) + prog.get("sampler generate", 0.0)
        return prefill, decode, rep["estimate"]["train_compiler_seconds"]

    if args.sync_compile and args.async_compile:
        sp, sd, st = compiler(args.sync_compile)
        ap, ad, at = compiler(args.async_compile)
        out["compiler"] = {"sync": lanes(sp, sd, st, tail), "async": lanes(ap, ad, at, fill)}
    for source in ("model_arithmetic", "compiler"):
        if source not in out:
            continue
        s, y = out[source]["sync"], out[source]["async"]
        s["step"] = s["rollout"] + s["train"]
        y["step"] = max(y["rollout"], y["train"])
        for lane in (s, y):
            for k in list(lane):
                lane[k] = round(lane[k], 1)
        out[source]["ratio"] = round(s["step"] / y["step"], 3)
    # other splits of the same chips (model arithmetic; slots per rollout chip as in the async config)
    per_chip = async_cfg.rollout.max_rows_per_call / max(1, roll_target.devices)
    sweep = {}
    for n in range(roll_cfg.mesh.tensor, target.devices, roll_cfg.mesh.tensor):
        cfg_n = dataclasses.replace(async_cfg, mesh=dataclasses.replace(async_cfg.mesh, rollout_devices=n),
                                    rollout=dataclasses.replace(async_cfg.rollout,
                                                                max_rows_per_call=int(per_chip * n)))
        tc, tt = lane_split(cfg_n, args.topology, rollout=False)
        rc, rt = lane_split(cfg_n, args.topology, rollout=True)
        try:
            tr, ro = recipe_estimate(tc, model, tt), recipe_estimate(rc, model, rt)
        except ValueError:  # a mesh that does not divide this many devices
            continue
        fill_n = tokens / ro["slots"] / ro["decode_steps"]
        step = max(ro["prefill_seconds"] + ro["decode_seconds"] * fill_n, tr["train_compute_seconds"])
        sweep[n] = round(out["model_arithmetic"]["sync"]["step"] / step, 3)
    out["model_arithmetic"]["ratio_by_rollout_chips"] = sweep
    out["date"] = datetime.date.today().isoformat()
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
