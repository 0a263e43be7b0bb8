"""`model.attention` implementations against the materialised `xla` one on tiny random models:
logits (max abs diff <= 1e-5) and gradients (<= 1e-4 relative) in fp32, with grouped-query heads
and right-padded rows. `splash` (the Pallas TPU kernel) runs in interpret mode on CPU; `cudnn`
needs a GPU and is skipped without one."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memagent_jax import sampler
from memagent_jax.models import ModelConfig, init_model
from memagent_jax.models.attention import ATTENTION_IMPLS, resolve
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


def test_auto_resolves_by_backend_and_bad_names_fail():
    assert resolve("auto", "cpu") == "xla" and resolve("auto", "gpu") == "cudnn" and resolve("auto", "tpu") == "splash"
    assert resolve("splash") == "splash" and set(ATTENTION_IMPLS) == {"xla", "cudnn", "splash", "auto"}
    with pytest.raises(ValueError, match="attention='flash'.*expected one of"):
        dataclasses.replace(BASE, attention="flash")


def test_splash_equals_xla_logits_and_gradients_with_gqa_and_padding():
    _compare("splash")


def test_auto_on_cpu_is_xla():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU choice")
    ref, _, _ = _logits_and_grads("xla")
    got, _, _ = _logits_and_grads("auto")
    np.testing.assert_array_equal(got, ref)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cudnn attention needs a GPU (none here)")
def test_cudnn_equals_xla_on_gpu():
    _compare("cudnn")


def test_generation_with_a_kernel_model_equals_xla():
    """Prefill and decode over the KV cache run the materialised path whatever model.attention
    says, so greedy generation is the same."""
    prompts = [[5, 9, 11, 3, 7], [7, 2], [4, 4, 8, 1, 6, 9, 30]]
    outs = [sampler.generate(init_model(dataclasses.replace(BASE, attention=impl), seed=3), prompts,
                             max_new_tokens=6) for impl in ("xla", "splash")]
    assert outs[0].tokens == outs[1].tokens
    np.testing.assert_allclose(np.concatenate(outs[0].logps), np.concatenate(outs[1].logps), atol=1e-6)
