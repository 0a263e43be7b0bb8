"""The cached attention reads only the live part of the KV cache and equals the full read."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from memagent_jax.models.attention import live_cache_attention, live_read_lengths, xla_attention


def test_read_lengths_are_static_steps_up_to_the_cache_length() -> None:
    assert live_read_lengths(384) == (48, 96, 144, 192, 240, 288, 336, 384)
    assert live_read_lengths(20) == (16, 20)
    assert live_read_lengths(16) == (16,)
    assert live_read_lengths(1000) == (128, 256, 384, 512, 640, 768, 896, 1000)


def _full(q, kc, vc, layer, query_slot):
    S = kc.shape[2]
    mask = jnp.arange(S)[None, None, :] <= query_slot[:, :, None]
    return xla_attention(q, kc[layer], vc[layer], mask)


def test_live_read_equals_the_whole_cache_and_ignores_slots_behind_the_live_rows() -> None:
    L, B, S, K, H, hd = 3, 4, 96, 2, 4, 8
    rng = np.random.default_rng(0)
    kc = jnp.asarray(rng.normal(size=(L, B, S, K, hd)), jnp.float32)
    vc = jnp.asarray(rng.normal(size=(L, B, S, K, hd)), jnp.float32)
    fn = jax.jit(live_cache_attention)
    for T, last in ((1, [5, 17, 3, 40]), (1, [95, 0, 12, 7]), (3, [20, 30, 10, 2])):
        q = jnp.asarray(rng.normal(size=(B, T, H, hd)), jnp.float32)
        query_slot = jnp.asarray(last)[:, None] + jnp.arange(T)[None, :]
        for layer in range(L):
            got = fn(q, kc, vc, jnp.int32(layer), query_slot)
            np.testing.assert_allclose(got, _full(q, kc, vc, layer, query_slot), rtol=1e-5, atol=1e-6)
    # what lies behind every row's live part changes nothing: slots 41-47 are read but masked,
    # slots from 48 on are not read at all (NaN there would poison the masked products)
    q = jnp.asarray(rng.normal(size=(B, 1, H, hd)), jnp.float32)
    query_slot = jnp.asarray([[5], [17], [3], [40]])
    noisy_k = kc.at[:, :, 41:].set(1e4).at[:, :, 48:].set(jnp.nan)
    noisy_v = vc.at[:, :, 41:].set(-1e4).at[:, :, 48:].set(jnp.nan)
    np.testing.assert_allclose(fn(q, noisy_k, noisy_v, jnp.int32(1), query_slot),
                               fn(q, kc, vc, jnp.int32(1), query_slot), rtol=1e-6)
    assert not np.isnan(np.asarray(fn(q, noisy_k, noisy_v, jnp.int32(1), query_slot))).any()


def test_programs_for_tpu_and_gpu_read_the_whole_layer_without_a_switch(monkeypatch) -> None:
    """The live read's lax.switch made the TPU compiler copy the whole KV cache every decode step
    (qwen2_5_7b_memagent_v5p32: 119 GiB, did not fit); for TPU/GPU the read is one fused slice
    (no cond in the program) with the same values, on CPU the switch stays."""
    import memagent_jax.models.attention as attention

    L, B, S, K, H, hd = 2, 2, 64, 2, 4, 8
    rng = np.random.default_rng(1)
    kc = jnp.asarray(rng.normal(size=(L, B, S, K, hd)), jnp.float32)
    vc = jnp.asarray(rng.normal(size=(L, B, S, K, hd)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(B, 1, H, hd)), jnp.float32)
    query_slot = jnp.asarray([[5], [20]], jnp.int32)
    args = (q, kc, vc, jnp.int32(1), query_slot)
    def program():  # a fresh function each time: traces are cached per function
        return str(jax.make_jaxpr(lambda *a: live_cache_attention(*a))(*args))

    assert "cond" in program()  # CPU: the live read
    expected = live_cache_attention(*args)
    for platform in ("tpu", "gpu"):
        monkeypatch.setattr(attention, "target_platform", lambda p=platform: p)
        assert "cond" not in program()
        np.testing.assert_allclose(np.asarray(live_cache_attention(*args)), np.asarray(expected), atol=1e-5)
