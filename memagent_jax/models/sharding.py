"""Device mesh from config and ONE table of logical-axis rules for params, activations, caches, batches.

Mesh axes are (data, fsdp, tensor). Logical names used by the model and the pipeline map to mesh
axes through a rules table; the decode rule set drops fsdp from weights (replicated over fsdp
for generation, where weights are read every step and all-gathers per token would dominate).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, str | tuple[str, ...] | None]

TRAIN_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "cache_length": None,
    "key_tiles": None,  # the CPU's key tiles (models/platform.py): slots, replicated like them
    "tile_slots": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,  # also the Qwen3 q/k norm weights [layers, head_dim]: replicated
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "norm": None,
}
DECODE_RULES: dict[str, str | tuple[str, ...] | None] = {**TRAIN_RULES, "embed": None}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; -1 on one axis means "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh {sizes}: at most one axis may be -1 (axes {MESH_AXES})")
        known = math.prod(s for s in sizes if s != -1)
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices: "
                f"the product of fixed axes ({known}) must divide the device count"
            )
        sizes = [num_devices // known if s == -1 else s for s in sizes]
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices but "
                f"{num_devices} are available; set one axis to -1 or make the product match"
            )
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    config = config or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    shape = config.resolve(len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # non-TPU topologies: a plain reshape is fine
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Logical axis names -> PartitionSpec through the rules table (unknown name = error)."""
    out = []
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        out.append(rules[name])
    return PartitionSpec(*out)


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def named_sharding(
    mesh: Mesh, names: Sequence[str | None], rules: Rules, shape: Sequence[int] | None = None,
    what: str = "array",
) -> NamedSharding:
    """NamedSharding for logical `names`; with `shape`, checks each sharded dim divides evenly."""
    spec = logical_to_spec(names, rules)
    if shape is not None:
        for dim, (size, axes) in enumerate(zip(shape, spec)):
            n = _axis_size(mesh, axes)
            if size % n:
                raise ValueError(
                    f"{what}: dimension {dim} ({names[dim]}) of size {size} is not divisible by "
                    f"mesh axis {axes} of size {n}; choose a mesh whose {axes} size divides {size}"
                )
    return NamedSharding(mesh, spec)


def param_shardings(model_config: Any, mesh: Mesh, rules: Rules = TRAIN_RULES) -> dict[str, NamedSharding]:
    """Sharding of every weight ('/'-joined path -> NamedSharding), following the rules table.

    Besides even division of every sharded dimension, the mesh axes of `heads` / `kv_heads` must
    divide the head counts (a flat q/k/v dimension may divide while splitting single heads).
    """
    from memagent_jax.models.transformer import param_logical_axes, param_shapes

    shapes = param_shapes(model_config)
    counts = {"heads": model_config.num_heads, "kv_heads": model_config.num_kv_heads}
    axes = param_logical_axes(model_config)
    for path, names in axes.items():
        for name in names:
            n = _axis_size(mesh, rules.get(name)) if name in counts else 1
            if counts.get(name, 1) % n:
                raise ValueError(
                    f"weight {path!r}: logical axis {name!r} ({counts[name]} heads) is sharded "
                    f"over mesh axis {rules[name]!r} of size {n}, which does not divide it; choose a "
                    f"mesh whose {rules[name]!r} size divides {counts[name]}"
                )
    return {
        path: named_sharding(mesh, names, rules, shapes[path], what=f"weight {path!r}")
        for path, names in axes.items()
    }


def batch_sharding(mesh: Mesh, rules: Rules = TRAIN_RULES, ndim: int = 2) -> NamedSharding:
    """Batch-major arrays [B, ...]: batch over the rule's axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def activation_sharding(mesh: Mesh, rules: Rules = TRAIN_RULES) -> NamedSharding:
    """Hidden states [B, T, D]."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length", None), rules))


def cache_sharding(mesh: Mesh, rules: Rules = DECODE_RULES, *, keys: bool = False,
                   per_layer: bool = False) -> NamedSharding:
    """The KV cache's values (`keys`: keys) in the mesh platform's layout (models/platform.py);
    `per_layer`: one layer's array of a per-layer cache (no layers axis)."""
    from memagent_jax.models.platform import cache_axes, mesh_platform

    names = cache_axes(mesh_platform(mesh))[0 if keys else 1][(1 if per_layer else 0):]
    return NamedSharding(mesh, logical_to_spec(names, rules))


def constrain_cache(cache: Any, mesh: Mesh | None, rules: Rules = DECODE_RULES) -> Any:
    """A `KVCache` (stacked or per layer) constrained to the cache shardings on `mesh` (None:
    unchanged)."""
    if mesh is None:
        return cache
    return cache.map(lambda x, keys: jax.lax.with_sharding_constraint(
        x, cache_sharding(mesh, rules, keys=keys, per_layer=cache.per_layer)))


def batch_multiple(mesh: Mesh | None, rules: Rules = TRAIN_RULES) -> int:
    """Batch sizes must be multiples of this (the number of batch shards)."""
    return 1 if mesh is None else _axis_size(mesh, rules["batch"])


