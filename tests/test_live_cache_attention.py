"""The cached attention reads only the live part of the KV cache and equals the full read."""

from __future__ import annotations

import functools

import jax
import pytest
import jax.numpy as jnp
import numpy as np

from memagent_jax.models.attention import live_cache_attention, live_read_lengths, xla_attention
from memagent_jax.models.platform import KEY_TILE, cache_length


def test_read_lengths_are_static_steps_up_to_the_cache_length() -> None:
    assert live_read_lengths(384) == (48, 96, 144, 192, 240, 288, 336, 384)
    assert live_read_lengths(20) == (16, 20)
    assert live_read_lengths(16) == (16,)
    assert live_read_lengths(1000) == (128, 256, 384, 512, 640, 768, 896, 1000)
    assert live_read_lengths(384, multiple=64) == (64, 128, 192, 256, 320, 384)  # whole key tiles
    assert live_read_lengths(1024, multiple=64) == (128, 256, 384, 512, 640, 768, 896, 1024)


def test_cache_lengths_round_up_to_whole_key_tiles_where_the_keys_are_tiled() -> None:
    from memagent_jax.models.transformer import cache_shapes
    from memagent_jax.models.model_config import ModelConfig

    assert cache_length(64, 600, "cpu") == 640 and cache_length(64, 640, "cpu") == 640
    assert cache_length(16, 600, "cpu") == 600  # head_dim < 32: one tile of all slots
    assert cache_length(64, 600, "tpu") == 600 and cache_length(64, 600, "gpu") == 600
    config = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=2,
                         num_heads=2, num_kv_heads=1, head_dim=64)
    keys, values = cache_shapes(config, batch=3, length=600, platform="cpu")
    assert keys == (2, 3, 1, 640 // KEY_TILE, 64, KEY_TILE) and values == (2, 3, 1, 640, 64)


def tiled(keys, tile=KEY_TILE):
    """Keys [..., hd, S] -> the CPU cache's tiles [..., S / tile, hd, tile]."""
    *lead, hd, S = keys.shape
    tiles = keys.reshape(*lead, hd, S // tile, tile)
    return jnp.moveaxis(tiles, -2, -3)


def _full(q, kc, vc, layer, query_slot):  # keys [L, B, K, hd, S], values [L, B, K, S, hd]
    S = vc.shape[3]
    mask = jnp.arange(S)[None, None, :] <= query_slot[:, :, None]
    return xla_attention(q, kc[layer].transpose(0, 3, 1, 2), vc[layer].transpose(0, 2, 1, 3), mask)


@pytest.mark.parametrize("tile", [KEY_TILE, "whole"])  # tiles, or one tile (head_dim < 32)
def test_live_read_equals_the_whole_cache_and_ignores_slots_behind_the_live_rows(tile) -> None:
    L, B, S, K, H, hd = 3, 4, 256, 2, 4, 8
    tiled_ = functools.partial(tiled, tile=S if tile == "whole" else tile)
    rng = np.random.default_rng(0)
    kc = jnp.asarray(rng.normal(size=(L, B, K, hd, S)), jnp.float32)
    vc = jnp.asarray(rng.normal(size=(L, B, K, S, hd)), jnp.float32)
    fn = jax.jit(live_cache_attention)
    for T, last in ((1, [5, 17, 3, 40]), (1, [255, 0, 12, 7]), (1, [70, 130, 3, 9]),
                    (3, [20, 30, 10, 2]), (3, [100, 60, 200, 2])):
        q = jnp.asarray(rng.normal(size=(B, T, H, hd)), jnp.float32)
        query_slot = jnp.asarray(last)[:, None] + jnp.arange(T)[None, :]
        for layer in range(L):
            got = fn(q, tiled_(kc), vc, jnp.int32(layer), query_slot)
            np.testing.assert_allclose(got, _full(q, kc, vc, layer, query_slot), rtol=1e-5, atol=1e-6)
    # what lies behind every row's live part changes nothing: slots 41-63 are read but masked,
    # slots from 64 (the next key tile) on are not read at all (NaN there would poison the
    # masked products)
    q = jnp.asarray(rng.normal(size=(B, 1, H, hd)), jnp.float32)
    query_slot = jnp.asarray([[5], [17], [3], [40]])
    noisy_k = kc.at[..., 41:].set(1e4).at[..., 64:].set(jnp.nan)
    noisy_v = vc.at[:, :, :, 41:].set(-1e4).at[:, :, :, 64:].set(jnp.nan)
    np.testing.assert_allclose(fn(q, tiled_(noisy_k), noisy_v, jnp.int32(1), query_slot),
                               fn(q, tiled_(kc), vc, jnp.int32(1), query_slot), rtol=1e-6)
    assert not np.isnan(np.asarray(fn(q, tiled_(noisy_k), noisy_v, jnp.int32(1), query_slot))).any()


@pytest.mark.parametrize("tile", [KEY_TILE, "whole"])  # tiles, or one tile (head_dim < 32)
def test_a_layers_own_arrays_are_read_live_when_short_and_whole_when_long(tile) -> None:
    """A per-layer cache's arrays (no layer axis): reads of at most half the cache are sliced to
    their live length (whole key tiles), longer ones take the arrays whole (a slice is a copy);
    both equal the full read."""
    B, S, K, H, hd = 4, 256, 2, 4, 8
    tiled_ = functools.partial(tiled, tile=S if tile == "whole" else tile)
    rng = np.random.default_rng(2)
    kc = jnp.asarray(rng.normal(size=(B, K, hd, S)), jnp.float32)
    vc = jnp.asarray(rng.normal(size=(B, K, S, hd)), jnp.float32)
    fn = jax.jit(lambda q, k, v, slot: live_cache_attention(q, k, v, None, slot))
    q = jnp.asarray(rng.normal(size=(B, 1, H, hd)), jnp.float32)
    for last in ([5, 17, 3, 40], [255, 0, 12, 7], [130, 60, 2, 9]):
        slot = jnp.asarray(last)[:, None]
        np.testing.assert_allclose(fn(q, tiled_(kc), vc, slot), _full(q, kc[None], vc[None], 0, slot),
                                   rtol=1e-5, atol=1e-6)
    # a short read (every row's last slot < 128 = S/2) does not touch the slots from 128 on ...
    short = jnp.asarray([[5], [17], [3], [100]])
    noisy_k, noisy_v = kc.at[..., 128:].set(jnp.nan), vc.at[:, :, 128:].set(jnp.nan)
    np.testing.assert_allclose(fn(q, tiled_(noisy_k), noisy_v, short), fn(q, tiled_(kc), vc, short),
                               rtol=1e-6)
    # ... a long one reads the arrays whole (NaN behind the live rows reaches the products)
    assert np.isnan(np.asarray(fn(q, tiled_(noisy_k), noisy_v, jnp.asarray([[130], [1], [2], [3]])))).any()


def test_programs_for_tpu_and_gpu_read_the_whole_layer_without_a_switch(monkeypatch) -> None:
    """The live read's lax.switch made the TPU compiler copy the whole KV cache every decode step
    (qwen2_5_7b_memagent_v5p32: 119 GiB, did not fit); for TPU/GPU the read is one fused slice
    (no cond in the program) with the same values, on CPU the switch stays."""
    import memagent_jax.models.platform as platform_module

    L, B, S, K, H, hd = 2, 2, 128, 2, 4, 8
    rng = np.random.default_rng(1)
    kc = jnp.asarray(rng.normal(size=(L, B, K, hd, S)), jnp.float32)
    vc = jnp.asarray(rng.normal(size=(L, B, K, S, hd)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(B, 1, H, hd)), jnp.float32)
    query_slot = jnp.asarray([[5], [90]], jnp.int32)
    args = (q, tiled(kc), vc, jnp.int32(1), query_slot)

    def program():  # a fresh function each time: traces are cached per function
        return str(jax.make_jaxpr(lambda *a: live_cache_attention(*a))(*args))

    assert "cond" in program()  # CPU: the live read
    expected = live_cache_attention(*args)
    # TPU programs keep the cache in rows [L, B, K, S, hd], GPU programs slot-major [L, B, S, K, hd]
    # (an fp32 cache: the XLA read on both; tests/test_paged_attention.py has the TPU's bf16 kernel)
    layouts = {"tpu": (kc.transpose(0, 1, 2, 4, 3), vc), "gpu": (kc.transpose(0, 1, 4, 2, 3), vc.transpose(0, 1, 3, 2, 4))}
    for platform, (k, v) in layouts.items():
        monkeypatch.setattr(platform_module, "target_platform", lambda p=platform: p)
        args = (q, k, v, jnp.int32(1), query_slot)
        assert "cond" not in program() and "pallas_call" not in program()
        np.testing.assert_allclose(np.asarray(live_cache_attention(*args)), np.asarray(expected), atol=1e-5)


def test_both_cache_layouts_generate_the_same_tokens(monkeypatch) -> None:
    """The sampler and the engine on the CPU's head-major cache, the TPU's rows and the GPU's
    slot-major one (the layout switched alone, on this CPU; an fp32 model, so the TPU's decode
    keeps the XLA read): equal greedy tokens and log-probs."""
    import memagent_jax.models.platform as platform_module
    from memagent_jax import engine, sampler
    from memagent_jax.models import ModelConfig, init_model

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256)
    model = init_model(cfg, 3)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [1, 2, 3, 4, 5], list(range(10, 40))]
    outputs = {}
    layouts = {"cpu": "head_major", "tpu": "rows", "gpu": "slot_major"}
    for platform, layout in layouts.items():
        monkeypatch.setattr(platform_module, "target_platform", lambda p=platform: p)
        assert platform_module.kv_cache_layout() == layout
        jax.clear_caches()  # the programs are traced again, in this layout
        traced = sampler.compile_count()
        out = sampler.generate(model, prompts, max_new_tokens=40)
        assert sampler.compile_count() > traced
        eng = engine.engine_generate(model, prompts, max_new_tokens=40, slots=2)
        outputs[platform] = (out.tokens, eng.tokens, out.logps)
    for platform in layouts:
        assert outputs[platform][0] == outputs[platform][1] == outputs["cpu"][0], platform
        for a, b in zip(outputs["cpu"][2], outputs[platform][2]):
            np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("tile", [KEY_TILE, "whole"])  # tiles, or one tile (head_dim < 32)
