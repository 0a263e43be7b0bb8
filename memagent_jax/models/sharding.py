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


def cache_sharding(mesh: Mesh, rules: Rules = DECODE_RULES) -> NamedSharding:
    """KV cache [layers, B, S, kv_heads, head_dim]."""
    names = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
    return NamedSharding(mesh, logical_to_spec(names, rules))


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
