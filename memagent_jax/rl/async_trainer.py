"""Asynchronous RL (`rollout.mode: async`): rollout and update at the same time.

A rollout thread generates scored generation batches (the sync trainer's `generation_batch`:
rollout, rewards, dynamic sampling's keep mask) on the rollout mesh and puts them on a bounded
queue (`rl.async_queue` batches); the trainer takes them as they come, drops those too old, and
updates on the train mesh as soon as `rl.train_batch_size` groups are kept. After each update the
new weights are published to the rollout mesh (`WeightBroker`: one device-to-device reshard).

Versions and staleness. A weight version is the number of updates applied to it. Every sampled
token records the version that produced it (`Conversation.policy_version`). The rollout thread
switches to newly published weights at each memory-turn boundary on the static path (each turn is
one sampler call), so a conversation in flight continues its next turn with the new weights while
its earlier turns keep their versions and sampler log-probs (partial rollouts); the continuous
engine keeps one version per generation batch. A batch's staleness at RL step u is u minus the
oldest version among its tokens; batches with staleness > `rl.max_staleness` are dropped (counted).
The rollout thread starts a batch only while its newest weights are recent enough for the step
that batch will feed (version + max_staleness >= steps already collected), so it never races far
ahead. `rl.max_staleness: 0` is strictly on-policy: the trainer asks for one batch at a time with
the sync trainer's seeds and data order, so samples and updates equal sync mode's.

Off-policy correction: the loss's ratio uses the trainer's log-probs under the weights being
updated (as in sync mode); the sampler-vs-trainer mismatch (stale weights, other numerics) is
corrected by the suite in `rl/off_policy.py` (`rl.tis_cap`, `rl.mis_cap`).

Checkpoints: a save records the data stream's state right after the last batch the trainer
consumed; queued and in-flight batches are dropped, and after a resume their documents are
generated again (with the resumed weights). Metrics per step: staleness histogram, dropped
batches, queue depth, rollout/train busy fractions and weight-sync seconds; `timeline.jsonl` in
the run folder holds each lane's busy intervals (the report draws them).
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memagent_jax import sampler
from memagent_jax.config import Config
from memagent_jax.distributed import allgather_objects, to_host
from memagent_jax.models.sharding import MeshConfig, make_mesh, mesh_context
from memagent_jax.rl.collect import Collected, ScoredBatch, assemble, merge_results
from memagent_jax.rl.trainer import Trainer
from memagent_jax.seeds import derive

#: the free-running rollout thread's seed stream: derive(trainer.seed, ASYNC_STREAM, batch index)
ASYNC_STREAM = 1_000_003


# ------------------------------------------------------------------------------------- meshes
def split_devices(cfg: Config, devices: list[Any] | None = None) -> tuple[list[Any], list[Any]]:
    """(rollout devices, train devices) for `mesh.rollout_devices`: N devices, a fraction of them,
    or 0 = both lanes on all devices. The rollout takes the first devices. Multi-host (several
    processes, `devices` not given): every process gives its first N / processes local devices to
    its own rollout mesh; the returned rollout devices are this process's, the train devices are
    every process's others (one train mesh over all processes)."""
    n = cfg.mesh.rollout_devices
    given = devices is not None
    devices = list(devices if given else jax.devices())
    if n == 0:
        return devices, devices
    count = int(n) if n >= 1 else int(round(n * len(devices)))
    if not 1 <= count < len(devices):
        raise ValueError(f"mesh.rollout_devices={n} gives {count} of {len(devices)} devices to the "
                         "rollout: both meshes need at least one device; set it between 1 and "
                         f"{len(devices) - 1} (or 0 to share the devices)")
    procs = jax.process_count()
    if given or procs == 1:
        return devices[:count], devices[count:]
    if count % procs:
        raise ValueError(f"mesh.rollout_devices={n} gives {count} devices to the rollout, not a "
                         f"multiple of the {procs} processes (each runs its own rollout mesh)")
    by_process: dict[int, list[Any]] = {}
    for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(d.process_index, []).append(d)
    rollout = {p: ds[: count // procs] for p, ds in by_process.items()}
    taken = {d.id for ds in rollout.values() for d in ds}
    return rollout[jax.process_index()], [d for d in devices if d.id not in taken]


def build_async_meshes(cfg: Config, devices: list[Any] | None = None
                       ) -> tuple[jax.sharding.Mesh, jax.sharding.Mesh]:
    """(train mesh, rollout mesh): the train mesh has mesh.data/fsdp/tensor over its devices, the
    rollout mesh mesh.rollout_data/fsdp/tensor over its own (the same mesh when shared; with
    several processes, this process's own rollout mesh)."""
    m = cfg.mesh
    if m.rollout_devices == 0 and devices is None and jax.process_count() > 1:
        raise ValueError("rollout.mode=async with several processes needs mesh.rollout_devices > 0: "
                         "each process samples on its own rollout devices while all train together")
    rollout_devs, train_devs = split_devices(cfg, devices)
    train = make_mesh(MeshConfig(m.data, m.fsdp, m.tensor), train_devs)
    if m.rollout_devices == 0:
        return train, train
    return train, make_mesh(MeshConfig(m.rollout_data, m.rollout_fsdp, m.rollout_tensor), rollout_devs)


# --------------------------------------------------------------------------------- weights
class WeightBroker:
    """The newest policy weights on the rollout mesh, with their version.

    `publish` lays the model's weights out by the decode rules on the rollout mesh
    (`sampler.decode_state`: each weight is one `device_put` from its train-mesh sharding to its
    rollout-mesh sharding, device to device, cast once to the compute dtype); no weight is gathered
    onto one device and nothing goes through the host (multi-host: the train mesh spans the
    processes and each process's rollout mesh is its own, so each weight is gathered to every
    process first). While the rollout still samples from the
    previous version, the rollout mesh holds both copies."""

    def __init__(self, mesh: jax.sharding.Mesh | None) -> None:
        self.mesh = mesh
        self._cond = threading.Condition()
        self._version = -1
        self._model: Any = None

    def publish(self, model: Any, version: int) -> float:
        """Reshards `model` onto the rollout mesh as `version`; returns the seconds it took."""
        t0 = time.perf_counter()
        graphdef, full = nnx.split(model)
        if any(not x.is_fully_addressable for x in jax.tree.leaves(full)):  # a train mesh over
            # several processes: each process gathers the weights for its own rollout mesh
            model = nnx.merge(graphdef, jax.tree.map(to_host, full))
        source = set().union(*(_buffers(x) for x in jax.tree.leaves(nnx.state(model))))
        graphdef, state = sampler.decode_state(model, self.mesh)
        # a weight already in its rollout layout shares the train state's buffer (device_put to
        # the same sharding copies nothing), which the next update donates: the rollout gets its
        # own copy of those
        state = jax.tree.map(lambda x: jnp.copy(x) if _buffers(x) & source else x, state)
        jax.block_until_ready(state)
        rollout_model = nnx.merge(graphdef, state)
        with self._cond:
            self._version, self._model = version, rollout_model
            self._cond.notify_all()
        return time.perf_counter() - t0

    def latest(self) -> tuple[int, Any]:
        with self._cond:
            return self._version, self._model

    def wait_until(self, ready: Callable[[int], bool], stop: threading.Event,
                   poll: float = 0.05) -> tuple[int, Any] | None:
        """Blocks until `ready(version)` holds (then returns the latest) or `stop` is set (None)."""
        with self._cond:
            while not stop.is_set():
                if self._model is not None and ready(self._version):
                    return self._version, self._model
                self._cond.wait(poll)
        return None

    def notify(self) -> None:
        """Wakes waiters to re-check their condition (the trainer's progress changed)."""
        with self._cond:
            self._cond.notify_all()


def _buffers(x: Any) -> set[int]:
    """The device buffers (addresses) holding this process's shards of an array (none for a
    host array: multi-host, the weights were gathered to numpy first)."""
    return {shard.data.unsafe_buffer_pointer() for shard in getattr(x, "addressable_shards", ())}


class VersionedGenerate:
    """The rollout thread's generate function: samples from the broker's weights and tags each
    call's rows with their version. With `partial`, every call (one memory turn on the static
    path) first switches to the newest published weights."""

    def __init__(self, trainer: Trainer, broker: WeightBroker, *, partial: bool) -> None:
        self.trainer, self.broker, self.partial = trainer, broker, partial
        self.version, self.fn = -1, None
        self.versions_used: set[int] = set()
        self._refresh()

    def _refresh(self) -> None:
        version, model = self.broker.latest()
        if version != self.version:
            self.version, self.fn = version, self.trainer.make_generate_fn(model, self.broker.mesh)
        self.versions_used.add(self.version)

    def __getattr__(self, name: str) -> Any:  # engine_config, make_engine, ...: the engine's
        return getattr(self.__dict__["fn"], name)

    def __call__(self, prompts: list[list[int]], **kwargs: Any) -> Any:
        if self.partial:
            self._refresh()
        out = self.fn(prompts, **kwargs)
        out.version = self.version
        return out


# --------------------------------------------------------------------------------- queue
@dataclasses.dataclass
class QueuedBatch:
    """A scored generation batch with its bookkeeping."""

    batch: ScoredBatch
    index: int  # generation batch number since the run (or the resume) started
    min_version: int
    max_version: int
    data_state: Any  # the data stream's state right after this batch's documents were taken
    start: float  # seconds since the run started
    end: float


def batch_versions(batch: ScoredBatch) -> tuple[int, int]:
    """(oldest, newest) policy version among the batch's sampled tokens."""
    versions = [c.policy_version for c in batch.result.conversations]
    return min(versions), max(versions)


def staleness_histogram(staleness: list[int], buckets: int = 4) -> dict[str, int]:
    """Counts per staleness 0..buckets-2 and ">= buckets-1" (metric names async/staleness_<s>)."""
    out = {f"async/staleness_{s}": 0 for s in range(buckets - 1)}
    out[f"async/staleness_{buckets - 1}+"] = 0
    for s in staleness:
        key = f"async/staleness_{s}" if s < buckets - 1 else f"async/staleness_{buckets - 1}+"
        out[key] += 1
    return out


def busy_fraction(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Share of [start, end] covered by the (non-overlapping) intervals."""
    if end <= start:
        return 0.0
    covered = sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)
    return min(1.0, covered / (end - start))


class _Timeline:
    """`timeline.jsonl`: one line per busy interval {lane, step, start, end, version}."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.lock = path, threading.Lock()
        self.events: list[dict[str, Any]] = []

    def add(self, lane: str, step: int, start: float, end: float, **extra: Any) -> None:
        event = {"lane": lane, "step": step, "start": round(start, 6), "end": round(end, 6), **extra}
        with self.lock:
            self.events.append(event)
            if self.path is not None:
                with self.path.open("a") as f:
                    f.write(json.dumps(event) + "\n")

    def intervals(self, lane: str, since: float) -> list[tuple[float, float]]:
        with self.lock:
            return [(e["start"], e["end"]) for e in self.events if e["lane"] == lane and e["end"] > since]


# ------------------------------------------------------------------------------- the trainer
class AsyncTrainer(Trainer):
    """`Trainer` with the rollout on its own thread and mesh (see the module docstring)."""

    def __init__(self, cfg: Config, model: Any, tokenizer: Any, data: Any, *,
                 mesh: jax.sharding.Mesh | None = None,
                 rollout_mesh: jax.sharding.Mesh | None = None, **kwargs: Any) -> None:
        super().__init__(cfg, model, tokenizer, data, mesh=mesh, **kwargs)
        self.rollout_mesh = rollout_mesh if rollout_mesh is not None else mesh
        self.broker = WeightBroker(self.rollout_mesh)
        self.max_staleness = cfg.rl.max_staleness
        self.queue: queue.Queue[QueuedBatch | BaseException] = queue.Queue(maxsize=cfg.rl.async_queue)
        self.stop_event = threading.Event()
        self.collected_steps = 0  # steps whose batches the trainer has taken (the worker's gate)
        self.demand: queue.Queue[tuple[int, int]] = queue.Queue()  # max_staleness 0: (step, batch)
        self.thread: threading.Thread | None = None
        self.t0 = time.perf_counter()
        self.timeline = _Timeline(self.out_dir / "timeline.jsonl" if jax.process_index() == 0 else None)
        self.consumed_data_state: Any = None
        self.batches_made = 0
        self.queued_groups = 0  # kept groups in the queue (the rollout thread's gate)
        self.queued_lock = threading.Lock()
        self.inflight_since: float | None = None  # start of the batch the rollout thread is making
        self._async_metrics: dict[str, Any] = {}

    # ------------------------------------------------------------------ the rollout thread
    def _now(self) -> float:
        return time.perf_counter() - self.t0

    def _start(self) -> None:
        if self.thread is not None:
            return
        self.broker.publish(self.rollout_model(), self.rl_step)
        self.collected_steps = self.rl_step
        self.thread = threading.Thread(target=self._worker, name="rollout", daemon=True)
        self.thread.start()

    def step_served_next(self) -> int:
        """The RL step a batch started now would feed: the trainer has collected
        `collected_steps` steps, and the kept groups already queued fill the next ones first."""
        with self.queued_lock:
            queued = self.queued_groups
        # multi-host: this process's batches hold its share of the groups
        per_process = max(1, self.cfg.rl.train_batch_size // jax.process_count())
        return self.collected_steps + queued // per_process

    def _put(self, item: QueuedBatch | BaseException) -> None:
        groups = item.batch.kept_groups if isinstance(item, QueuedBatch) else 0
        with self.queued_lock:  # counted before the trainer can take it
            self.queued_groups += groups
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue
        with self.queued_lock:  # stopping: never queued
            self.queued_groups -= groups

    def _worker(self) -> None:
        try:
            with mesh_context(self.rollout_mesh):
                while not self.stop_event.is_set():
                    if self.max_staleness == 0:
                        try:  # strictly on-policy: one batch when the trainer asks, its seed
                            step, gen = self.demand.get(timeout=0.05)
                        except queue.Empty:
                            continue
                        seed = self._seed(step, gen)
                        ready = self.broker.wait_until(lambda v, s=step: v >= s, self.stop_event)
                    else:
                        seed = self._seed(ASYNC_STREAM, self.batches_made)
                        ready = self.broker.wait_until(
                            lambda v: v + self.max_staleness >= self.step_served_next(), self.stop_event)
                    if ready is None:
                        return
                    generate = VersionedGenerate(self, self.broker, partial=self.cfg.rollout.engine == "static")
                    start = self.inflight_since = self._now()
                    docs = next(self.data)
                    data_state = self.data_state[0]() if self.data_state else None
                    batch = self.generation_batch(generate, docs, seed, local=True)
                    lo, hi = batch_versions(batch)
                    item = QueuedBatch(batch, self.batches_made, lo, hi, data_state, start, self._now())
                    self.batches_made += 1
                    self.inflight_since = None
                    self.timeline.add("rollout", self.collected_steps, item.start, item.end,
                                      version=[lo, hi], batch=item.index)
                    self._put(item)
        except BaseException as e:  # noqa: BLE001 - handed to the trainer, which re-raises it
            self._put(e)

    def _seed(self, *path: int) -> Any:
        """A batch's seed; multi-host, each process samples its own documents on its own rollout
        mesh, so the process index is part of the stream (no two processes share noise)."""
        if jax.process_count() > 1:
            path = (*path, jax.process_index())
        return derive(self.cfg.trainer.seed, *path)

    def _gather(self, item: QueuedBatch) -> QueuedBatch:
        """Multi-host: every process's next batch, merged (the same on every process, so every
        process drops and keeps alike); one process: the item itself."""
        if jax.process_count() == 1:
            return item
        parts = allgather_objects((item.batch, item.min_version, item.max_version))
        batches = [b for b, _, _ in parts]  # scored where they were made: concatenated, in order
        batch = ScoredBatch(merge_results([b.result for b in batches]),
                            np.concatenate([b.rewards for b in batches]),
                            np.concatenate([b.accuracy for b in batches]),
                            np.concatenate([b.keep for b in batches]))
        return dataclasses.replace(item, batch=batch, min_version=min(p[1] for p in parts),
                                   max_version=max(p[2] for p in parts))

    def _next_item(self) -> QueuedBatch:
        while True:
            if self.thread is not None and not self.thread.is_alive() and self.queue.empty():
                raise RuntimeError("the rollout thread stopped without an error")
            try:
                item = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise RuntimeError(f"the rollout thread failed: {item!r}") from item
            with self.queued_lock:
                self.queued_groups -= item.batch.kept_groups
            return item

    # --------------------------------------------------------------------------- collect
    def collect(self) -> Collected:
        """Queued batches until train_batch_size groups are kept; too-stale batches dropped."""
        rl = self.cfg.rl
        self._start()
        batches: list[ScoredBatch] = []
        kept_groups, dropped, staleness, depth = 0, 0, [], []
        while kept_groups < rl.train_batch_size:
            if rl.max_num_gen_batches and len(batches) >= rl.max_num_gen_batches:
                raise self._too_many_batches(kept_groups, len(batches))
            if self.max_staleness == 0:
                self.demand.put((self.rl_step, len(batches)))
            depth.append(self.queue.qsize())
            item = self._gather(self._next_item())
            self.consumed_data_state = item.data_state
            lag = self.rl_step - item.min_version
            if lag > self.max_staleness:
                dropped += 1
                continue
            staleness.append(lag)
            batches.append(item.batch)
            kept_groups += item.batch.kept_groups
        self.collected_steps = self.rl_step + 1
        self.broker.notify()
        collected = assemble(batches, rl.train_batch_size)
        self._async_metrics = {"async/dropped_batches": dropped,
                               "async/queue_depth": float(np.mean(depth)) if depth else 0.0,
                               "async/staleness_mean": float(np.mean(staleness)),
                               "async/staleness_max": int(max(staleness)),
                               **staleness_histogram(staleness)}
        return collected

    # ---------------------------------------------------------------------------- step
    def train_step(self) -> dict[str, float]:
        step_start = self._now()
        t0 = time.perf_counter()
        with mesh_context(self.mesh):
            collected = self.collect()
            t_collect = time.perf_counter() - t0
            update_start = self._now()
            metrics = self.update(collected)
        update_end = self._now()
        sync_seconds = self.broker.publish(self.rollout_model(), self.rl_step + 1)
        step_end = self._now()
        self.timeline.add("train", self.rl_step, update_start, update_end)
        self.timeline.add("sync", self.rl_step, update_end, step_end)
        metrics.update(self._step_metrics(collected, t_collect, time.perf_counter() - t0))
        metrics.update(self._async_metrics)
        rollout_busy = self.timeline.intervals("rollout", step_start)
        inflight = self.inflight_since
        if inflight is not None:
            rollout_busy.append((inflight, step_end))
        metrics.update({
            "time/weight_sync": sync_seconds,
            "async/rollout_busy": busy_fraction(rollout_busy, step_start, step_end),
            "async/train_busy": busy_fraction(self.timeline.intervals("train", step_start)
                                              + self.timeline.intervals("sync", step_start),
                                              step_start, step_end),
        })
        self.rl_step += 1
        return metrics

    def extra_token_arrays(self, merged: Any, batch: Any) -> dict[str, np.ndarray]:
        """"lag": each token's version lag (this step - its sampling version), for the loss's
        per-lag rollout_logprob_abs_diff."""
        lag = np.array([self.rl_step - c.policy_version for c in merged.conversations], np.float32)
        return {"lag": np.broadcast_to(lag[:, None], batch.tokens.shape).copy()}

    def save(self, force: bool = False) -> None:
        """As sync mode's, with the data state after the last batch the trainer consumed."""
        state = self.consumed_data_state if self.consumed_data_state is not None else (
            self.data_state[0]() if self.data_state else None)
        self.checkpointer.save(self.rl_step, self.state, {"rl_step": self.rl_step, "data_state": state},
                               force=force)

    def stop(self) -> None:
        """Stops the rollout thread (in-flight and queued batches are dropped)."""
        self.stop_event.set()
        self.broker.notify()
        if self.thread is not None:
            self.thread.join(timeout=60)
        self.thread = None

    def reset_rollout(self) -> None:
        """After `stop`: drops the queued batches; the next step starts the rollout thread anew
        (a benchmark's rounds then start alike)."""
        self.stop_event.clear()
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queued_groups = 0
        while not self.demand.empty():
            self.demand.get_nowait()

    def run(self, progress: bool | None = None) -> str:
        """As sync mode's; then `timeline.png` (the lanes of the last steps) in the run folder."""
        try:
            return super().run(progress)
        finally:
            self.stop()
            if self.timeline.path is not None and self.timeline.events:
                from memagent_jax.plots import plot_timeline

                plot_timeline(self.timeline.events, self.out_dir / "timeline.png")

    def close(self) -> None:
        self.stop()
        super().close()
