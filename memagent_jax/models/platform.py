"""The platform a program is built for, and the KV-cache layout that suits it.

A program traced under a mesh context (`jax.set_mesh`, e.g. a TPU topology compiled from a CPU
host) is for that mesh's devices; otherwise for the default backend. The KV cache's layout follows:

- "head_major" (CPU): keys [layers, batch, kv_heads, head_dim, slots], values [layers, batch,
  kv_heads, slots, head_dim]. A decode step's two attention products are then plain batched
  matmuls over (batch, kv head) with untransposed operands: XLA:CPU otherwise transposed each
  layer's cache every step and packed the keys transposed (bench/sampler.py's decode step on a
  2-core AMD EPYC: 4.8 -> 3.0-3.5 ms).
- "slot_major" (TPU, GPU): keys and values [layers, batch, slots, kv_heads, head_dim]. The TPU
  compiler re-lays a head-major cache out (the kv heads per device, often 1-2, as a tiled
  dimension) and copied the whole cache at every decode call (qwen2_5_7b_memagent_v5p32: 44 GiB
  of temporaries, did not fit).

On CPU the sampler also keeps one cache array per layer and unrolls its layers (`per_layer_cache`):
a scanned step slices every layer's weights and cache out of the stacked arrays, and XLA:CPU copies
each slice (per decode step of bench/sampler.py's model: 2.9 MB of weights and 6.3 MB of cache
per layer). TPU/GPU programs keep the stacked cache and the scan (compile time independent of depth).
"""

from __future__ import annotations

from typing import Any

import jax

HEAD_MAJOR, SLOT_MAJOR = "head_major", "slot_major"


def target_platform() -> str:
    """The platform the program being traced is for: the devices of the context mesh, else the
    default backend ("cpu", "gpu" or "tpu")."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = getattr(device, "platform", None)
    return "gpu" if platform == "cuda" else platform or jax.default_backend()


def mesh_platform(mesh: Any) -> str:
    """The platform of a mesh's devices (None: the program's target platform)."""
    if mesh is None:
        return target_platform()
    platform = mesh.devices.flat[0].platform
    return "gpu" if platform == "cuda" else platform


def kv_cache_layout(platform: str | None = None) -> str:
    """HEAD_MAJOR on CPU, SLOT_MAJOR on TPU/GPU (module docstring); `platform` None: the target's."""
    return HEAD_MAJOR if (platform or target_platform()) == "cpu" else SLOT_MAJOR


def per_layer_cache(platform: str | None = None) -> bool:
    """True where the sampler keeps one KV-cache array per layer and unrolls the layers (CPU);
    `platform` None: the target's (module docstring)."""
    return (platform or target_platform()) == "cpu"


def cache_axes(platform: str | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The logical axes of the cache's keys and values in `platform`'s layout: the one place the
    layout is written down (shapes, shardings, writes and slot inserts derive from it)."""
    if kv_cache_layout(platform) == HEAD_MAJOR:
        return (("layers", "batch", "kv_heads", "head_dim", "cache_length"),
                ("layers", "batch", "kv_heads", "cache_length", "head_dim"))
    slot_major = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
    return slot_major, slot_major
