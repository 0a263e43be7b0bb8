"""Abstract (ShapeDtypeStruct) weights and train state for `compile`: nothing is allocated.

`abstract_train_state` lays out the policy's weights by the training rules and builds the
TrainState the trainer would hold: all weights and their AdamW moments, or with LoRA only the
adapters and theirs, the frozen base weights apart (`rl/train_step.py: init_policy_state`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from memagent_jax.models.lora import LoraParam
from memagent_jax.models.model_config import ModelConfig
from memagent_jax.models.sharding import TRAIN_RULES, param_shardings
from memagent_jax.models.transformer import Decoder


def abstract(shape: tuple[int, ...], dtype: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct with a sharding."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def tree_bytes(tree: Any) -> int:
    """Per-device bytes of abstract arrays (their shard shapes)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def abstract_params(model: ModelConfig, mesh: Any, rules: Any, dtype: Any = None,
                    split_lora: bool = False) -> tuple[Any, ...]:
    """(graphdef, nnx.State of ShapeDtypeStructs) of a Decoder's weights laid out by `rules`;
    with `dtype`, floating weights in that dtype (the decode copy's cast). With `split_lora`
    (a LoRA shape): (graphdef, adapters, frozen base)."""
    abstract_model = nnx.eval_shape(lambda: Decoder(model, rngs=nnx.Rngs(0)))
    shardings = param_shardings(model, mesh, rules)

    def place(state: Any) -> Any:
        def one(path: tuple, var: Any) -> Any:
            x = var.get_value()
            dt = dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
            return var.replace(abstract(x.shape, dt, shardings["/".join(map(str, path))]))

        return nnx.from_flat_state({p: one(p, v) for p, v in nnx.to_flat_state(state)})

    if split_lora:
        graphdef, adapters, frozen = nnx.split(abstract_model, LoraParam, nnx.Param)
        return graphdef, place(adapters), place(frozen)
    graphdef, state = nnx.split(abstract_model, nnx.Param)
    return graphdef, place(state)


@dataclasses.dataclass
class AbstractTrainState:
    """What the trainer holds, abstract: the state the update donates and the frozen base."""

    graphdef: Any
    params: Any  # trainable: all weights, or the adapters
    frozen: Any  # the frozen base under LoRA adapters, else None
    state: Any  # TrainState(step, params, opt_state)
    tx: optax.GradientTransformation

    @property
    def param_bytes(self) -> int:
        return tree_bytes(self.params)

    @property
    def opt_bytes(self) -> int:
        return tree_bytes(self.state.opt_state)

    @property
    def frozen_bytes(self) -> int:
        return tree_bytes(self.frozen) if self.frozen is not None else 0


def abstract_train_state(model: ModelConfig, mesh: Any, lr: float) -> AbstractTrainState:
    """The abstract train state of `model` on `mesh` (TRAIN_RULES) with the trainer's optimizer."""
    from memagent_jax.rl.train_step import TrainState, make_optimizer

    repl = NamedSharding(mesh, PartitionSpec())
    if model.lora is not None:
        graphdef, params, frozen = abstract_params(model, mesh, TRAIN_RULES, split_lora=True)
    else:
        (graphdef, params), frozen = abstract_params(model, mesh, TRAIN_RULES), None
    tx = make_optimizer(lr, 1, 1)
    # AdamW's moments take their weights' layout (as tx.init of the sharded weights gives them
    # in train); its scalars are replicated
    opt_state = optax.tree_map_params(
        tx, lambda s, w: abstract(s.shape, s.dtype, w.sharding), jax.eval_shape(tx.init, params),
        params, transform_non_params=lambda s: abstract(s.shape, s.dtype, repl))
    state = TrainState(step=abstract((), jnp.int32, repl), params=params, opt_state=opt_state)
    return AbstractTrainState(graphdef, params, frozen, state, tx)
