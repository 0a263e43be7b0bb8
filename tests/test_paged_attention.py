"""The TPU decode step's Pallas paged-attention kernel (run here in Pallas' TPU interpret mode) over
the rows cache [L, B, K, S, hd]: equal to the materialised attention, and run by the sampler's and
the engine's decode programs for TPU (per shard under a mesh: tests/multidevice/sharding_checks.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memagent_jax.models.attention import head_major_attention, live_cache_attention
from memagent_jax.models.paged_attention import page_size, paged_cache_write, paged_decode_attention


def _rows_cache(rng, L, B, K, S, hd):
    return tuple(jnp.asarray(rng.normal(size=(L, B, K, S, hd)), jnp.bfloat16) for _ in range(2))


def _reference(q, k, v, layer, lengths):  # fp32 softmax over each row's first lengths[b] slots
    mask = jnp.arange(k.shape[3])[None, None, :] < jnp.asarray(lengths)[:, None, None]
    return head_major_attention(q.astype(jnp.float32), k[layer].astype(jnp.float32),
                                v[layer].astype(jnp.float32), mask)


def test_page_sizes_divide_the_cache() -> None:
    assert page_size(384) == 128 and page_size(96) == 32 and page_size(48) == 16
    assert page_size(40) is None  # not a multiple of 16: the XLA read


def test_the_kernel_reads_each_rows_live_slots_of_one_layer() -> None:
    L, B, K, S, H, hd = 3, 4, 2, 96, 8, 16
    rng = np.random.default_rng(0)
    k, v = _rows_cache(rng, L, B, K, S, hd)
    q = jnp.asarray(rng.normal(size=(B, 1, H, hd)), jnp.bfloat16)
    lengths = jnp.asarray([1, 33, 96, 50], jnp.int32)
    for layer in range(L):
        got = jax.jit(paged_decode_attention)(q, k, v, jnp.int32(layer), lengths)
        np.testing.assert_allclose(np.asarray(got, np.float32), _reference(q, k, v, layer, lengths),
                                   atol=3e-2, rtol=3e-2)
    # the kernel reads a row in blocks up to its length: slots past the length in its last block
    # are masked (junk there changes nothing), later blocks and other layers are never read (NaN
    # there would poison the products)
    fn = jax.jit(lambda *a: paged_decode_attention(*a, block_slots=32))  # one 32-slot page a block
    clean = np.asarray(fn(q, k, v, jnp.int32(1), lengths), np.float32)
    noisy_k, noisy_v = k.at[0].set(jnp.nan).at[2].set(jnp.nan), v.at[0].set(jnp.nan)
    for row, length in enumerate([1, 33, 96, 50]):
        end = -(-length // 32) * 32
        noisy_k = noisy_k.at[1, row, :, length:end].set(1e4).at[1, row, :, end:].set(jnp.nan)
        noisy_v = noisy_v.at[1, row, :, length:end].set(-1e4).at[1, row, :, end:].set(jnp.nan)
    np.testing.assert_allclose(np.asarray(fn(q, noisy_k, noisy_v, jnp.int32(1), lengths), np.float32),
                               clean, rtol=1e-6)
    np.testing.assert_allclose(clean, _reference(q, k, v, 1, lengths), atol=3e-2, rtol=3e-2)


def test_the_write_kernel_puts_each_rows_entry_in_its_slot_and_nothing_else() -> None:
    """One slot per row of one layer, in place (each row's 16-slot tile read and written back):
    equal to the scatter's result, offsets past the cache clipped to its last slot."""
    L, B, K, S, hd = 3, 4, 2, 64, 16
    rng = np.random.default_rng(5)
    cache = jnp.asarray(rng.normal(size=(L, B, K, S, hd)), jnp.bfloat16)
    new = jnp.asarray(rng.normal(size=(B, 1, K, hd)), jnp.bfloat16)
    offset = jnp.asarray([0, 17, 63, 70], jnp.int32)
    got = np.asarray(jax.jit(paged_cache_write)(cache, new, jnp.int32(1), offset), np.float32)
    want = np.asarray(cache, np.float32).copy()
    for b, slot in enumerate([0, 17, 63, 63]):
        want[1, b, :, slot] = np.asarray(new[b, 0], np.float32)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="one slot per row"):
        paged_cache_write(cache, jnp.concatenate([new, new], axis=1), jnp.int32(0), offset)


@pytest.fixture
def on_tpu(monkeypatch):
    """Programs traced as for a TPU (rows cache, paged decode) on this CPU."""
    import memagent_jax.models.platform as platform_module

    monkeypatch.setattr(platform_module, "target_platform", lambda: "tpu")
    jax.clear_caches()
    yield
    jax.clear_caches()


