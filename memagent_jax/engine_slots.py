"""The continuous engine's slot arrays: their shapes and dtypes, their shardings on a mesh, and
their abstract (ShapeDtypeStruct) versions for ahead-of-time compiling (`memagent-jax compile`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from memagent_jax.models.sharding import DECODE_RULES, batch_sharding, cache_sharding
from memagent_jax.models.transformer import KVCache
from memagent_jax.sampler import MAX_STOP_IDS


def cache_names(num_layers: int, per_layer: bool) -> tuple[list[str], list[str]]:
    """The slot names holding the KV cache's keys and values: "k" and "v" (stacked over the
    layers), or one per layer, "k/0" ... and "v/0" ... (a per-layer cache, models/platform.py)."""
    if not per_layer:
        return ["k"], ["v"]
    return [f"k/{i}" for i in range(num_layers)], [f"v/{i}" for i in range(num_layers)]


def slots_cache(slots: dict[str, Any], num_layers: int) -> KVCache:
    """The KV cache held by the slot arrays (stacked or per layer, as they hold it)."""
    if "k" in slots:
        return KVCache(slots["k"], slots["v"])
    k_names, v_names = cache_names(num_layers, True)
    return KVCache(tuple(slots[n] for n in k_names), tuple(slots[n] for n in v_names))


def cache_slots(cache: KVCache) -> dict[str, Any]:
    """The slot arrays of a KV cache (inverse of `slots_cache`)."""
    if not cache.per_layer:
        return dict(k=cache.k, v=cache.v)
    k_names, v_names = cache_names(len(cache.k), True)
    return dict(zip(k_names, cache.k)) | dict(zip(v_names, cache.v))


def slot_shardings(slots: dict[str, Any], mesh: Any) -> dict[str, Any]:
    """Slot arrays (or their (shape, dtype) specs) on `mesh`: caches by the decode cache rule,
    the rest batch-major."""
    ndim = lambda x: len(x[0]) if isinstance(x, tuple) else x.ndim  # noqa: E731

    def sharding(name: str, x: Any) -> Any:
        kind = name.split("/")[0]
        if kind in ("k", "v"):
            return cache_sharding(mesh, DECODE_RULES, keys=kind == "k", per_layer="/" in name)
        return batch_sharding(mesh, DECODE_RULES, ndim(x))

    return {name: sharding(name, x) for name, x in slots.items()}


def slot_specs(config: Any, slots: int, max_len: int, platform: str | None = None
               ) -> dict[str, tuple[tuple[int, ...], Any]]:
    """(shape, dtype) of every slot array: the KV cache of `slots` rows x `max_len` positions
    (stacked, or one array per layer where the platform keeps it so: `cache_names`),
    each row's next-token logits, sampling state and parameters, tokens and log-probs so far."""
    from memagent_jax.models.model_config import dtype_from_name
    from memagent_jax.models.platform import per_layer_cache
    from memagent_jax.models.transformer import cache_shapes

    k_shape, v_shape = cache_shapes(config, slots, max_len, platform)
    dtype = dtype_from_name(config.dtype)
    if per_layer_cache(platform):
        k_names, v_names = cache_names(config.num_layers, True)
        cache = {n: (k_shape[1:], dtype) for n in k_names} | {n: (v_shape[1:], dtype) for n in v_names}
    else:
        cache = dict(k=(k_shape, dtype), v=(v_shape, dtype))

    S, W = slots, max_len
    return dict(
        **cache,
        logits=((S, config.vocab_size), jnp.float32), plen=((S,), jnp.int32),
        step=((S,), jnp.int32), active=((S,), jnp.bool_), keys=((S, 2), jnp.uint32),
        temperature=((S,), jnp.float32), top_p=((S,), jnp.float32), top_k=((S,), jnp.int32),
        max_new=((S,), jnp.int32), stop_ids=((S, MAX_STOP_IDS), jnp.int32),
        tokens=((S, W), jnp.int32), logps=((S, W), jnp.float32))


def abstract_slots(config: Any, slots: int, max_len: int, mesh: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The slot arrays as ShapeDtypeStructs on `mesh` (for ahead-of-time compiling)."""
    from memagent_jax.models.platform import mesh_platform

    specs = slot_specs(config, slots, max_len, mesh_platform(mesh))
    shardings = slot_shardings(specs, mesh)
    return {n: jax.ShapeDtypeStruct(shape, dt, sharding=shardings[n]) for n, (shape, dt) in specs.items()}


def abstract_new_rows(rows: int, mesh: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The prefill program's per-row keys and sampling parameters as ShapeDtypeStructs."""
    specs = dict(keys=((rows, 2), jnp.uint32), temperature=((rows,), jnp.float32),
                 top_p=((rows,), jnp.float32), top_k=((rows,), jnp.int32),
                 max_new=((rows,), jnp.int32), stop_ids=((rows, MAX_STOP_IDS), jnp.int32))
    return {n: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding(mesh, DECODE_RULES, len(shape)))
            for n, (shape, dt) in specs.items()}
