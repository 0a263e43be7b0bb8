"""Low-rank adapters (LoRA) over the decoder's frozen projections: settings, parameters, merge.

A target projection y = x @ W (W [in, out], stacked over layers) becomes
y = x @ W + (alpha / rank) * (x @ A) @ B with A [in, rank] (PEFT's init: uniform(+-1/sqrt(in)))
and B [rank, out] (zeros, so a fresh adapter changes nothing). The adapters are `LoraParam`
variables (a subclass of `nnx.Param`) stored beside the weights they adapt, as
`layers/<target>_lora_a` / `layers/<target>_lora_b` [layers, ...], so the scanned layer loop
slices them with the weights and every path-keyed table (logical axes, shardings, gradient
constraints) covers them. `nnx.split(model, LoraParam, nnx.Param)` separates the trainable
adapters from the frozen base (`split_trainable`).

Why not qwix (Google's LoRA/quantization library): its LoraProvider intercepts the matmuls of
a module while tracing the model once and creates adapter params there; our projections run
inside `jax.lax.scan` over stacked weights (and through the custom-VJP `linear`), where creating
NNX variables fails (measured with qwix 0.1.8 on the tiny Qwen2 decoder, remat none and full:
`TraceContextError: Cannot mutate RngCount from a different trace level`), and all seven
projections sit in one module, so its module-path rules could not tell them apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memagent_jax.errors import InputError

#: Projection names LoRA can adapt (PEFT's / HF's module names), and the short aliases accepted.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ALIASES = {name.split("_")[0]: name for name in LORA_TARGETS}
#: Logical axes of each target's [layers, in, out] weight: the adapters' A [layers, in, rank]
#: and B [layers, rank, out] keep the in / out axes (rank replicated).
_TARGET_AXES = {
    "q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"), "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}


class LoraParam(nnx.Param):
    """A trainable adapter weight (the frozen base weights are plain `nnx.Param`)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapter settings (hashable: part of the model config, a static argument of every program).

    `dtype`: the adapters' storage dtype (the run's model.param_dtype; the frozen base is stored
    in model.dtype). `dropout`: PEFT's lora_dropout, the rate at which the adapter path's input
    is zeroed in training forwards (those given a `dropout_rng`; rollouts, old/reference
    log-probs and evaluation never drop).
    """

    rank: int
    alpha: float
    targets: tuple[str, ...] = LORA_TARGETS
    dropout: float = 0.0
    dtype: str = "float32"

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on (x @ A) @ B (PEFT's scaling without rsLoRA)."""
        return self.alpha / self.rank


def normalize_targets(targets: Any, where: str | None = None) -> tuple[str, ...]:
    """['q', 'v_proj', ...] -> ('q_proj', 'v_proj'); an unknown name is an InputError."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out: list[str] = []
    for t in targets:
        name = _ALIASES.get(str(t), str(t))
        if name not in LORA_TARGETS:
            raise InputError(f"model.lora.targets: unknown projection {t!r}", where,
                             f"use any of {', '.join(LORA_TARGETS)} (or q, k, v, o, gate, up, down)")
        if name not in out:
            out.append(name)
    if not out:
        raise InputError("model.lora.targets is empty", where,
                         f"list the projections to adapt, e.g. [{', '.join(LORA_TARGETS)}]")
    return tuple(out)


def target_dims(model_config: Any, target: str) -> tuple[int, int]:
    """(in, out) of one target projection of `model_config`."""
    D, F = model_config.hidden_size, model_config.intermediate_size
    q = model_config.num_heads * model_config.head_dim
    kv = model_config.num_kv_heads * model_config.head_dim
    return {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}[target]


def check_lora(lora: LoraConfig, model_config: Any, where: str | None = None) -> None:
    """InputError for a rank above a target's smaller dimension or a dropout outside [0, 1)."""
    if lora.rank < 1:
        raise InputError(f"model.lora.rank={lora.rank} must be >= 1 for adapters", where,
                         "set model.lora.rank=0 for full-parameter training, or a rank >= 1")
    for t in lora.targets:
        d_in, d_out = target_dims(model_config, t)
        if lora.rank > min(d_in, d_out):
            raise InputError(
                f"model.lora.rank={lora.rank} is larger than {t}'s dimension "
                f"({d_in} x {d_out}: a rank above {min(d_in, d_out)} is no longer low-rank)", where,
                f"set model.lora.rank <= {min(d_in, d_out)} or drop {t} from model.lora.targets")
    _check_dropout(lora.dropout, where)