def test_a_tpu_decode_step_of_a_bf16_cache_is_the_kernel(on_tpu) -> None:
    """One query per row over a bf16 rows cache: the kernel (a pallas_call in the program), equal
    to the read of the whole layer; an fp32 cache or several queries per row: the XLA read."""
    L, B, K, S, H, hd = 2, 2, 2, 64, 4, 16
    rng = np.random.default_rng(1)
    k, v = _rows_cache(rng, L, B, K, S, hd)
    q = jnp.asarray(rng.normal(size=(B, 1, H, hd)), jnp.bfloat16)
    slot = jnp.asarray([[7], [63]], jnp.int32)
    program = lambda *a: str(jax.make_jaxpr(live_cache_attention)(*a))  # noqa: E731
    assert "pallas_call" in program(q, k, v, jnp.int32(1), slot)
    got = live_cache_attention(q, k, v, jnp.int32(1), slot)
    np.testing.assert_allclose(np.asarray(got, np.float32), _reference(q, k, v, 1, slot[:, 0] + 1),
                               atol=3e-2, rtol=3e-2)
    assert "pallas_call" not in program(q.astype(jnp.float32), k.astype(jnp.float32),
                                        v.astype(jnp.float32), jnp.int32(1), slot)
    q3, slots3 = jnp.concatenate([q, q, q], axis=1), slot - 2 + jnp.arange(3)
    assert "pallas_call" not in program(q3, k, v, jnp.int32(1), slots3)


def test_a_layers_own_arrays_take_the_kernels_as_one_layer(on_tpu) -> None:
    """A per-layer rows cache (one layer's [B, K, S, hd] arrays, `layer` None) is written and read
    by the same kernels as a stacked cache of one layer."""
    from memagent_jax.models.transformer import write_cache

    B, K, S, H, hd = 2, 2, 32, 4, 16
    rng = np.random.default_rng(6)
    k, v = _rows_cache(rng, 1, B, K, S, hd)
    new = jnp.asarray(rng.normal(size=(B, 1, K, hd)), jnp.bfloat16)
    offset = jnp.asarray([3, 31], jnp.int32)
    program = str(jax.make_jaxpr(lambda c: write_cache(c, new, None, offset))(k[0]))
    assert "pallas_call" in program and "scatter" not in program
    np.testing.assert_array_equal(np.asarray(write_cache(k[0], new, None, offset), np.float32),
                                  np.asarray(write_cache(k, new, jnp.int32(0), offset)[0], np.float32))
    q = jnp.asarray(rng.normal(size=(B, 1, H, hd)), jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(live_cache_attention(q, k[0], v[0], None, offset[:, None]), np.float32),
        np.asarray(live_cache_attention(q, k, v, jnp.int32(0), offset[:, None]), np.float32))


@pytest.mark.slow  # 27 s in interpret mode; tests/multidevice's paged_decode check runs the kernel decode by default
def test_decode_steps_on_the_kernel_follow_the_cacheless_forward(on_tpu) -> None:
    """A bf16 model prefilled and then decoded one token at a time over the TPU's rows cache (the
    kernels at every step) gives the hidden states of the forward without a cache; the sampler's
    and the engine's decode programs for TPU run on it and agree on the greedy tokens."""
    from memagent_jax import engine, sampler
    from memagent_jax.models import KVCache, ModelConfig, init_model

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256, dtype="bfloat16",
                      attention="xla")
    model = init_model(cfg, 5)
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, 64, size=(2, 12)), jnp.int32)
    full, _ = model.hidden_states(ids)
    cache = KVCache.zeros(cfg, 2, 32)
    assert cache.k.shape == (2, 2, 2, 32, 16)  # [L, B, K, S, hd]
    _, cache = model.hidden_states(ids[:, :6], cache=cache, cache_index=jnp.zeros(2, jnp.int32))
    step = jax.jit(lambda tok, cache, at: model.hidden_states(tok, cache=cache, cache_index=at))
    # per layer (scanned: the body once) the attention kernel and the keys' and values' writes
    program = str(jax.make_jaxpr(step)(ids[:, 6:7], cache, jnp.full(2, 6, jnp.int32)))
    assert program.count("pallas_call") == 3 and "scatter" not in program
    for t in range(6, 12):
        hidden, cache = step(ids[:, t:t + 1], cache, jnp.full(2, t, jnp.int32))
        np.testing.assert_allclose(np.asarray(hidden[:, 0], np.float32), np.asarray(full[:, t], np.float32),
                                   atol=6e-2, rtol=6e-2)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 30))]
    out = sampler.generate(model, prompts, max_new_tokens=12)
    eng = engine.engine_generate(model, prompts, max_new_tokens=12, slots=2)
    assert out.tokens == eng.tokens and all(len(t) == 12 for t in out.tokens)