def shard_state(model: Any, mesh: Mesh, rules: Rules = TRAIN_RULES) -> Any:
    """Moves an NNX model's weights onto `mesh` following the rules (in place); returns it."""
    from flax import nnx

    shardings = param_shardings(model.config, mesh, rules)
    graphdef, state = nnx.split(model)
    flat = {
        path: jax.device_put(var.get_value(), shardings["/".join(map(str, path))])
        for path, var in nnx.to_flat_state(state)
    }
    nnx.update(model, nnx.from_flat_state(flat))
    return model


# --------------------------------------------------------------- activations inside jitted code
# The programs run under `jax.set_mesh(mesh)` (see `mesh_context`); the model reads the mesh from
# that context at trace time. Without one (a single device, a test) every helper is a no-op.
BATCH_AXES = ("data", "fsdp")  # the axes of the "batch" rule: the same in TRAIN and DECODE rules
HEAD_AXIS = "tensor"  # the axis of the "heads" / "kv_heads" / "mlp" / "vocab" rules


def mesh_context(mesh: Mesh | None) -> Any:
    """`with mesh_context(mesh):` around calls of the jitted programs: activations then keep
    their batch sharding (`constrain_batch`) and kernels run per shard. A no-op for None."""
    import contextlib

    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _context_mesh() -> Any:
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def context_batch_axes(rows: int | None = None) -> tuple[str, ...]:
    """The context mesh's batch axes (data, fsdp present with size > 1); () without a mesh or
    when `rows` is not a multiple of their product."""
    mesh = _context_mesh()
    if mesh is None:
        return ()
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if rows is not None and rows % math.prod(mesh.shape[a] for a in axes):
        return ()
    return axes


def context_head_axis(*counts: int) -> str | None:
    """The context mesh's tensor axis when it divides every count in `counts` (heads), else None."""
    mesh = _context_mesh()
    if mesh is None or HEAD_AXIS not in mesh.axis_names or mesh.shape[HEAD_AXIS] == 1:
        return None
    return HEAD_AXIS if all(c % mesh.shape[HEAD_AXIS] == 0 for c in counts) else None


def _rows_entry(rows: int) -> str | tuple[str, ...] | None:
    """The PartitionSpec entry splitting `rows` over the context mesh's batch axes (None: not split)."""
    axes = context_batch_axes(rows)
    return (axes if len(axes) > 1 else axes[0]) if axes else None


def batch_shards(rows: int) -> int:
    """How many ways the context mesh splits `rows` batch rows (1 without a mesh)."""
    mesh = _context_mesh()
    axes = context_batch_axes(rows)
    return math.prod(mesh.shape[a] for a in axes) if axes else 1


def constrain_batch(x: jax.Array) -> jax.Array:
    """Pins x [B, ...] to batch-over-(data, fsdp), the other dims replicated (inside jit, under a
    mesh context). Without it XLA's propagation can shard hidden states by the fsdp-sharded
    embedding dimension instead and replicate the batch on every device (measured for Qwen2.5-7B
    on v5p-32: a 64-row micro-batch per device became 512 rows, 48 GiB of temporaries)."""
    rows = _rows_entry(x.shape[0])
    if rows is None:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(rows, *([None] * (x.ndim - 1))))


def constrain_vocab(x: jax.Array) -> jax.Array:
    """Pins logits x [B, ..., V] to rows over the batch axes and the vocabulary over tensor, the
    LM head's own sharding (inside jit, under a mesh context; a no-op without one or when tensor
    does not divide V). A consumer that needs whole rows (sampling) then gathers the logits, not
    the head: unconstrained, the TPU compiler all-gathered the vocab-sharded LM head inside the
    engine's decode loop (qwen2_5_14b_memagent_v5p64: bf16[5120, 152064], 1.45 GiB, every step)."""
    head = context_head_axis(x.shape[-1])
    if head is None:
        return x
    return jax.lax.with_sharding_constraint(
        x, PartitionSpec(_rows_entry(x.shape[0]), *([None] * (x.ndim - 2)), head))


def per_shard(fn: Any, rows: int, heads: tuple[int, ...], specs: Any) -> Any:
    """`fn` run per shard of the context mesh (a Pallas kernel, which XLA cannot partition: it
    would gather every row and head onto each device): rows over the batch axes, heads over
    tensor when it divides every count in `heads`. `specs(rows_entry, head_axis)` -> (in_specs,
    out_specs). Without a mesh, or with nothing to split, `fn` itself."""
    batch, head = context_batch_axes(rows), context_head_axis(*heads)
    if not (batch or head):
        return fn
    in_specs, out_specs = specs(batch or None, head)
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def constrain_params(state: Any, model_config: Any, rules: Rules = TRAIN_RULES) -> Any:
    """Pins an nnx.State shaped like the weights (e.g. their gradients) to the weights' layout
    under `rules` (inside jit, under a mesh context; a no-op without one). Without it the
    compiler may return fsdp-replicated gradients (measured: 15.2 instead of 1.9 GiB per device
    for Qwen2.5-7B on v5p-32)."""
    from flax import nnx

    from memagent_jax.models.transformer import param_logical_axes

    if _context_mesh() is None:
        return state
    axes = param_logical_axes(model_config)
    flat = {path: var.replace(jax.lax.with_sharding_constraint(
                var.get_value(), logical_to_spec(axes["/".join(map(str, path))], rules)))
            for path, var in nnx.to_flat_state(state)}
    return nnx.from_flat_state(flat)
