"""Async RL vs sync RL: the embedded demo's RL stage on 2 CPU devices.

sync: `rollout.mode: sync` on a 2-device mesh (data 2): each step's rollout, then its update.
async: `rollout.mode: async` with 1 rollout device + 1 train device (`mesh.rollout_devices: 1`,
`rl.max_staleness`, default 1): the rollout thread makes the next batches while the trainer updates.

Both start from the demo's warm start (tiny.yaml's policy and task; `--run` a demo folder whose sft
stage is done, else the shipped base's demo is run `--until sft` into a temporary folder) and train
the same number of samples per round (`--steps` RL steps of rl.train_batch_size groups). The
sides are interleaved (bench/timing.py): a warm-up round each, then `--repeats` rounds, each from
the warm start's weights again; between its rounds the async side's rollout thread is stopped and
its queue emptied, so no round starts with batches made during the other side's round. Prints ONE
JSON line: `ratio` = sync seconds / async seconds per round (median and spread), both sides'
seconds per step, the async side's rollout and train busy fractions, staleness histogram, dropped
batches and weight-sync seconds, sync on ONE device beside it (`sync_1dev`: whether the 2-device
mesh itself costs time at this size), and the sync side's reply lengths as shares of their budgets.

    python bench/async_rl.py --steps 20 --repeats 5
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import cpu_model, ratio_spread, spread, usable_cpus  # noqa: E402


def make_trainer_for(run, out: Path, side: str, staleness: int):
    """A trainer of the demo's RL stage for one side: sync (2 devices or 1) or async (1 + 1)."""
    import jax

    from memagent_jax.demo.pipeline import rl_config
    from memagent_jax.train_run import make_trainer

    cfg = rl_config(run)
    cfg.trainer = dataclasses.replace(cfg.trainer, out_dir=str(out), total_steps=10**6, save_every=10**6,
                                      progress=False)
    devices = jax.devices()
    if side == "async":
        cfg.rollout = dataclasses.replace(cfg.rollout, mode="async")
        cfg.mesh = dataclasses.replace(cfg.mesh, data=1, fsdp=1, tensor=1, rollout_devices=1)
        cfg.rl = dataclasses.replace(cfg.rl, max_staleness=staleness)
        return make_trainer(cfg)
    n = 2 if side == "sync" else 1
    cfg.mesh = dataclasses.replace(cfg.mesh, data=n, fsdp=1, tensor=1)
    return make_trainer(cfg, devices=devices[:n])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="", help="a demo run folder whose sft stage is done")
    p.add_argument("--steps", type=int, default=20, help="RL steps per side and round")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--staleness", type=int, default=1, help="rl.max_staleness of the async side")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from memagent_jax.demo.pipeline import Run, load_demo_config, run_demo

    tmp = tempfile.TemporaryDirectory(prefix="bench_async_")
    root = Path(args.run) if args.run else Path(tmp.name) / "demo"
    if not args.run:
        run_demo(root, until="sft", overrides=["demo.progress=false"])
    cfg, demo = load_demo_config("tiny")  # tiny.yaml's RL stage on the folder's warm start and data
    run = Run(root, cfg, demo)
    sides = {name: make_trainer_for(run, Path(tmp.name) / name, name, args.staleness)
             for name in ("sync", "async", "sync_1dev")}

    import jax.numpy as jnp

    # every round trains `--steps` steps from the warm start (the same work each round: the demo's
    # RL converges in ~60 steps, after which dynamic sampling finds no mixed groups)
    initial = {name: jax.tree.map(jnp.copy, t.state) for name, t in sides.items()}

    def round_of(name: str) -> tuple[float, list[dict]]:
        trainer = sides[name]
        trainer.state, trainer.rl_step = jax.tree.map(jnp.copy, initial[name]), 0
        rows = []
        t0 = time.perf_counter()
        for _ in range(args.steps):
            rows.append(trainer.train_step())
        seconds = time.perf_counter() - t0
        if name == "async":  # nothing made in this round carries into the other side's round
            trainer.stop()
            trainer.reset_rollout()
        return seconds, rows

    lengths = {"memory": [], "final": []}  # the sync side's reply lengths, tokens
    update = sides["sync"].update

    def recording_update(collected):
        for c in collected.batch.conversations:
            lengths["final" if c.is_final else "memory"].append(len(c.response))
        return update(collected)

    sides["sync"].update = recording_update
    for name in sides:  # warm-up: compiles every program of both sides
        round_of(name)
    times: dict[str, list[float]] = {name: [] for name in sides}
    async_rows: list[dict] = []
    names = list(sides)
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            seconds, rows = round_of(name)
            times[name].append(seconds)
            if name == "async":
                async_rows += rows
    for t in sides.values():
        t.close()

    hist = {k: sum(r[k] for r in async_rows) for k in async_rows[0] if k.startswith("async/staleness_")
            and not k.endswith(("mean", "max"))}
    out = {
        "bench": "async_rl",
        "ratio": ratio_spread(times["sync"], times["async"]),
        "ratio_vs_sync_1dev": ratio_spread(times["sync_1dev"], times["async"]),
        "seconds_per_step": {k: spread([t / args.steps for t in v]) for k, v in times.items()},
        "async": {
            "rollout_busy": round(statistics.mean(r["async/rollout_busy"] for r in async_rows), 3),
            "train_busy": round(statistics.mean(r["async/train_busy"] for r in async_rows), 3),
            "staleness_histogram": hist,
            "dropped_batches": int(sum(r["async/dropped_batches"] for r in async_rows)),
            "weight_sync_seconds": round(statistics.median(r["time/weight_sync"] for r in async_rows), 4),
            "max_staleness": args.staleness,
        },
        # the demo's reply lengths as shares of their budgets (bench/async_projection.py uses them)
        "reply_share": {kind: {"budget": budget, "mean": round(statistics.mean(v) / budget, 3),
                               "quantiles": [round(float(q) / budget, 3) for q in
                                             np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0])]}
                        for kind, v, budget in (("memory", lengths["memory"], cfg.agent.max_memory_tokens),
                                                ("final", lengths["final"], cfg.agent.max_final_new_tokens))},
        "steps_per_round": args.steps, "repeats": args.repeats,
        "groups_per_step": cfg.rl.train_batch_size, "group_size": cfg.rollout.group_size,
        "devices": len(jax.devices()),
        "cpu": cpu_model(), "cpus": usable_cpus(), "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(out))
    tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