def _check_dropout(dropout: float, where: str | None) -> None:
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"model.lora.dropout={dropout} must be in [0, 1) (the share of the adapter "
                         "path's inputs zeroed in training)", where,
                         "set model.lora.dropout to 0 (off) or a rate such as 0.05")


def lora_dropout(x: jax.Array, key: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout of the adapter path's input (PEFT's lora_dropout): each element is zeroed
    with probability `rate` and the rest scaled by 1 / (1 - rate), so its expectation is x."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def dropout_key(rng: jax.Array, layer: jax.Array, target: str) -> jax.Array:
    """The dropout key of one target projection in one layer (independent masks everywhere)."""
    return jax.random.fold_in(jax.random.fold_in(rng, layer), LORA_TARGETS.index(target))


def lora_shapes(model_config: Any) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter weight, keyed like `transformer.param_shapes` ('layers/q_proj_lora_a')."""
    lora = getattr(model_config, "lora", None)
    if lora is None:
        return {}
    L, out = model_config.num_layers, {}
    for t in lora.targets:
        d_in, d_out = target_dims(model_config, t)
        out[f"layers/{t}_lora_a"] = (L, d_in, lora.rank)
        out[f"layers/{t}_lora_b"] = (L, lora.rank, d_out)
    return out


def lora_logical_axes(model_config: Any) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of each adapter weight: A keeps its target's input axis, B its output axis."""
    lora = getattr(model_config, "lora", None)
    if lora is None:
        return {}
    out: dict[str, tuple[str | None, ...]] = {}
    for t in lora.targets:
        a_in, a_out = _TARGET_AXES[t]
        out[f"layers/{t}_lora_a"] = ("layers", a_in, None)
        out[f"layers/{t}_lora_b"] = ("layers", None, a_out)
    return out


def init_adapters(model_config: Any, rngs: nnx.Rngs) -> dict[str, LoraParam]:
    """Fresh adapters: A ~ uniform(+-1/sqrt(in)) (PEFT's kaiming-uniform with a=sqrt(5)), B = 0."""
    lora = model_config.lora
    dtype = jnp.dtype(lora.dtype)
    out = {}
    for path, shape in lora_shapes(model_config).items():
        name = path.split("/", 1)[1]
        if name.endswith("_a"):
            bound = 1.0 / np.sqrt(shape[1])
            value = jax.random.uniform(rngs.params(), shape, dtype, -bound, bound)
        else:
            value = jnp.zeros(shape, dtype)
        out[name] = LoraParam(value)
    return out


def add_lora(model: Any, lora: LoraConfig, *, seed: int = 0, mesh: Any = None) -> Any:
    """Attaches fresh adapters to a plain decoder (in place; its weights become the frozen base).

    Checks the settings against the model (`check_lora`); with `mesh` the adapters are laid out
    like the weights they adapt. Returns the model.
    """
    if getattr(model.config, "lora", None) is not None:
        raise ValueError("the model already has LoRA adapters")
    check_lora(lora, model.config)
    model.config = model.config.replace(lora=lora)
    for name, var in init_adapters(model.config, nnx.Rngs(seed)).items():
        setattr(model.layers, name, var)
    if mesh is not None:
        from memagent_jax.models.sharding import shard_state

        shard_state(model, mesh)
    return model


