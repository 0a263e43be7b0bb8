"""rl/logprobs.py's fused LM head (its own backward) against plain autodiff of the textbook
formulas: log p(target) = z[target] - logsumexp(z), H = -sum p log p, z = h @ W / temperature.
Values and gradients of a loss that uses both, in fp32, for tied and untied heads, several
chunks with padding, and a temperature."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memagent_jax.models import ModelConfig, init_model
from memagent_jax.rl.logprobs import token_logprobs

BASE = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=128)


def _reference(model, tokens, temperature):
    """Full-vocabulary logits, then the formulas (autodiff differentiates them)."""
    z = model(tokens)[:, :-1] / temperature
    logp_all = jax.nn.log_softmax(z, axis=-1)
    lp = jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return lp, ent


@pytest.mark.parametrize("tied,chunk,temperature", [(True, 7, 0.7), (False, 64, 1.0), (False, 5, 1.3)])
def test_fused_head_values_and_gradients_equal_autodiff(tied, chunk, temperature):
    model = init_model(dataclasses.replace(BASE, tie_word_embeddings=tied), seed=1)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 97, size=(3, 23)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(3, 22)), jnp.float32)  # per-token advantages
    graphdef, params = nnx.split(model)

    def fused_loss(p):
        lp, ent = token_logprobs(nnx.merge(graphdef, p), tokens, temperature=temperature,
                                 chunk=chunk, with_entropy=True)
        return (weights * lp[:, 1:]).sum() + 0.3 * ent[:, 1:].sum(), (lp, ent)

    def ref_loss(p):
        lp, ent = _reference(nnx.merge(graphdef, p), tokens, temperature)
        return (weights * lp).sum() + 0.3 * ent.sum(), (lp, ent)

    (v1, (lp, ent)), g1 = jax.jit(jax.value_and_grad(fused_loss, has_aux=True))(params)
    (v2, (lp_ref, ent_ref)), g2 = jax.jit(jax.value_and_grad(ref_loss, has_aux=True))(params)
    assert lp.shape == ent.shape == (3, 23) and float(jnp.abs(lp[:, 0]).max()) == 0.0
    np.testing.assert_allclose(np.asarray(lp[:, 1:]), np.asarray(lp_ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent[:, 1:]), np.asarray(ent_ref), atol=1e-5)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    flat1, flat2 = nnx.to_flat_state(g1), nnx.to_flat_state(g2)
    for (name, a), (_, b) in zip(flat1, flat2):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max() + 1e-10, name


def test_logprobs_without_entropy_and_in_bf16():
    """with_entropy=False returns None; a bf16 model's log-probs stay close to its fp32 twin's."""
    model = init_model(BASE, seed=2)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, size=(2, 17)), jnp.int32)
    lp, ent = token_logprobs(model, tokens, chunk=4)
    assert ent is None and lp.dtype == jnp.float32
    bf16 = init_model(dataclasses.replace(BASE, dtype="bfloat16"), seed=2)
    lp16, _ = token_logprobs(bf16, tokens, chunk=4)
    assert lp16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lp16), np.asarray(lp), atol=0.05)
