"""Decode attention on TPU with the Pallas paged-attention kernel that JAX ships.

`jax.experimental.pallas.ops.tpu.paged_attention` attends one query per sequence over that
sequence's pages of a [kv_heads, pages, page_size, head_dim] pool, reading only the pages below
the sequence's length (DMA from HBM, double-buffered). The TPU KV cache (models/platform.py,
"rows": keys and values [layers, batch, kv_heads, slots, head_dim]) is such a pool without a
copy: every (layer, row, kv head) owns `slots` contiguous slots, so the stacked cache reshapes
for free into one pool of pages of `page_size` slots, one "kv head" wide, and the G = H/K query
heads of row b's kv head k become the queries of sequence (layer, b, k), whose page table is
consecutive pages. A decode step so reads each row's live slots of one layer, not the whole
layer (the XLA path's fused read), and the stacked cache is passed whole: a layer's slice fed to
a custom call would be copied each layer and step.

The step's own key and value are written by a small Pallas kernel too (`paged_cache_write`: for
each row its slot's tile of 16 slots is read, updated and written back by DMA, the cache aliased
in place; a DMA may only start on a tile). Written by XLA's scatter, the TPU compiler laid the
cache out with the kv heads inside the (8, 128) tiles, a layout the attention kernel cannot read,
and copied the whole cache into the kernel's layout at every layer and step
(qwen2_5_7b_memagent_v5p32's decode compiled with 2 layers: 5.6 GB of temporaries, 1.2 without).

Under a mesh context the kernels run per shard (`shard_map`: rows over the batch axes, kv heads
over tensor, as the cache is sharded: models/sharding.py `cache_sharding`); off a TPU they run in
Pallas' TPU interpret mode (tests).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import jax
import jax.numpy as jnp

from memagent_jax.models.platform import device_platform
from memagent_jax.models.sharding import per_shard

PAGE_SIZES = (128, 64, 32, 16)  # slots per page, largest first; TPU tiles are 8-16 x 128
BLOCK_SLOTS = 512  # slots per kernel compute block (pages_per_compute_block * page_size)


def page_size(slots: int) -> int | None:
    """Slots per page for a cache of `slots` slots (the largest of PAGE_SIZES dividing it), or
    None when none divides it (the XLA path is used then)."""
    return next((p for p in PAGE_SIZES if slots % p == 0), None)


def _pages_per_block(pages: int, page: int, block_slots: int) -> int:
    """The largest divisor of `pages` with at most `block_slots` slots."""
    limit = max(1, block_slots // page)
    return max(d for d in range(1, min(pages, limit) + 1) if pages % d == 0)


def uses_paged_decode(queries: int, k_cache: jax.Array) -> bool:
    """Whether a cached forward of `queries` new tokens per row over the TPU's rows cache
    `k_cache` [L, B, K, S, hd] writes and attends with the kernels here: one token (a decode
    step), a bf16 cache (the attention kernel computes from bf16) and S divisible into pages."""
    return queries == 1 and k_cache.dtype == jnp.bfloat16 and page_size(k_cache.shape[3]) is not None


def _interpret() -> Any:
    """Pallas' TPU interpret mode where the program's devices are not TPUs (tests), else nothing:
    a program for a TPU topology compiles the kernels with Mosaic."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.force_tpu_interpret_mode() if device_platform() != "tpu" else contextlib.nullcontext()