def split_trainable(model: Any) -> tuple[Any, Any, Any]:
    """(graphdef, trainable, frozen): with adapters, the adapters and the frozen base weights;
    without, all weights and None."""
    if getattr(model.config, "lora", None) is None:
        graphdef, params = nnx.split(model, nnx.Param)
        return graphdef, params, None
    return nnx.split(model, LoraParam, nnx.Param)


def adapter_delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * A @ B in fp32 over stacked layers: [L, in, r] x [L, r, out] -> [L, in, out]."""
    return scale * jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32))


def merged(model: Any) -> Any:
    """A plain decoder (no adapters) whose weights are W + (alpha/rank) A @ B, in W's dtype.

    The adapted model is unchanged; the merged one holds new buffers for the targets only (the
    other weights are shared)."""
    lora = getattr(model.config, "lora", None)
    if lora is None:
        return model
    base_config = model.config.replace(lora=None)
    graphdef, _, frozen = split_trainable(model)
    flat = dict(nnx.to_flat_state(frozen))
    for t in lora.targets:
        key = ("layers", t)
        w = flat[key].get_value()
        a, b = getattr(model.layers, f"{t}_lora_a")[...], getattr(model.layers, f"{t}_lora_b")[...]
        flat[key] = flat[key].replace((w.astype(jnp.float32) + adapter_delta(a, b, lora.scale)
                                       ).astype(w.dtype))
    plain = nnx.eval_shape(lambda: _decoder(base_config))
    plain_graphdef, _ = nnx.split(plain)
    return nnx.merge(plain_graphdef, nnx.from_flat_state(flat))


def _decoder(config: Any) -> Any:
    from memagent_jax.models.transformer import Decoder

    return Decoder(config, rngs=nnx.Rngs(0))


def zero_adapters(trainable: Any) -> Any:
    """The adapters' state with every value 0 (the base policy: the reference for the KL term,
    at the cost of adapter-sized buffers, not a second copy of the weights)."""
    return jax.tree.map(jnp.zeros_like, trainable)


def lora_from_section(section: Any, adapter_dtype: str, where: str | None = None) -> LoraConfig | None:
    """The config file's `model.lora` section -> LoraConfig (None when rank is 0)."""
    if section.rank < 0:
        raise InputError(f"model.lora.rank={section.rank} must be >= 0", where,
                         "set 0 (off) or a positive rank")
    if section.rank == 0:
        return None
    _check_dropout(float(section.dropout), where)
    alpha = float(section.alpha) if section.alpha else float(section.rank)
    lora = LoraConfig(rank=int(section.rank), alpha=alpha,
                      targets=normalize_targets(section.targets, where),
                      dropout=float(section.dropout), dtype=adapter_dtype)
    return lora


def freeze_base(model: Any, dtype: Any, where: str | None = None) -> Any:
    """Stores a plain decoder's floating weights in `dtype` (the frozen base's storage), in place.

    A weight that does not fit the dtype (a value beyond float16's range becomes inf) is an
    InputError naming it: such a base cannot be frozen in that dtype."""
    target = jnp.dtype(dtype)
    if not jnp.issubdtype(target, jnp.floating):
        raise InputError(f"LoRA freezes the base weights in model.dtype={target.name}, which is not "
                         "a floating dtype", where, "set model.dtype to bfloat16 or float32")
    _, state = nnx.split(model, nnx.Param)
    flat = {}
    for path, var in nnx.to_flat_state(state):
        x = var.get_value()
        y = x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x
        if jnp.issubdtype(y.dtype, jnp.floating) and not bool(jnp.isfinite(y).all()):
            name = "/".join(map(str, path))
            finfo = jnp.finfo(target)
            raise InputError(
                f"weight {name!r} cannot be frozen in model.dtype={target.name}: it has values "
                f"beyond {target.name}'s range (max {float(finfo.max):.6g}) or non-finite values",
                where, "set model.dtype=bfloat16 (float32's range) or float32 for LoRA")
        flat[path] = var.replace(y)
    nnx.update(model, nnx.from_flat_state(flat))
    model.config = model.config.replace(param_dtype=target.name)
    return model
