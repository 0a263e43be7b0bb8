"""The jitted sampler against transformers' greedy generate, its own recomputed log-probs,
the expected top-p/top-k distributions, bucketing (compile count) and group sharing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from memagent_jax import models, sampler
from memagent_jax.rl.logprobs import token_logprobs


def _prompts(seed: int, lengths: list[int], vocab: int = 96) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_greedy_equals_transformers_generate(hf_checkpoints, kind):
    path, hf_model = hf_checkpoints[kind]
    model = models.from_pretrained(path)
    prompts = _prompts(0, [5, 17, 9, 30])
    out = sampler.generate(model, prompts, max_new_tokens=12, temperature=0.0)
    for prompt, tokens, reason in zip(prompts, out.tokens, out.finish_reasons):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        assert tokens == ref[0, len(prompt):].tolist()
        assert reason == "length" and len(tokens) == 12


def test_greedy_equals_transformers_generate_on_tiled_keys(tmp_path):
    """head_dim 32: the CPU cache keeps its keys in tiles of 64 slots (models/platform.py);
    rows that decode across a tile boundary, on the sampler and the engine, equal transformers."""
    from hf_models import save_hf_model

    from memagent_jax import engine
    from memagent_jax.models import KVCache

    hf_model = save_hf_model("qwen2", tmp_path, num_attention_heads=2, num_key_value_heads=1)
    model = models.from_pretrained(tmp_path)
    assert model.config.head_dim == 32
    assert KVCache.zeros(model.config, 1, 100, per_layer=True).k[0].shape == (1, 1, 2, 32, 64)
    prompts = _prompts(3, [58, 70, 9, 130])
    out = sampler.generate(model, prompts, max_new_tokens=12, temperature=0.0)
    eng = engine.engine_generate(model, prompts, max_new_tokens=12, slots=2)
    for prompt, tokens, eng_tokens in zip(prompts, out.tokens, eng.tokens):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        assert tokens == eng_tokens == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logps_equal_recomputed_logps(hf_checkpoints, temperature):
    path, _ = hf_checkpoints["qwen2"]
    model = models.from_pretrained(path)
    prompts = _prompts(1, [4, 11, 23])
    out = sampler.generate(model, prompts, max_new_tokens=10, temperature=temperature, seed=3)
    for prompt, tokens, logps in zip(prompts, out.tokens, out.logps):
        seq = jnp.asarray([prompt + tokens], jnp.int32)
        recomputed, _ = token_logprobs(model, seq, temperature=temperature, chunk=7)
        np.testing.assert_allclose(np.asarray(recomputed[0, len(prompt):]), logps, atol=1e-4)


def test_stop_ids_and_finish_reasons(hf_checkpoints):
    path, _ = hf_checkpoints["qwen2"]
    model = models.from_pretrained(path)
    prompts = _prompts(2, [6, 8])
    free = sampler.generate(model, prompts, max_new_tokens=8)
    stop = free.tokens[0][2]  # make row 0's third token a stop id
    out = sampler.generate(model, prompts, max_new_tokens=8, eos_ids=[stop])
    for row in range(2):
        ref = free.tokens[row]
        if stop in ref:
            cut = ref.index(stop) + 1
            assert out.tokens[row] == ref[:cut] and out.finish_reasons[row] == "eos"
            assert len(out.logps[row]) == cut
        else:
            assert out.tokens[row] == ref and out.finish_reasons[row] == "length"
    assert out.finish_reasons[0] == "eos" and len(out.tokens[0]) <= 3


def test_same_seed_same_output_and_different_seed_differs(hf_checkpoints):
    path, _ = hf_checkpoints["llama"]
    model = models.from_pretrained(path)
    prompts = _prompts(3, [7, 7, 12])
    a = sampler.generate(model, prompts, max_new_tokens=16, temperature=1.0, seed=11)
    b = sampler.generate(model, prompts, max_new_tokens=16, temperature=1.0, seed=11)
    c = sampler.generate(model, prompts, max_new_tokens=16, temperature=1.0, seed=12)
    assert a.tokens == b.tokens and a.logps == b.logps
    assert a.tokens != c.tokens


def test_group_sharing_equals_no_sharing(hf_checkpoints):
    path, _ = hf_checkpoints["qwen2"]
    model = models.from_pretrained(path)
    group = _prompts(4, [13])[0]
    prompts = [group] * 6 + _prompts(5, [9, 21])
    shared = sampler.generate(model, prompts, max_new_tokens=9, temperature=1.0, seed=5)
    plain = sampler.generate(model, prompts, max_new_tokens=9, temperature=1.0, seed=5,
                             share_prefill=False)
    assert shared.tokens == plain.tokens
    np.testing.assert_allclose(np.concatenate([np.array(x) for x in shared.logps]),
                               np.concatenate([np.array(x) for x in plain.logps]), atol=1e-6)
    assert len({tuple(t) for t in shared.tokens[:6]}) > 1  # group members sample differently


def test_compile_count_fixed_within_buckets(hf_checkpoints):
    path, _ = hf_checkpoints["qwen2"]
    model = models.from_pretrained(path)
    sampler.generate(model, _prompts(6, [10, 12, 14]), max_new_tokens=5, temperature=1.0)
    before = sampler.compile_count()
    # Same buckets (rows <= 4, prompt <= 16, new tokens <= 16), other lengths/params/seeds.
    sampler.generate(model, _prompts(7, [3, 16]), max_new_tokens=9, temperature=0.5, top_p=0.9)
    sampler.generate(model, _prompts(8, [11, 2, 15, 7]), max_new_tokens=16, top_k=5, seed=9)
    assert sampler.compile_count() == before
    sampler.generate(model, _prompts(9, [40]), max_new_tokens=5)  # a new prompt bucket
    assert sampler.compile_count() == before + 1


def test_vocab_limit_masks_unknown_ids(hf_checkpoints):
    path, _ = hf_checkpoints["qwen2"]
    model = models.from_pretrained(path)
    out = sampler.generate(model, _prompts(10, [5] * 4), max_new_tokens=30, temperature=3.0,
                           vocab_limit=20, seed=1)
    assert max(max(t) for t in out.tokens) < 20


def _empirical(logits: np.ndarray, n: int, **kw) -> np.ndarray:
    keys = jax.random.split(jax.random.PRNGKey(0), 1)
    lg = jnp.asarray(np.tile(logits, (n, 1)), jnp.float32)
    params = dict(temperature=jnp.float32(kw.get("temperature", 1.0)),
                  top_p=jnp.float32(kw.get("top_p", 1.0)), top_k=jnp.int32(kw.get("top_k", 0)),
                  vocab_limit=jnp.int32(logits.shape[0]))
    row_keys = jax.vmap(lambda r: jax.random.fold_in(keys[0], r))(jnp.arange(n))
    ids, _ = jax.jit(sampler._sample_step)(lg, row_keys, jnp.int32(0), params)
    return np.bincount(np.asarray(ids), minlength=logits.shape[0]) / n


def test_top_k_and_top_p_sample_only_allowed_ids_with_expected_distribution():
    logits = np.log(np.array([0.05, 0.30, 0.10, 0.25, 0.20, 0.10]))
    n = 40000
    # top-k 3 keeps ids 1, 3, 4 with renormalised probabilities.
    freq = _empirical(logits, n, top_k=3)
    expected = np.array([0, 0.30, 0, 0.25, 0.20, 0]) / 0.75
    assert set(np.nonzero(freq)[0]) == {1, 3, 4}
    np.testing.assert_allclose(freq, expected, atol=0.015)
    # top-p 0.6: sorted 0.30, 0.25 (cum 0.55 < 0.6) then 0.20 -> nucleus {1, 3, 4}.
    freq = _empirical(logits, n, top_p=0.6)
    assert set(np.nonzero(freq)[0]) == {1, 3, 4}
    np.testing.assert_allclose(freq, expected, atol=0.015)
    # top-p 0.5 keeps {1, 3}; combined with top-k 1 only {1}.
    freq = _empirical(logits, n, top_p=0.5)
    np.testing.assert_allclose(freq, np.array([0, 0.30, 0, 0.25, 0, 0]) / 0.55, atol=0.015)
    assert set(np.nonzero(_empirical(logits, 2000, top_p=0.5, top_k=1))[0]) == {1}
    # No filtering: the full distribution (temperature 1).
    np.testing.assert_allclose(_empirical(logits, n), np.exp(logits), atol=0.015)


@pytest.mark.parametrize("bad, match", [
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"),
    (dict(prompts=[[1] * 300]), "max_prompt_len"),
])
def test_bad_input_is_a_clear_error(hf_checkpoints, bad, match):
    path, _ = hf_checkpoints["qwen2"]
    model = models.from_pretrained(path)
    kwargs = dict(prompts=[[1, 2, 3]], max_new_tokens=4, max_prompt_len=256)
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        sampler.generate(model, kwargs.pop("prompts"), **kwargs)


def test_decode_state_casts_fp32_masters_once_to_the_compute_dtype_without_changing_results():
    """fp32 masters + bf16 compute: the decode state holds bf16 weights (half the bytes each step
    reads) and generation is bit-identical to casting at every use."""
    from tiny_policy import tiny_model

    model = tiny_model(vocab_size=64, param_dtype="float32", dtype="bfloat16")
    cast = sampler.decode_state(model, None)
    kept = sampler.decode_state(model, None, cast=False)
    assert {x.dtype for x in jax.tree.leaves(cast[1])} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(kept[1])} == {jnp.dtype(jnp.float32)}
    prompts = [[5, 9, 11, 3], [7, 2], [4, 4, 8, 1, 6, 9]]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=3)):
        a = sampler.generate(model, prompts, max_new_tokens=8, state=cast, **kw)
        b = sampler.generate(model, prompts, max_new_tokens=8, state=kept, **kw)
        assert a.tokens == b.tokens and a.logps == b.logps