def paged_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
                           lengths: jax.Array, *, block_slots: int = BLOCK_SLOTS) -> jax.Array:
    """One query per row over layer `layer` of the stacked cache, row b reading its first
    lengths[b] slots. q [B, 1, H, hd]; k_cache, v_cache [L, B, K, S, hd]; lengths [B] int32
    (>= 1: the query's own key is written) -> [B, 1, H*hd]. The kernel reads a row in blocks of
    up to `block_slots` slots (whole pages), the last one masked past the row's length."""
    B, _, H, hd = q.shape
    L, _, K, S, _ = k_cache.shape
    page = page_size(S)
    if page is None:
        raise ValueError(f"paged decode attention needs a cache length divisible by one of "
                         f"{PAGE_SIZES}; got {S}")

    def local(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
              lengths: jax.Array) -> jax.Array:
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

        b, h, kv = q.shape[0], q.shape[2], k_cache.shape[2]
        pages = S // page
        # sequence (b, k) of this layer: its pages are consecutive in the [L, b, kv, S] pool
        seq = (layer * b + jnp.arange(b, dtype=jnp.int32)[:, None]) * kv + jnp.arange(kv, dtype=jnp.int32)
        table = seq.reshape(-1, 1) * pages + jnp.arange(pages, dtype=jnp.int32)[None, :]
        pool = lambda c: c.reshape(1, L * b * kv * pages, page, hd)  # noqa: E731  (free: contiguous)
        queries = (q * (1.0 / math.sqrt(hd))).astype(k_cache.dtype).reshape(b * kv, h // kv, hd)
        with _interpret():
            out = paged_attention(queries, pool(k_cache), pool(v_cache),
                                  jnp.repeat(lengths.astype(jnp.int32), kv), table,
                                  pages_per_compute_block=_pages_per_block(pages, page, block_slots))
        return out.reshape(b, 1, h * hd).astype(q.dtype)

    P = jax.sharding.PartitionSpec
    cache = lambda rows, head: P(None, rows, head, None, None)  # noqa: E731
    local = per_shard(local, B, (H, K), lambda rows, head: (
        (P(rows, None, head, None), cache(rows, head), cache(rows, head), P(), P(rows)),
        P(rows, None, head)))
    return local(q, k_cache, v_cache, jnp.asarray(layer, jnp.int32), lengths)


SLOT_TILE = 16  # slots per HBM tile of a bf16 cache (8 sublanes x 2 packed): DMAs start on one


def _write_slot_kernel(layer_ref: Any, offset_ref: Any, new_ref: Any, cache_in: Any, cache_out: Any,
                       tile: Any, sem: Any) -> None:
    """Grid step b: row b's new entry [K, 1, hd] (VMEM) into cache[layer, b, :, offset[b]]. A DMA
    may only start on a tile of slots, so the row's tile is read, updated and written back."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    del cache_in  # the same buffer as cache_out (aliased)
    b = pl.program_id(0)
    offset = offset_ref[b]
    start = pl.multiple_of(offset // SLOT_TILE * SLOT_TILE, SLOT_TILE)
    slots = cache_out.at[layer_ref[0], b, :, pl.ds(start, SLOT_TILE)]
    read = pltpu.make_async_copy(slots, tile, sem)
    read.start()
    read.wait()
    at = jax.lax.broadcasted_iota(jnp.int32, tile.shape, 1) == offset - start
    tile[...] = jnp.where(at, jnp.broadcast_to(new_ref[0], tile.shape), tile[...])
    write = pltpu.make_async_copy(tile, slots, sem)
    write.start()
    write.wait()


def paged_cache_write(cache: jax.Array, new: jax.Array, layer: jax.Array, offset: jax.Array) -> jax.Array:
    """Writes new [B, 1, K, hd] (a decode step's keys or values) into layer `layer` of the rows
    cache [L, B, K, S, hd] at slot offset[b] of row b, in place; offsets are clipped to [0, S-1]
    like a scatter's CLIP mode. S must be a multiple of SLOT_TILE (`page_size` is)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    B, T, K, hd = new.shape
    S = cache.shape[3]
    if T != 1 or S % SLOT_TILE:
        raise ValueError(f"paged_cache_write writes one slot per row into a cache of a multiple of "
                         f"{SLOT_TILE} slots; got {T} new slots, a cache of {S}")
    update = new.astype(cache.dtype).transpose(0, 2, 1, 3)  # [B, K, 1, hd], the cache's order
    offset = jnp.clip(offset.astype(jnp.int32), 0, S - 1)

    def local(cache: jax.Array, update: jax.Array, layer: jax.Array, offset: jax.Array) -> jax.Array:
        b, kv = update.shape[0], update.shape[1]
        with _interpret():  # read when the call is built
            call = pl.pallas_call(
                _write_slot_kernel,
                grid_spec=pltpu.PrefetchScalarGridSpec(
                    num_scalar_prefetch=2, grid=(b,),
                    in_specs=[pl.BlockSpec((1, kv, 1, hd), lambda i, *_: (i, 0, 0, 0)),
                              pl.BlockSpec(memory_space=pl.ANY)],
                    out_specs=pl.BlockSpec(memory_space=pl.ANY),
                    scratch_shapes=[pltpu.VMEM((kv, SLOT_TILE, hd), cache.dtype),
                                    pltpu.SemaphoreType.DMA(())]),
                out_shape=jax.ShapeDtypeStruct(cache.shape, cache.dtype),
                input_output_aliases={3: 0})  # operands: layer, offset, update, cache
        return call(layer.reshape(1), offset, update, cache)

    P = jax.sharding.PartitionSpec
    local = per_shard(local, B, (K,), lambda rows, head: (
        (P(None, rows, head, None, None), P(rows, head, None, None), P(), P(rows)),
        P(None, rows, head, None, None)))
    return local(cache, update, jnp.asarray(layer, jnp.int32), offset)
