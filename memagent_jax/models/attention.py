"""Attention implementations behind one config key, `model.attention`.

- `xla`: the materialised reference: fp32 scores [B, K, G*T, S], masked, softmax, weighted sum.
  Works everywhere, for every mask; O(T*S) memory per head.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash kernel
  (GPU only; bf16/fp16 inputs). O(T) memory.
- `splash`: the Pallas TPU splash-attention kernel that JAX ships
  (`jax.experimental.pallas.ops.tpu.splash_attention`), causal block-sparse; on a CPU it runs in
  Pallas interpret mode (slow, for tests). O(T) memory.
- `blocked`: causal attention over query blocks, written here in plain JAX with its own backward.
  Query block i only multiplies keys up to its own end, so the masked upper triangle is mostly
  never computed (~56% of the score FLOPs and memory with 8 blocks); the backward is written out
  (dV, dP, dS, dQ, dK per block from the kept probabilities) instead of autodiff's transposes.
  Written here because no kernel the JAX release ships runs compiled on a CPU (the Pallas
  kernels are TPU/GPU only; `jax.nn.dot_product_attention`'s xla path is the materialised
  softmax). On XLA:CPU ~2x faster than `xla` for training (one layer at B=8, T=512, 4 heads /
  2 kv, hd=64: fwd+bwd 92 -> 45 ms). Recomputing the probabilities in the backward from the
  rows' log-sum-exp (flash-style, O(T) memory) measured 56 ms: the kept probabilities won on
  CPU, where memory is not the limit; use cudnn/splash for O(T) memory on GPU/TPU.
- `auto`: cudnn on GPU (bf16/fp16; cuDNN has no fp32 flash kernel), splash on TPU, blocked
  elsewhere (and on GPU in fp32).

The kernels serve every causal attention over the tokens of one call: training, log-prob
recomputation, full-context scoring and the prefill of fresh prompts (sampler `_prefill`: with a
kernel the whole prompt goes in one piece, its memory being O(T) or one query block; with `xla`
in `prefill_chunk` pieces over the cache). Right padding needs no length mask there: under a causal
mask a real token never attends to padding after it, and each row's logits are read at its own
last token. Decode (one query row per step against per-row cache offsets) uses `xla`; on TPU
with a bf16 cache the Pallas paged-attention kernel (models/paged_attention.py).

All take q [B, T, H, hd], k and v [B, S, K, hd] (grouped-query: H a multiple of K) and return
[B, T, H * hd]. Only `blocked` is written here; cudnn and splash are the JAX release's kernels.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from memagent_jax.models.paged_attention import paged_decode_attention, uses_paged_decode
from memagent_jax.models.platform import HEAD_MAJOR, ROWS, kv_cache_layout, target_platform

ATTENTION_IMPLS = ("xla", "cudnn", "splash", "blocked", "auto")
_MASK_VALUE = -1e30  # finite, so fully-masked rows give a uniform softmax instead of NaN
LIVE_READ_BUCKETS = 8  # a cached attention reads the cache in steps of 1/8 of its length


def resolve(impl: str, platform: str | None = None, dtype: Any = jnp.bfloat16) -> str:
    """The implementation `impl` names on `platform` (default: the default backend's) for
    activations of `dtype`."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention={impl!r}; expected one of {ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    platform = platform or target_platform()
    if platform in ("gpu", "cuda"):
        return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "blocked"
    return "splash" if platform == "tpu" else "blocked"


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention with materialised scores. q [B,T,H,hd]; k, v [B,S,K,hd]; mask
    [B,T,S] bool -> [B,T,H*hd]. (Head-major k, v [B,K,S,hd], a KV cache's layout:
    `head_major_attention`.)"""
    return head_major_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)


def head_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                         keys_tiled: bool = False) -> jax.Array:
    """`xla_attention` with keys and values head-major: k, v [B,K,S,hd]; `keys_tiled`: k
    [B,K,S/n,hd,n] (the CPU KV cache's keys: models/platform.py).

    The G = H/K query heads that share a KV head are folded into the query axis, so both products
    are plain batched matmuls over (B, K) with G*T rows: on XLA:CPU this halves the backward pass
    against a 5-D einsum (measured: 40 -> 21 ms per layer at B=32, T=128, H=4, hd=16). Tiled keys
    with one query per row (a decode step) are one small matmul per tile (the query broadcast
    over the tiles: a batch axis), which reads each tile in one sweep; with more queries, or in
    one tile, the keys are laid out [B,K,hd,S] for one matmul.
    """
    B, T, H, hd = q.shape
    K, S = v.shape[1], v.shape[2]
    G = H // K
    q = q.reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, hd)
    if keys_tiled and T == 1 and k.shape[2] > 1:  # [B,K,tiles,G,hd] x [B,K,tiles,hd,n]: per tile
        per_tile = jnp.broadcast_to(q[:, :, None], (B, K, k.shape[2], G, hd))
        scores = jnp.einsum("bktqd,bktdn->bktqn", per_tile, k, preferred_element_type=jnp.float32)
        scores = scores.transpose(0, 1, 3, 2, 4).reshape(B, K, G, S)
    else:  # one matmul over keys [B, K, hd, S] (tiles laid out so: a copy unless one tile)
        if keys_tiled:
            k = k.transpose(0, 1, 3, 2, 4).reshape(B, K, hd, S)
        scores = jnp.einsum("bkqd,bkds->bkqs" if keys_tiled else "bkqd,bksd->bkqs", q, k,
                            preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(hd)
    mask = jnp.broadcast_to(mask[:, None, None], (B, 1, G, T, S)).reshape(B, 1, G * T, S)
    scores = jnp.where(mask, scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), v)
    return out.reshape(B, K, G, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal attention with cuDNN's fused kernel (GPU). Same shapes as `xla_attention`."""
    B, T, H, hd = q.shape
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hd),
                                       implementation="cudnn")
    return out.reshape(B, T, H * hd)