def test_key_writes_land_in_their_tiles_across_tile_boundaries(tile) -> None:
    """write_cache into the CPU's tiled keys (per-layer arrays and the stacked cache): tokens
    that straddle a tile boundary, and a start past the end (clipped like a dynamic slice),
    equal the same writes into keys [.., hd, S] tiled afterwards."""
    from memagent_jax.models.transformer import write_cache

    L, B, S, K, hd, T = 2, 3, 128, 2, 8, 3
    tiled_ = functools.partial(tiled, tile=S if tile == "whole" else tile)
    rng = np.random.default_rng(4)
    plain = jnp.asarray(rng.normal(size=(L, B, K, hd, S)), jnp.float32)
    new = jnp.asarray(rng.normal(size=(B, T, K, hd)), jnp.float32)
    offset = jnp.asarray([62, 0, 127], jnp.int32)  # across tiles 0|1, at the start, past the end
    expected = np.asarray(plain).copy()
    for b, start in enumerate(np.clip(np.asarray(offset), 0, S - T)):
        expected[1, b, :, :, start:start + T] = np.asarray(new[b]).transpose(1, 2, 0)
    got_stacked = write_cache(tiled_(plain), new, jnp.int32(1), offset, keys=True)
    got_layer = write_cache(tiled_(plain)[1], new, None, offset, keys=True)
    np.testing.assert_array_equal(np.asarray(got_stacked), np.asarray(tiled_(jnp.asarray(expected))))
    np.testing.assert_array_equal(np.asarray(got_layer), np.asarray(tiled_(jnp.asarray(expected))[1]))
