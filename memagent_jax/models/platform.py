"""The platform a program is built for, and the KV-cache layout that suits it.

A program traced under a mesh context (`jax.set_mesh`, e.g. a TPU topology compiled from a CPU
host) is for that mesh's devices; otherwise for the default backend. The KV cache's layout follows:

- "head_major" (CPU): values [layers, batch, kv_heads, slots, head_dim], keys in tiles of
  `KEY_TILE` slots [layers, batch, kv_heads, key_tiles, head_dim, tile_slots] (cache lengths are
  multiples of the tile: `slot_multiple`). A decode step's query-key product then reads each
  tile's 16 KB (head_dim 64) in one sweep; over keys [..., head_dim, slots] the product walked 64
  rows 1.5 KB apart per output vector, at a third of the bandwidth once the cache outgrew the L3
  (bench/sampler.py's model, 4 layers' keys read per step from DRAM, 2-core AMD EPYC: 0.31 -> 0.13
  ms per layer; tiles of 16 slots: 0.26, of 32: 0.14; at Qwen2.5-7B's head shapes 64 beat 128,
  0.58 vs 0.77 ms). Keys of head_dim < `TILED_KEYS_MIN_HEAD_DIM` are one tile of all slots
  ([..., 1, head_dim, slots]): a tiny model's cache sits in the L2/L3, where one matmul over it
  beat a matmul per tile plus the query's broadcast (bench/rollout_engine.py's head_dim-16
  model: 2.45 vs 2.68 s per rollout). Values feed a plain batched matmul
  over (batch, kv head), untransposed: XLA:CPU otherwise transposed each layer's cache every step.
- "slot_major" (GPU): keys and values [layers, batch, slots, kv_heads, head_dim]. Read whole
  and fused by the XLA attention of a decode step.
- "rows" (TPU): keys and values [layers, batch, kv_heads, slots, head_dim]: every (layer, row,
  kv head) owns contiguous slots, so the cache is a pool of pages for the Pallas paged-attention
  kernel without a copy (models/paged_attention.py): a decode step reads each row's live slots.
  The minor dims stay (slots, head_dim), the TPU's tiles: with the keys transposed (the CPU's
  layout) the TPU compiler re-laid the cache out and copied all of it at every decode call
  (qwen2_5_7b_memagent_v5p32: 44 GiB of temporaries, did not fit).

On CPU the sampler also keeps one cache array per layer and unrolls its layers (`per_layer_cache`):
a scanned step slices every layer's weights and cache out of the stacked arrays, and XLA:CPU copies
each slice (per decode step of bench/sampler.py's model: 2.9 MB of weights and 6.3 MB of cache
per layer). TPU/GPU programs keep the stacked cache and the scan (compile time independent of depth).
"""

from __future__ import annotations

from typing import Any

import jax

HEAD_MAJOR, SLOT_MAJOR, ROWS = "head_major", "slot_major", "rows"
KEY_TILE = 64  # slots per key tile in the CPU layout
TILED_KEYS_MIN_HEAD_DIM = 32  # below: the CPU's keys are one tile of all slots


def device_platform() -> str:
    """The platform of the devices the program being traced will run on: the devices of the
    context mesh, else the default backend ("cpu", "gpu" or "tpu")."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = getattr(device, "platform", None)
    return "gpu" if platform == "cuda" else platform or jax.default_backend()


def target_platform() -> str:
    """The platform whose cache layout and kernels the program being traced uses: its devices'
    (`device_platform`). Tests replace this one alone to trace TPU programs on a CPU, where the
    TPU's Pallas kernels then run in interpret mode (they ask `device_platform`)."""
    return device_platform()


def mesh_platform(mesh: Any) -> str:
    """The platform of a mesh's devices (None, or a target that a test put in place of the
    devices' platform: the program's target platform)."""
    if mesh is None or target_platform() != device_platform():
        return target_platform()
    platform = mesh.devices.flat[0].platform
    return "gpu" if platform == "cuda" else platform


def kv_cache_layout(platform: str | None = None) -> str:
    """HEAD_MAJOR on CPU, ROWS on TPU, SLOT_MAJOR on GPU (module docstring); `platform` None:
    the target's."""
    platform = platform or target_platform()
    return HEAD_MAJOR if platform == "cpu" else ROWS if platform == "tpu" else SLOT_MAJOR


def per_layer_cache(platform: str | None = None) -> bool:
    """True where the sampler keeps one KV-cache array per layer and unrolls the layers (CPU);
    `platform` None: the target's (module docstring)."""
    return (platform or target_platform()) == "cpu"


def cache_axes(platform: str | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The logical axes of the cache's keys and values in `platform`'s layout: the one place the
    layout is written down (shapes, shardings, writes and slot inserts derive from it). The slots
    are the axis "cache_length", or "key_tiles" x "tile_slots" (CPU keys: `KEY_TILE`)."""
    layout = kv_cache_layout(platform)
    rows = ("layers", "batch", "kv_heads", "cache_length", "head_dim")
    if layout == HEAD_MAJOR:
        return ("layers", "batch", "kv_heads", "key_tiles", "head_dim", "tile_slots"), rows
    if layout == ROWS:
        return rows, rows
    slot_major = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
    return slot_major, slot_major


def key_tile(head_dim: int, length: int) -> int:
    """Slots per key tile of a CPU cache of `length` slots (a multiple of `slot_multiple`)."""
    return KEY_TILE if head_dim >= TILED_KEYS_MIN_HEAD_DIM else length


def slot_multiple(head_dim: int, platform: str | None = None) -> int:
    """Cache lengths are multiples of this in `platform`'s layout (the CPU's key tile where the
    keys are tiled, else 1): `KVCache` shapes round a length up to it."""
    tiled = kv_cache_layout(platform) == HEAD_MAJOR and head_dim >= TILED_KEYS_MIN_HEAD_DIM
    return KEY_TILE if tiled else 1


def cache_length(head_dim: int, length: int, platform: str | None = None) -> int:
    """The slots a cache asked for `length` slots holds: `length` rounded up to `slot_multiple`."""
    multiple = slot_multiple(head_dim, platform)
    return -(-length // multiple) * multiple


def slot_axis(axes: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, int]:
    """(axis, slots per index) of the slots in an array of `shape` with logical `axes`
    (`cache_axes`, possibly without "layers"): slicing its first `n` slots slices
    n // (slots per index) along the axis (keys in one tile: the slots within it)."""
    if "key_tiles" in axes:
        tiles = axes.index("key_tiles")
        if shape[tiles] == 1:
            return axes.index("tile_slots"), 1
        return tiles, shape[axes.index("tile_slots")]
    return axes.index("cache_length"), 1
