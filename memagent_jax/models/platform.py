"""The platform a program is built for, and the KV-cache layout that suits it.

A program traced under a mesh context (`jax.set_mesh`, e.g. a TPU topology compiled from a CPU
host) is for that mesh's devices; otherwise for the default backend. The KV cache's layout follows:

- "head_major" (CPU): keys [layers, batch, kv_heads, head_dim, slots], values [layers, batch,
  kv_heads, slots, head_dim]. A decode step's two attention products are then plain batched
  matmuls over (batch, kv head) with untransposed operands: XLA:CPU otherwise transposed each
  layer's cache every step and packed the keys transposed (bench/sampler.py's decode step on a
  2-core AMD EPYC: 4.8 -> 3.0-3.5 ms).
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
    """The platform of a mesh's devices (None: the program's target platform)."""
    if mesh is None:
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
    layout is written down (shapes, shardings, writes and slot inserts derive from it)."""
    layout = kv_cache_layout(platform)
    rows = ("layers", "batch", "kv_heads", "cache_length", "head_dim")
    if layout == HEAD_MAJOR:
        return ("layers", "batch", "kv_heads", "head_dim", "cache_length"), rows
    if layout == ROWS:
        return rows, rows
    slot_major = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
    return slot_major, slot_major
