"""Qwen2 / Qwen3 / Llama family decoder in Flax NNX with scanned layers and a KV-cache aware forward.

Layer weights are stacked along a leading `layers` axis and the forward runs one `lax.scan` over
them (compile time independent of depth; `scan_layers=False` unrolls it: faster steps for
shallow models on XLA:CPU), with a configurable remat policy. Weights are stored
as [in, out] matrices. The same forward serves training (no cache), prefill and one-token decode
(cache with per-row write offsets), so sampler and trainer log-probs come from one function.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memagent_jax.models.attention import causal_attention, live_cache_attention, xla_attention
from memagent_jax.models.lora import (
    dropout_key, init_adapters, lora_dropout, lora_logical_axes, lora_shapes,
)
from memagent_jax.models.model_config import ModelConfig, dtype_from_name
from memagent_jax.models.paged_attention import paged_cache_write, uses_paged_decode
from memagent_jax.models.platform import ROWS, cache_axes, cache_length, key_tile, kv_cache_layout
from memagent_jax.models.sharding import constrain_batch, constrain_vocab


class KVCache(NamedTuple):
    """Keys and values of every layer in the target platform's layout (models/platform.py):
    on CPU k [layers, batch, kv_heads, slots / tile, head_dim, tile] (`key_tile`), v [layers, batch,
    kv_heads, slots, head_dim]; on TPU [layers, batch, kv_heads, slots, head_dim], on GPU
    [layers, batch, slots, kv_heads, head_dim] (`cache_shapes`).
    Per layer (`per_layer`, the CPU sampler's): k and v are tuples of one array per layer, the
    same shapes without the leading layers axis, and the forward unrolls its layers over them."""

    k: Any
    v: Any

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, length: int, dtype: Any = None, *,
              per_layer: bool = False) -> "KVCache":
        dtype = dtype or dtype_from_name(config.dtype)
        k_shape, v_shape = cache_shapes(config, batch, length)
        if per_layer:
            return cls(tuple(jnp.zeros(k_shape[1:], dtype) for _ in range(k_shape[0])),
                       tuple(jnp.zeros(v_shape[1:], dtype) for _ in range(v_shape[0])))
        return cls(jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype))

    @property
    def per_layer(self) -> bool:
        """True when k and v are tuples of one array per layer."""
        return isinstance(self.k, (tuple, list))

    def map(self, fn: Any) -> "KVCache":
        """`fn` applied to every array (keys then values, every layer's when per layer) with a
        `keys` flag: fn(array, keys) -> array."""
        if self.per_layer:
            return KVCache(tuple(fn(x, True) for x in self.k), tuple(fn(x, False) for x in self.v))
        return KVCache(fn(self.k, True), fn(self.v, False))


def cache_shapes(config: ModelConfig, batch: int, length: int, platform: str | None = None
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the KV cache's keys and values (`KVCache`) for `platform` (None: the target's),
    `length` slots rounded up to the layout's multiple (`slot_multiple`: the CPU's key tiles;
    the slots behind a row's last written one are never attended to)."""
    length = cache_length(config.head_dim, length, platform)
    tile = key_tile(config.head_dim, length)
    sizes = dict(layers=config.num_layers, batch=batch, kv_heads=config.num_kv_heads,
                 head_dim=config.head_dim, cache_length=length, key_tiles=length // tile,
                 tile_slots=tile)
    k_axes, v_axes = cache_axes(platform)
    return tuple(sizes[a] for a in k_axes), tuple(sizes[a] for a in v_axes)


# Logical axes of every weight (path -> names); sharding.py maps names to mesh axes.
def param_logical_axes(config: ModelConfig) -> dict[str, tuple[str | None, ...]]:
    """Logical axis names of each parameter, keyed by its '/'-joined path in the NNX state."""
    axes: dict[str, tuple[str | None, ...]] = {
        "embed": ("vocab", "embed"),
        "final_norm": ("norm",),
        "layers/input_norm": ("layers", "norm"),
        "layers/post_norm": ("layers", "norm"),
        "layers/q_proj": ("layers", "embed", "heads"),
        "layers/k_proj": ("layers", "embed", "kv_heads"),
        "layers/v_proj": ("layers", "embed", "kv_heads"),
        "layers/o_proj": ("layers", "heads", "embed"),
        "layers/gate_proj": ("layers", "embed", "mlp"),
        "layers/up_proj": ("layers", "embed", "mlp"),
        "layers/down_proj": ("layers", "mlp", "embed"),
    }
    if config.qkv_bias:
        axes.update({
            "layers/q_bias": ("layers", "heads"),
            "layers/k_bias": ("layers", "kv_heads"),
            "layers/v_bias": ("layers", "kv_heads"),
        })
    if config.qk_norm:  # Qwen3: one RMSNorm weight over head_dim, shared by all heads
        axes.update({
            "layers/q_norm": ("layers", "head_dim"),
            "layers/k_norm": ("layers", "head_dim"),
        })
    if not config.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    axes.update(lora_logical_axes(config))  # adapters (models/lora.py), when config.lora is set
    return axes


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each parameter, keyed like `param_logical_axes`."""
    L, D, F, V = config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {
        "embed": (V, D), "final_norm": (D,),
        "layers/input_norm": (L, D), "layers/post_norm": (L, D),
        "layers/q_proj": (L, D, q), "layers/k_proj": (L, D, kv), "layers/v_proj": (L, D, kv),
        "layers/o_proj": (L, q, D),
        "layers/gate_proj": (L, D, F), "layers/up_proj": (L, D, F), "layers/down_proj": (L, F, D),
        "layers/q_bias": (L, q), "layers/k_bias": (L, kv), "layers/v_bias": (L, kv),
        "layers/q_norm": (L, config.head_dim), "layers/k_norm": (L, config.head_dim),
        "lm_head": (D, V),
        **lora_shapes(config),
    }
    return {k: shapes[k] for k in param_logical_axes(config)}


class DecoderLayers(nnx.Module):
    """All decoder blocks' weights, stacked on a leading layer axis."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        pdtype = dtype_from_name(config.param_dtype)
        init = nnx.initializers.normal(0.02)
        adapters = init_adapters(config, rngs) if config.lora is not None else {}
        for name, var in adapters.items():
            setattr(self, name, var)
        for path, shape in param_shapes(config).items():
            if not path.startswith("layers/") or path.split("/", 1)[1] in adapters:
                continue
            name = path.split("/", 1)[1]
            if name.endswith("norm"):
                value = jnp.ones(shape, pdtype)
            elif name.endswith("bias"):
                value = jnp.zeros(shape, pdtype)
            else:
                value = init(rngs.params(), shape, pdtype)
            setattr(self, name, nnx.Param(value))


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies (fp32), with Llama-3 frequency scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    scaling = config.rope_scaling_dict
    if scaling and scaling.get("rope_type") == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding (rotate-half convention) on x [B, T, N, hd] at positions [B, T]."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
    cos = jnp.concatenate([jnp.cos(freqs)] * 2, axis=-1)[:, :, None, :].astype(x.dtype)
    sin = jnp.concatenate([jnp.sin(freqs)] * 2, axis=-1)[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in fp32, cast back to the input dtype before the weight (as HF does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


attention = xla_attention  # the materialised implementation (models/attention.py)


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., D] @ w [D, F], with the weight gradient as one einsum over the leading axes.

    The same math as autodiff's; on XLA:CPU autodiff's dW transposes the [N, F] cotangent first
    and the projection backward ran ~2.5x slower (measured at [8, 512, 256] @ [256, 688]: 58 ms
    -> 23 ms for both gradients). Used without remat only: the remat policies (`dots`,
    `dots_no_batch`) name autodiff's dot_general outputs, which a custom VJP would hide."""
    return x @ w


def _linear_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return x @ w, (x, w)


def _linear_bwd(res: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    return dy @ w.T, jnp.einsum("...d,...f->df", x, dy)


linear.defvjp(_linear_fwd, _linear_bwd)


def write_cache(cache: jax.Array, new: jax.Array, layer: Any, offset: jax.Array, *,
                keys: bool = False) -> jax.Array:
    """Writes new [B, T, K, hd] into the cache's keys (`keys`) or values (target's layout) at
    slots offset[b] ... offset[b] + T - 1 of row b: into layer `layer` of the stacked cache, or,
    with `layer` None, into one layer's array (a per-layer cache, `KVCache.per_layer`).

    A TPU decode step's write (rows cache, the paged kernels' case) is a Pallas DMA per row
    (models/paged_attention.py: a scatter made the compiler re-lay the cache out). Elsewhere one
    scatter of only the new entries, in place in a loop carry: copying the [B, S, K, hd]
    layer slice, updating it and writing it back made the CPU sampler ~1.6x slower end to end.
    The row is a scatter batching dimension, so a batch-sharded cache is updated shard-locally
    (no all-gather of indices or updates). Out-of-range slots clip, like dynamic_update_slice.
    """
    B = new.shape[0]
    if kv_cache_layout() == ROWS:
        stacked = cache if layer is not None else cache[None]  # a layer's own array: one layer
        if uses_paged_decode(new.shape[1], stacked):
            out = paged_cache_write(stacked, new, 0 if layer is None else layer, offset)
            return out if layer is not None else out[0]
    axes = cache_axes()[0 if keys else 1][(1 if layer is None else 0):]
    offset = offset.astype(jnp.int32)
    if "key_tiles" in axes:
        return _write_key_tiles(cache, new, layer, offset, axes)
    slot_axis = axes.index("cache_length")
    new_axes = ("batch", "cache_length", "kv_heads", "head_dim")
    order = tuple(new_axes.index(a) for a in axes if a != "layers")  # new in the cache's order
    update = new.astype(cache.dtype).transpose(order)  # [B, ...] in the cache's order
    if layer is None:  # indices [B, 1]: the slot
        dnums = jax.lax.ScatterDimensionNumbers(
            update_window_dims=(1, 2, 3), inserted_window_dims=(),
            scatter_dims_to_operand_dims=(slot_axis,), operand_batching_dims=(0,),
            scatter_indices_batching_dims=(0,))
        indices = offset[:, None]
    else:  # indices [B, 2]: (layer, slot)
        dnums = jax.lax.ScatterDimensionNumbers(
            update_window_dims=(1, 2, 3), inserted_window_dims=(0,),
            scatter_dims_to_operand_dims=(0, slot_axis), operand_batching_dims=(1,),
            scatter_indices_batching_dims=(0,))
        indices = jnp.stack([jnp.broadcast_to(jnp.asarray(layer, jnp.int32), (B,)), offset], axis=-1)
    return jax.lax.scatter(cache, indices, update, dnums,
                           indices_are_sorted=True, unique_indices=True,
                           mode=jax.lax.GatherScatterMode.CLIP)


def _write_key_tiles(cache: jax.Array, new: jax.Array, layer: Any, offset: jax.Array,
                     axes: tuple[str, ...]) -> jax.Array:
    """`write_cache` into keys in tiles ([layers,] batch, kv_heads, key_tiles, head_dim,
    tile_slots): one scatter index (tile, slot in tile) per new token, its [kv_heads, head_dim]
    the window. The first slot clips like a dynamic_update_slice's start."""
    B, T = new.shape[:2]
    tile = cache.shape[axes.index("tile_slots")]
    start = jnp.clip(offset, 0, cache.shape[axes.index("key_tiles")] * tile - T)
    slots = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    index = [slots // tile, slots % tile]
    tile_dims = (axes.index("key_tiles"), axes.index("tile_slots"))
    first = 0 if layer is None else 1  # the batch axis
    if layer is not None:
        index.insert(0, jnp.broadcast_to(jnp.asarray(layer, jnp.int32), (B, T)))
        tile_dims = (0,) + tile_dims
    dnums = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(2, 3), inserted_window_dims=tile_dims,
        scatter_dims_to_operand_dims=tile_dims, operand_batching_dims=(first,),
        scatter_indices_batching_dims=(0,))
    return jax.lax.scatter(cache, jnp.stack(index, axis=-1), new.astype(cache.dtype), dnums,
                           indices_are_sorted=True, unique_indices=True,
                           mode=jax.lax.GatherScatterMode.CLIP)


def _remat(fn: Any, policy: str) -> Any:
    if policy == "none":
        return fn
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    return jax.checkpoint(fn, policy=policies[policy], prevent_cse=False)


class Decoder(nnx.Module):
    """A causal LM: embed -> scanned blocks (GQA attention + SwiGLU MLP) -> RMSNorm -> logits.

    Attention projects to num_heads * head_dim (which need not equal hidden_size), with q/k/v
    bias (Qwen2) or per-head q/k RMSNorm (Qwen3) as the config says.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdtype = dtype_from_name(config.param_dtype)
        init = nnx.initializers.normal(0.02)
        shapes = param_shapes(config)
        self.embed = nnx.Param(init(rngs.params(), shapes["embed"], pdtype))
        self.layers = DecoderLayers(config, rngs)
        self.final_norm = nnx.Param(jnp.ones(shapes["final_norm"], pdtype))
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(init(rngs.params(), shapes["lm_head"], pdtype))

    # --------------------------------------------------------------------------- public
    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None, *,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """Causal forward without cache: int32 [B, T] -> fp32 logits [B, T, V]."""
        hidden, _ = self.hidden_states(input_ids, positions, dropout_rng=dropout_rng)
        return self.logits(hidden)

    def output_weight(self) -> jax.Array:
        """The [D, V] matrix of the LM head (the embedding's transpose when tied)."""
        return self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden states [B, ..., D] -> fp32 logits [B, ..., V], under a mesh
        context sharded like the LM head over the vocabulary (`constrain_vocab`)."""
        w = self.output_weight()
        if hidden.dtype == jnp.float32 and self.config.remat == "none":  # `linear`'s faster weight gradient
            return constrain_vocab(linear(hidden, w.astype(jnp.float32)))
        return constrain_vocab(jnp.einsum("...d,dv->...v", hidden, w.astype(hidden.dtype),
                                          preferred_element_type=jnp.float32))

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        *,
        cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
        from_start: bool = False,
        dropout_rng: jax.Array | None = None,
        last_index: jax.Array | None = None,
        layer_weights: list[dict[str, jax.Array]] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs the blocks; returns final-normed hidden states [B, T, D] and the updated cache.

        Without a cache the attention is causal over the T tokens (right padding is harmless).
        With a cache, row b's T new keys/values are written at slots cache_index[b] ... + T - 1
        and query t attends to slots <= cache_index[b] + t: prefill is cache_index = 0, one-token
        decode is cache_index = the row's current length. Positions default to slot indices.
        `from_start=True` says the cache holds nothing before these tokens (cache_index 0 for
        every row): the keys are then only the T new ones and the attention is the causal one of
        `model.attention`, as without a cache (a whole-prompt prefill with a flash kernel).
        `dropout_rng` (training forwards only): applies the LoRA adapters' dropout
        (model.lora.dropout; without adapters or at rate 0 it changes nothing).
        `last_index` [B] (a prefill's last prompt tokens): returns only position last_index[b]
        of row b, [B, 1, D]; with a per-layer cache the last layer then runs its attention
        queries, output projection and MLP for those positions only (the other positions' last
        layer feeds nothing but their keys and values, written before).
        A per-layer cache (`KVCache.per_layer`) unrolls the layers over its arrays, reading each
        layer's weights from `layer_weights` (`Decoder.layer_weights()`, computed once outside
        a decode loop so no step slices the stacked weights) or slicing them here.
        """
        cfg = self.config
        dtype = dtype_from_name(cfg.dtype)
        B, T = input_ids.shape
        offset = jnp.zeros((B,), jnp.int32) if cache_index is None else cache_index.astype(jnp.int32)
        if positions is None:
            positions = offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        x = constrain_batch(self.embed[...][input_ids].astype(dtype))
        inv_freq = jnp.asarray(rope_inv_freq(cfg))
        mask = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, axis=0)  # causal over the T new
        query_slot = offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]

        mm = linear if cfg.remat == "none" else jnp.matmul
        lora = cfg.lora
        dropping = lora is not None and lora.dropout > 0 and dropout_rng is not None

        def proj(x: jax.Array, p: dict[str, jax.Array], name: str, layer: Any) -> jax.Array:
            """x @ W, plus (alpha/rank) (dropout(x) @ A) @ B when `name` carries an adapter (lora.py)."""
            y = mm(x, p[name].astype(dtype))
            if lora is not None and name in lora.targets:
                x_a = lora_dropout(x, dropout_key(dropout_rng, layer, name), lora.dropout) if dropping else x
                low = mm(x_a, p[f"{name}_lora_a"].astype(dtype))
                y = y + mm(low, p[f"{name}_lora_b"].astype(dtype)) * jnp.asarray(lora.scale, dtype)
            return y

        def pick(a: jax.Array) -> jax.Array:  # [B, T, ...] -> [B, 1, ...] at last_index
            idx = last_index.astype(jnp.int32).reshape((B, 1) + (1,) * (a.ndim - 2))
            return jnp.take_along_axis(a, idx, axis=1)

        def block(carry: Any, xs: Any, last_only: bool = False) -> tuple[Any, None]:
            h, ck, cv = carry
            h = constrain_batch(h)  # the layer's input keeps the batch sharding (sharding.py)
            p, i = xs
            cache_layer = None if isinstance(i, int) else i  # per-layer arrays: no layer axis
            a = rms_norm(h, p["input_norm"], cfg.rms_norm_eps)
            q, k, v = proj(a, p, "q_proj", i), proj(a, p, "k_proj", i), proj(a, p, "v_proj", i)
            if cfg.qkv_bias:
                q, k, v = (q + p["q_bias"].astype(dtype), k + p["k_bias"].astype(dtype),
                           v + p["v_bias"].astype(dtype))
            q = q.reshape(B, T, cfg.num_heads, cfg.head_dim)
            k = k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
            if cfg.qk_norm:  # Qwen3: per-head RMSNorm over head_dim, before RoPE
                q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
                k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)
            v = v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
            if ck is not None:
                ck = write_cache(ck, k, cache_layer, offset, keys=True)
                cv = write_cache(cv, v, cache_layer, offset)
            if last_only:  # only the picked queries go on (the keys and values are all written)
                h, q = pick(h), pick(q)
                if ck is None or from_start:
                    idx = last_index.astype(jnp.int32)[:, None, None]
                    att = xla_attention(q, k, v, jnp.arange(T)[None, None, :] <= idx)
                else:
                    att = live_cache_attention(q, ck, cv, cache_layer, pick(query_slot))
            elif ck is None or from_start:  # causal over these T tokens: model.attention's kernel
                att = causal_attention(q, k, v, mask, cfg.attention)
            else:  # prefill / decode over the cache's live part: per-row offsets, materialised
                att = live_cache_attention(q, ck, cv, cache_layer, query_slot)
            h = h + proj(att, p, "o_proj", i)
            m = rms_norm(h, p["post_norm"], cfg.rms_norm_eps)
            gated = jax.nn.silu(proj(m, p, "gate_proj", i)) * proj(m, p, "up_proj", i)
            h = constrain_batch(h + proj(gated, p, "down_proj", i))
            return (h, ck, cv), None

        if cache is not None and cache.per_layer:  # unrolled over the layers' own arrays
            weights = layer_weights if layer_weights is not None else self.layer_weights()
            ks, vs = list(cache.k), list(cache.v)
            for i in range(cfg.num_layers):
                last_only = last_index is not None and i == cfg.num_layers - 1
                (x, ks[i], vs[i]), _ = block((x, ks[i], vs[i]), (weights[i], i), last_only)
            return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps), KVCache(tuple(ks), tuple(vs))
        carry = (x, None if cache is None else cache.k, None if cache is None else cache.v)
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, ck, cv), _ = jax.lax.scan(_remat(block, cfg.remat), carry, (self._stacked_weights(), layer_ids),
                                      unroll=1 if cfg.scan_layers else True)
        if last_index is not None:
            x = pick(x)
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        return x, (None if cache is None else KVCache(ck, cv))

    def _stacked_weights(self) -> dict[str, jax.Array]:
        """The decoder blocks' weights by name, each stacked over the layers."""
        return {path.split("/", 1)[1]: getattr(self.layers, path.split("/", 1)[1])[...]
                for path in param_logical_axes(self.config) if path.startswith("layers/")}

    def layer_weights(self) -> list[dict[str, jax.Array]]:
        """Each layer's weights by name (static slices of the stacked weights): computed once
        before a decode loop, the loop's steps read them in place (a per-layer cache's forward)."""
        stacked = self._stacked_weights()
        return [{name: w[i] for name, w in stacked.items()} for i in range(self.config.num_layers)]


def init_model(config: ModelConfig, seed: int = 0) -> Decoder:
    """A randomly initialised decoder (normal(0.02) weights, unit norms, zero biases)."""
    return Decoder(config, rngs=nnx.Rngs(seed))


def count_params(config: ModelConfig) -> int:
    """Number of parameters of a decoder with this config."""
    return int(sum(np.prod(s) for s in param_shapes(config).values()))
