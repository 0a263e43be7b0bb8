"""Multi-controller helpers: agreeing on shapes, gathering host objects, building global arrays.

Every process runs the same SPMD programs over the global mesh. Host-side values that decide a
program's shape (row counts, prompt buckets, number of rollout steps) must agree across
processes; these helpers make them agree. With one process they are cheap no-ops.
"""

from __future__ import annotations

import pickle
from typing import Any, Sequence

import jax
import numpy as np


def process_count() -> int:
    return jax.process_count()


def mesh_processes(mesh: Any) -> tuple[int, int]:
    """(number of processes whose devices `mesh` holds, this process's rank among them): (1, 0)
    without a mesh or for a mesh of this process's devices only (async RL's local rollout mesh),
    where no collective is needed."""
    if mesh is None or jax.process_count() == 1:
        return 1, 0
    procs = sorted({d.process_index for d in mesh.devices.flat})
    if len(procs) == 1:
        return 1, 0
    return len(procs), procs.index(jax.process_index())


def allgather_ints(values: Sequence[int]) -> np.ndarray:
    """[num_processes, len(values)] int64: every process's `values` (same length everywhere)."""
    local = np.asarray(values, np.int64)[None]
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True)).reshape(
        jax.process_count(), -1)


def process_offsets(counts: Sequence[int]) -> np.ndarray:
    """Per entry of `counts`, its sum over the processes before this one (zeros on process 0 and
    with one process): where this process's rows start when every process's rows are laid end to
    end in process order. Collective: every process calls it with as many entries."""
    return allgather_ints(counts)[: jax.process_index()].sum(axis=0)


def global_max(*values: int) -> tuple[int, ...]:
    """Element-wise max over processes of a few host integers."""
    return tuple(int(v) for v in allgather_ints(values).max(axis=0))


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's picklable `obj`, in process order (internal data only, never user input)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    payload = np.frombuffer(pickle.dumps(obj), np.uint8)
    (longest,) = global_max(payload.size)
    padded = np.zeros((1, longest + 8), np.uint8)
    padded[0, :8] = np.frombuffer(np.int64(payload.size).tobytes(), np.uint8)
    padded[0, 8:8 + payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(padded, tiled=True))
    out = []
    for row in gathered.reshape(jax.process_count(), -1):
        n = int(np.frombuffer(row[:8].tobytes(), np.int64)[0])
        out.append(pickle.loads(row[8:8 + n].tobytes()))
    return out


def global_array(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global jax.Array from a host array that is IDENTICAL on every process."""
    if jax.process_count() == 1 or sharding.is_fully_addressable:
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def from_process_local(local: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array whose leading axis is the concatenation of every process's `local` rows
    (each process passes the same number of rows)."""
    if jax.process_count() == 1 or sharding.is_fully_addressable:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local)


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) global array on every process."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
