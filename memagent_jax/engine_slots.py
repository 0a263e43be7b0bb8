"""The continuous engine's slot arrays: their shapes and dtypes, their shardings on a mesh, and
their abstract (ShapeDtypeStruct) versions for ahead-of-time compiling (`memagent-jax compile`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from memagent_jax.models.sharding import DECODE_RULES, batch_sharding, cache_sharding
from memagent_jax.sampler import MAX_STOP_IDS


def slot_shardings(slots: dict[str, Any], mesh: Any) -> dict[str, Any]:
    """Slot arrays (or their (shape, dtype) specs) on `mesh`: caches by the decode cache rule,
    the rest batch-major."""
    ndim = lambda x: len(x[0]) if isinstance(x, tuple) else x.ndim  # noqa: E731
    return {name: cache_sharding(mesh, DECODE_RULES, keys=name == "k") if name in ("k", "v")
            else batch_sharding(mesh, DECODE_RULES, ndim(x)) for name, x in slots.items()}


def slot_specs(config: Any, slots: int, max_len: int, platform: str | None = None
               ) -> dict[str, tuple[tuple[int, ...], Any]]:
    """(shape, dtype) of every slot array: the KV cache of `slots` rows x `max_len` positions,
    each row's next-token logits, sampling state and parameters, tokens and log-probs so far."""
    from memagent_jax.models.model_config import dtype_from_name
    from memagent_jax.models.transformer import cache_shapes

    k_shape, v_shape = cache_shapes(config, slots, max_len, platform)

    S, W = slots, max_len
    return dict(
        k=(k_shape, dtype_from_name(config.dtype)), v=(v_shape, dtype_from_name(config.dtype)),
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
