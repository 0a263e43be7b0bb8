"""`model.attention` implementations against the materialised `xla` one on tiny random models:
logits (max abs diff <= 1e-5) and gradients (<= 1e-4 relative) in fp32, with grouped-query heads
and right-padded rows. `splash` (the Pallas TPU kernel) runs in interpret mode on CPU; `blocked`
(ours, plain JAX with its own backward) runs compiled; `cudnn` needs a GPU and is skipped without
one. The prefill of fresh prompts runs the kernel too (whole prompt in one piece)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memagent_jax import sampler
from memagent_jax.models import ModelConfig, init_model
from memagent_jax.models import KVCache
from memagent_jax.models.attention import ATTENTION_IMPLS, blocked_attention, resolve, xla_attention
from memagent_jax.rl.logprobs import token_logprobs

BASE = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=256)


def _tokens() -> tuple[np.ndarray, np.ndarray]:
    """Two rows of 40 positions; the second is right-padded after 23 real tokens."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 96, size=(2, 40)).astype(np.int32)
    valid = np.ones((2, 40), np.float32)
    tokens[1, 23:], valid[1, 23:] = 0, 0.0
    return tokens, valid


def _logits_and_grads(impl: str):
    model = init_model(dataclasses.replace(BASE, attention=impl), seed=3)
    tokens, valid = _tokens()

    def loss(m):  # the masked mean log-prob of the tokens: what training differentiates
        lp, _ = token_logprobs(m, jnp.asarray(tokens))
        return -(lp[:, 1:] * valid[:, 1:]).sum() / valid[:, 1:].sum()

    logits = np.asarray(model(jnp.asarray(tokens)))
    grads = nnx.grad(loss)(model)
    return logits, valid, {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)}


def _compare(impl: str) -> None:
    ref_logits, valid, ref_grads = _logits_and_grads("xla")
    logits, _, grads = _logits_and_grads(impl)
    real = valid.astype(bool)
    assert np.abs(logits[real] - ref_logits[real]).max() <= 1e-5
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        scale = np.abs(ref_grads[name]).max()
        assert np.abs(g - ref_grads[name]).max() <= 1e-4 * scale + 1e-12, name


def test_auto_resolves_by_backend_and_dtype_and_bad_names_fail():
    assert resolve("auto", "cpu", jnp.float32) == "blocked" and resolve("auto", "tpu") == "splash"
    assert resolve("auto", "gpu", jnp.bfloat16) == "cudnn" and resolve("auto", "gpu", jnp.float16) == "cudnn"
    assert resolve("auto", "gpu", jnp.float32) == "blocked"  # cuDNN's flash kernel has no fp32
    assert resolve("splash") == "splash" and set(ATTENTION_IMPLS) == {"xla", "cudnn", "splash", "blocked", "auto"}
    with pytest.raises(ValueError, match="attention='flash'.*expected one of"):
        dataclasses.replace(BASE, attention="flash")


def test_splash_equals_xla_logits_and_gradients_with_gqa_and_padding():
    _compare("splash")


def test_blocked_equals_xla_logits_and_gradients_with_gqa_and_padding():
    _compare("blocked")


@pytest.mark.parametrize("length,rows", [(40, 16), (37, 8), (5, 64), (130, 64)])
def test_blocked_kernel_equals_materialised_attention(length, rows):
    """Blocks of `rows` query rows (an uneven last block, a single block, several): output and
    the gradients of q, k and v, GQA 4 heads / 2 kv heads."""
    ks = jax.random.split(jax.random.PRNGKey(length), 4)
    q = jax.random.normal(ks[0], (2, length, 4, 16))
    k, v = (jax.random.normal(key, (2, length, 2, 16)) for key in ks[1:3])
    w = jax.random.normal(ks[3], (2, length, 64))
    mask = jnp.tril(jnp.ones((length, length), bool))[None].repeat(2, 0)
    ref = lambda q, k, v: xla_attention(q, k, v, mask)  # noqa: E731
    got = lambda q, k, v: blocked_attention(q, k, v, rows=rows)  # noqa: E731
    assert np.abs(np.asarray(got(q, k, v) - ref(q, k, v))).max() <= 1e-5
    grad = lambda f: jax.jit(jax.grad(lambda *a: (f(*a) * w).sum(), argnums=(0, 1, 2)))(q, k, v)  # noqa: E731
    for a, b in zip(grad(got), grad(ref)):
        assert np.abs(np.asarray(a - b)).max() <= 1e-4 * np.abs(np.asarray(b)).max()


def test_auto_on_cpu_is_blocked():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU choice")
    ref, _, _ = _logits_and_grads("blocked")
    got, _, _ = _logits_and_grads("auto")
    np.testing.assert_array_equal(got, ref)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cudnn attention needs a GPU (none here)")
def test_cudnn_equals_xla_on_gpu():
    _compare("cudnn")


@pytest.mark.parametrize("impl", ["splash", "blocked"])
def test_generation_with_a_kernel_model_equals_xla(impl):
    """The kernel prefills whole prompts (from_start), xla in chunks over the cache; decode is
    xla for both: greedy generation and its log-probs are the same."""
    prompts = [[5, 9, 11, 3, 7], [7, 2], [4, 4, 8, 1, 6, 9, 30]]
    outs = [sampler.generate(init_model(dataclasses.replace(BASE, attention=name), seed=3), prompts,
                             max_new_tokens=6, prefill_chunk=4) for name in ("xla", impl)]
    assert outs[0].tokens == outs[1].tokens
    np.testing.assert_allclose(np.concatenate(outs[0].logps), np.concatenate(outs[1].logps), atol=1e-5)


@pytest.mark.parametrize("impl", ["splash", "blocked"])
def test_kernel_prefill_fills_the_cache_like_the_materialised_one(impl):
    """hidden_states(from_start=True) with a kernel writes the same keys/values and gives the
    same hidden states as the materialised attention over the cache (right-padded rows)."""
    tokens, _ = _tokens()
    ids = jnp.asarray(tokens)
    out = {}
    for name, fresh in (("xla", False), (impl, True)):
        model = init_model(dataclasses.replace(BASE, attention=name), seed=3)
        cache = KVCache.zeros(model.config, 2, 48)
        hidden, cache = model.hidden_states(ids, cache=cache, cache_index=jnp.zeros((2,), jnp.int32),
                                            from_start=fresh)
        out[name] = (np.asarray(hidden), np.asarray(cache.k), np.asarray(cache.v))
    for a, b in zip(out["xla"], out[impl]):  # padding is causal input like any token: all equal
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not out[impl][1][:, :, 40:].any()  # nothing written past the prompt
