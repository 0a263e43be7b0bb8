"""Grain input pipeline over a random-access source of sample dicts.

``make_loader(source, batch_size=..., seed=...)`` shards by process, shuffles deterministically
(a new order every epoch), repeats and batches into *lists* of sample dicts (strings are not
stacked into arrays). The returned iterator's position is a small JSON-serialisable dict
(`loader_state` / `restore_loader`), so a run resumes with exactly the next batch; it can also
be saved with grain's orbax handler (``grain.checkpoint.CheckpointSave(iterator)``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

import grain


def _process_shard() -> tuple[int, int]:
    import jax  # imported here: the data package must not start a JAX backend on import

    return jax.process_index(), jax.process_count()


def make_loader(
    source: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = False,
    num_threads: int = 2,
    prefetch: int = 8,
) -> grain.DatasetIterator:
    """An iterator of batches (lists of sample dicts) over `source` (len + __getitem__).

    Args:
      source: random-access source, e.g. `tfds_builders.load_dataset(...)` or a list.
      batch_size: samples per batch (per process).
      seed: shuffle seed; the same seed gives the same order on every run and host.
      shuffle: shuffle globally (per shard) each epoch; False keeps source order.
      num_epochs: passes over the data; None repeats forever.
      shard_index, shard_count: this process's shard (samples shard_index::shard_count);
        default ``jax.process_index()`` / ``jax.process_count()``. Shards are disjoint and cover
        the source.
      drop_remainder: drop a last short batch (only reached when num_epochs is finite).
      num_threads, prefetch: grain read threads and prefetch buffer (rendering long documents
        is the expensive part; keep them small on few cores).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if (shard_index is None) != (shard_count is None):
        raise ValueError("give both shard_index and shard_count, or neither")
    if shard_index is None:
        shard_index, shard_count = _process_shard()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if len(source) < shard_count:
        raise ValueError(f"{len(source)} samples cannot feed {shard_count} shards")
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    # Batch the IterDataset: MapDataset.batch over an endless repeat overflows its length
    # (grain 0.2.18 computes ceil(sys.maxsize / batch_size) in floating point).
    batched = ds.to_iter_dataset(options).batch(
        batch_size, drop_remainder=drop_remainder, batch_fn=list
    )
    return iter(batched)


def loader_state(it: grain.DatasetIterator) -> dict[str, Any]:
    """The iterator's position as a JSON-serialisable dict (save it with the checkpoint)."""
    state = copy.deepcopy(it.get_state())
    json.dumps(state)  # fail here, not at save time, if grain's state ever stops being JSON
    return state


def restore_loader(it: grain.DatasetIterator, state: dict[str, Any]) -> grain.DatasetIterator:
    """Move a fresh iterator of the same pipeline to `state`; the next batch is the saved one."""
    it.set_state(copy.deepcopy(state))
    return it