def _make_splash_kernel(heads: int, length: int, block: int, interpret: bool) -> Any:
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                          block_kv_dq=block)
    mask = sa.MultiHeadMask([sa.CausalMask((length, length)) for _ in range(heads)])
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


@functools.lru_cache(maxsize=32)
def _cached_splash_kernel(heads: int, length: int, block: int, interpret: bool) -> Any:
    with jax.ensure_compile_time_eval():  # concrete mask tables, reusable across traces
        return _make_splash_kernel(heads, length, block, interpret)


def _splash_kernel(heads: int, length: int, block: int, interpret: bool) -> Any:
    """The kernel for `heads` heads over `length` tokens. Without a mesh context its mask tables
    are concrete and cached; under one (whose devices may be a TPU topology with no device to
    hold them) they are built as constants of the program being traced."""
    if jax.sharding.get_abstract_mesh().empty:
        return _cached_splash_kernel(heads, length, block, interpret)
    return _make_splash_kernel(heads, length, block, interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block: int = 128) -> jax.Array:
    """Causal attention with the Pallas splash kernel (TPU; interpret mode elsewhere). The
    sequence is zero-padded at the end to a multiple of the block (the kernel's tiles are
    multiples of 128 lanes; padding is causally after every real token, so it changes nothing);
    k/v heads are repeated for grouped queries. Under a mesh context the kernel runs per shard
    (`shard_map`: rows over the batch axes, heads over tensor): XLA cannot partition a Pallas
    call and would otherwise gather every row and head onto each device."""
    from memagent_jax.models.sharding import per_shard

    B, T, H, hd = q.shape
    K = k.shape[2]
    padded = -(-T // block) * block
    interpret = target_platform() != "tpu"

    def local(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        h, kv = q.shape[2], k.shape[2]
        pad = [(0, 0), (0, padded - T), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(x, pad) for x in (q * (1.0 / math.sqrt(hd)), k, v))
        k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)
        kernel = _splash_kernel(h, padded, block, interpret)
        heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [B, H, T, hd]
        out = jax.vmap(kernel)(heads_first(q), heads_first(k), heads_first(v))
        return heads_first(out)[:, :T].astype(q.dtype)

    spec = lambda rows, heads: jax.sharding.PartitionSpec(rows, None, heads, None)  # noqa: E731
    local = per_shard(local, B, (H, K), lambda rows, heads: ((spec(rows, heads),) * 3, spec(rows, heads)))
    return local(q, k, v).reshape(B, T, H * hd)


def block_rows(length: int) -> int:
    """Query rows per block of `blocked_attention`: 8 blocks (>= 64 rows, <= 512 rows each: few
    programs to compile at long lengths, small score tiles)."""
    return max(64, min(512, -(-length // 8)))


def _fold(x: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, H, hd] -> [B, K, G, T, hd]: the G query heads of each kv head together."""
    B, T, H, hd = x.shape
    return x.reshape(B, T, kv_heads, H // kv_heads, hd).transpose(0, 2, 3, 1, 4)


def _block_scores(q_rows: jax.Array, k: jax.Array, start: int, scale: float) -> jax.Array:
    """Causally masked fp32 scores of query rows start ... start + R - 1 ([B, K, G, R, hd],
    flattened to G*R rows) against keys 0 ... start + R - 1 ([B, S, K, hd])."""
    B, K, G, R, hd = q_rows.shape
    S = k.shape[1]
    s = jnp.einsum("bkqd,bskd->bkqs", q_rows.reshape(B, K, G * R, hd), k,
                   preferred_element_type=jnp.float32) * scale
    causal = jnp.arange(S)[None, :] <= start + jnp.arange(R)[:, None]  # [R, S]
    causal = jnp.broadcast_to(causal[None], (G, R, S)).reshape(G * R, S)
    return jnp.where(causal, s, _MASK_VALUE)


def query_blocks(length: int, rows: int | None = None) -> list[tuple[int, int]]:
    """The (start, end) query rows of each block of `blocked_attention` (default
    `block_rows(length)` rows per block); block i attends to keys 0 ... end - 1."""
    rows = rows or block_rows(length)
    return [(a, min(a + rows, length)) for a in range(0, length, rows)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(q: jax.Array, k: jax.Array, v: jax.Array, rows: int) -> jax.Array:
    return _blocked_fwd(q, k, v, rows)[0]


def _blocked_fwd(q: jax.Array, k: jax.Array, v: jax.Array, rows: int) -> tuple[jax.Array, Any]:
    B, T, H, hd = q.shape
    K = k.shape[2]
    scale = 1.0 / math.sqrt(hd)
    q5 = _fold(q, K)
    outs, probs = [], []
    for a, b in query_blocks(T, rows):
        s = _block_scores(q5[:, :, :, a:b], k[:, :b], a, scale)
        top = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - top)
        total = jnp.sum(e, axis=-1, keepdims=True)
        o = jnp.einsum("bkqs,bskd->bkqd", e.astype(v.dtype), v[:, :b],
                       preferred_element_type=jnp.float32) / total
        outs.append(o.reshape(B, K, H // K, b - a, hd))
        probs.append(e / total)
    o5 = jnp.concatenate(outs, axis=3).astype(q.dtype)  # [B, K, G, T, hd]
    out = o5.transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd)
    return out, (q5, k, v, o5, tuple(probs))


def _blocked_bwd(rows: int, res: Any, d_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q5, k, v, o5, probs = res
    B, K, G, T, hd = q5.shape
    scale = 1.0 / math.sqrt(hd)
    do5 = d_out.reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4)
    delta5 = jnp.sum(do5.astype(jnp.float32) * o5.astype(jnp.float32), axis=-1)  # [B, K, G, T]
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for (a, b), p in zip(query_blocks(T, rows), probs):
        R = b - a
        q_rows = q5[:, :, :, a:b]
        do = do5[:, :, :, a:b].reshape(B, K, G * R, hd)
        delta = delta5[:, :, :, a:b].reshape(B, K, G * R, 1)
        dv = dv.at[:, :b].add(jnp.einsum("bkqs,bkqd->bskd", p.astype(do.dtype), do,
                                         preferred_element_type=jnp.float32))
        dp = jnp.einsum("bkqd,bskd->bkqs", do, v[:, :b], preferred_element_type=jnp.float32)
        ds = (p * (dp - delta) * scale).astype(k.dtype)
        dq_blocks.append(jnp.einsum("bkqs,bskd->bkqd", ds, k[:, :b],
                                    preferred_element_type=jnp.float32).reshape(B, K, G, R, hd))
        dk = dk.at[:, :b].add(jnp.einsum("bkqs,bkqd->bskd", ds, q_rows.reshape(B, K, G * R, hd),
                                         preferred_element_type=jnp.float32))
    dq = jnp.concatenate(dq_blocks, axis=3).transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, hd)
    return dq.astype(q5.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
# jitted, so an eager call (a test, an un-jitted forward) compiles the unrolled blocks once per
# shape instead of dispatching each small op; inside a jit it is inlined
_blocked_jit = jax.jit(_blocked, static_argnums=3)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, rows: int | None = None) -> jax.Array:
    """Causal attention over query blocks of `rows` rows (default `block_rows(T)`) with its own
    backward from the blocks' kept probabilities. q [B, T, H, hd], k/v [B, T, K, hd] (keys at the
    queries' positions) -> [B, T, H * hd]."""
    return _blocked_jit(q, k, v, rows or block_rows(q.shape[1]))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str) -> jax.Array:
    """The cache-free causal forward by implementation (`mask` is the causal [B,T,T] for xla)."""
    impl = resolve(impl, dtype=q.dtype)
    if impl == "cudnn":
        return cudnn_attention(q, k, v)
    if impl == "splash":
        return splash_attention(q, k, v)
    if impl == "blocked":
        return blocked_attention(q, k, v)
    return xla_attention(q, k, v, mask)


def live_read_lengths(cache_len: int, buckets: int = LIVE_READ_BUCKETS, multiple: int = 16
                      ) -> tuple[int, ...]:
    """The static key counts a cached attention may read: `buckets` steps up to the cache
    length, each a multiple of `multiple` (fewer when the cache is short)."""
    step = max(multiple, -(-cache_len // buckets // multiple) * multiple)
    return tuple(sorted({min(cache_len, step * j) for j in range(1, -(-cache_len // step) + 1)}))


def live_cache_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array | None,
                         query_slot: jax.Array) -> jax.Array:
    """Attention of new queries over layer `layer` of the stacked KV cache (`KVCache`, in the
    target's layout: models/platform.py), or over one layer's arrays with `layer` None (a
    per-layer cache), the queries' own keys already written. q [B,T,H,hd]; query_slot [B,T]:
    query t of row b attends to slots <= query_slot[b, t] -> [B,T,H*hd].

    On CPU (head-major cache) the keys read are the first R slots, R the smallest of
    `live_read_lengths(S)` (in whole key tiles when the keys are tiled) above every row's last
    query slot: a `lax.switch` over those static lengths, each branch slicing its length from
    the cache, so the program has static shapes and a decode step reads the cache up to the
    longest live row (rounded to S/8), not the padding of the prompt bucket and the new-token
    budget behind it. A slice is a copy (XLA:CPU's matmuls
    take whole buffers): from a stacked cache every read copies anyway (the layer's slice), so
    every length is a branch; from a layer's own arrays the copy is made only for R <= S/2 and
    longer reads take the arrays whole, uncopied (a copied read moves ~3R bytes per slot against
    S: bench/sampler.py's decode step, live reads of 288-384 of 384 slots, 3.8 ms with copies,
    3.2 without).
    On TPU (rows cache) a decode step (one query per row) of a bf16 cache is the Pallas
    paged-attention kernel, which reads each row's live slots only (models/paged_attention.py;
    it computes from bf16 keys and values, so an fp32 cache keeps the XLA path). Otherwise, and
    on GPU (slot-major cache), the read is the whole layer, fused: the switch made the compiler
    copy the cache every step (tests/test_live_cache_attention.py checks there is none).
    """
    zero = jnp.int32(0)
    per_layer = layer is None
    layout = kv_cache_layout()
    if layout != HEAD_MAJOR:
        # qwen2_5_7b_memagent_v5p32's decode: 62.9 GiB of temporaries with the stacked cache as a
        # switch operand, 23.0 with the layer's slice, 1.2 reading it whole and fused.
        if per_layer:
            k_cache, v_cache, layer = k_cache[None], v_cache[None], zero
        if layout == ROWS and uses_paged_decode(q.shape[1], k_cache):
            lengths = jnp.minimum(query_slot[:, 0] + 1, k_cache.shape[3])
            return paged_decode_attention(q, k_cache, v_cache, layer, lengths)
        shape = (1,) + k_cache.shape[1:]
        k = jax.lax.dynamic_slice(k_cache, (layer, zero, zero, zero, zero), shape)[0]
        v = jax.lax.dynamic_slice(v_cache, (layer, zero, zero, zero, zero), shape)[0]
        slots = k.shape[2 if layout == ROWS else 1]
        mask = jnp.arange(slots, dtype=jnp.int32)[None, None, :] <= query_slot[:, :, None]
        if layout == ROWS:
            return head_major_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        return xla_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    B, K, S = v_cache.shape[-4], v_cache.shape[-3], v_cache.shape[-2]
    tiles, hd, tile = k_cache.shape[-3:]
    lengths = live_read_lengths(S, multiple=tile if tiles > 1 else 16)  # whole tiles, or slots of one
    if per_layer:
        lengths = tuple(n for n in lengths if 2 * n <= S) + (S,)

    def read(length: int) -> Any:
        def attend(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array) -> jax.Array:
            k_shape = (B, K, length // tile, hd, tile) if tiles > 1 else (B, K, 1, hd, length)
            if per_layer and length == S:
                k, v = k_cache, v_cache
            elif per_layer:
                k, v = jax.lax.slice(k_cache, (0,) * 5, k_shape), v_cache[:, :, :length]
            else:
                k = jax.lax.dynamic_slice(k_cache, (layer, zero, zero, zero, zero, zero), (1,) + k_shape)[0]
                v = jax.lax.dynamic_slice(v_cache, (layer, zero, zero, zero, zero), (1, B, K, length, hd))[0]
            mask = jnp.arange(length, dtype=jnp.int32)[None, None, :] <= query_slot[:, :, None]
            return head_major_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, keys_tiled=True)
        return attend

    if len(lengths) == 1:  # a short cache, or only long reads: no switch
        return read(lengths[0])(q, k_cache, v_cache)
    need = jnp.max(query_slot) + 1
    # the first length >= need: a count, not searchsorted (its loop ran inside every decode step)
    index = jnp.minimum(jnp.sum(jnp.asarray(lengths, jnp.int32) < need), len(lengths) - 1)
    return jax.lax.switch(index, [read(n) for n in lengths], q, k_cache, v_cache)
