"""Qwen3 dense policies (Qwen3ForCausalLM) against HF transformers on tiny random checkpoints:
logits, KV cache, remat, greedy generate, sampler log-probs, export round trip, config.json
mapping and its errors, and the Qwen3-4B plan.

The checkpoints have GQA (4 heads / 2 kv heads), head_dim 24 != hidden 64 / 4 heads, random
q/k norm weights, and come tied and untied.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hf_models import QWEN3_HEAD_DIM, save_hf_model
from memagent_jax import models, sampler
from memagent_jax.models import KVCache, ModelConfig
from memagent_jax.rl.logprobs import token_logprobs

KINDS = ("qwen3", "qwen3_tied")
VOCAB = 96


@pytest.fixture(scope="module")
def qwen3_checkpoints(tmp_path_factory):
    """kind -> (directory, torch model) for the tiny random Qwen3 checkpoints."""
    out = {}
    for kind in KINDS:
        path = tmp_path_factory.mktemp(kind)
        out[kind] = (path, save_hf_model(kind, path))
    return out


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=n).tolist() for n in lengths]


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("kind", KINDS)
def test_loaded_config_and_weights(qwen3_checkpoints, kind):
    path, hf_model = qwen3_checkpoints[kind]
    model = models.from_pretrained(path)
    cfg = model.config
    assert (cfg.architecture, cfg.qk_norm, cfg.qkv_bias) == ("qwen3", True, False)
    assert cfg.head_dim == QWEN3_HEAD_DIM != cfg.hidden_size // cfg.num_heads
    assert cfg.tie_word_embeddings == (kind == "qwen3_tied")
    assert model.layers.q_norm[...].shape == (2, QWEN3_HEAD_DIM)
    assert model.layers.q_proj[...].shape == (2, 64, 4 * QWEN3_HEAD_DIM)
    assert model.layers.o_proj[...].shape == (2, 4 * QWEN3_HEAD_DIM, 64)
    np.testing.assert_array_equal(
        np.asarray(model.layers.k_norm[...][1]),
        hf_model.model.layers[1].self_attn.k_norm.weight.detach().numpy())
    assert models.count_params(cfg) == sum(p.numel() for p in hf_model.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(qwen3_checkpoints, kind):
    path, hf_model = qwen3_checkpoints[kind]
    model = models.from_pretrained(path, dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(3, 37))
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    theirs = _torch_logits(hf_model, ids)
    assert ours.shape == theirs.shape == (3, 37, VOCAB)
    print(f"{kind}: max |logits - transformers| = {np.abs(ours - theirs).max():.3g}")
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_bf16_params_give_close_logits(qwen3_checkpoints):
    path, hf_model = qwen3_checkpoints["qwen3"]
    model = models.from_pretrained(path, dtype=jnp.bfloat16)
    ids = np.random.default_rng(3).integers(0, VOCAB, size=(1, 16))
    logits = model(jnp.asarray(ids, jnp.int32))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), _torch_logits(hf_model, ids), atol=0.05)


def test_kv_cache_prefill_then_decode_equals_full_forward(qwen3_checkpoints):
    path, _ = qwen3_checkpoints["qwen3"]
    model = models.from_pretrained(path)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, size=(2, 16)), jnp.int32)
    full = np.asarray(model(ids))
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, cache, index):
        m = nnx.merge(graphdef, state)
        hidden, cache = m.hidden_states(tokens, cache=cache, cache_index=index)
        return m.logits(hidden), cache

    cache = KVCache.zeros(model.config, 2, 24)
    assert cache.v.shape[-1] == QWEN3_HEAD_DIM
    lengths = np.array([5, 9])  # ragged prompts; the rest is decoded one token at a time
    prefill, cache = run(state, ids[:, :9], cache, jnp.zeros(2, jnp.int32))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(prefill)[b, :n], full[b, :n], atol=1e-5)
    pos = jnp.asarray(lengths, jnp.int32)
    for _ in range(16 - 9):
        step, cache = run(state, ids[jnp.arange(2), pos][:, None], cache, pos)
        for b in range(2):
            np.testing.assert_allclose(np.asarray(step)[b, 0], full[b, int(pos[b])], atol=1e-5)
        pos = pos + 1


def test_remat_gives_same_grads_including_qk_norm(qwen3_checkpoints):
    path, _ = qwen3_checkpoints["qwen3_tied"]
    ids = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, size=(2, 9)), jnp.int32)
    grads = []
    for remat in ("none", "full"):
        graphdef, params = nnx.split(models.from_pretrained(path, remat=remat))
        grads.append(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(ids) ** 2))(params))
    assert np.abs(np.asarray(grads[0]["layers"]["q_norm"][...])).max() > 0  # the norms are trained
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


# ----------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_equals_transformers_generate(qwen3_checkpoints, kind):
    path, hf_model = qwen3_checkpoints[kind]
    model = models.from_pretrained(path)
    prompts = _prompts(0, [5, 17, 9, 30])  # one ragged batch
    out = sampler.generate(model, prompts, max_new_tokens=12, temperature=0.0)
    for prompt, tokens, reason in zip(prompts, out.tokens, out.finish_reasons):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        assert tokens == ref[0, len(prompt):].tolist()
        assert reason == "length" and len(tokens) == 12


def test_sampler_logps_equal_recomputed_logps(qwen3_checkpoints):
    path, _ = qwen3_checkpoints["qwen3"]
    model = models.from_pretrained(path)
    prompts = _prompts(1, [4, 11, 23])
    out = sampler.generate(model, prompts, max_new_tokens=10, temperature=0.7, seed=3)
    worst = 0.0
    for prompt, tokens, logps in zip(prompts, out.tokens, out.logps):
        seq = jnp.asarray([prompt + tokens], jnp.int32)
        recomputed, _ = token_logprobs(model, seq, temperature=0.7, chunk=7)
        recomputed = np.asarray(recomputed[0, len(prompt):])
        worst = max(worst, float(np.abs(recomputed - np.asarray(logps)).max()))
        np.testing.assert_allclose(recomputed, logps, atol=1e-4)
    print(f"max |sampler logp - recomputed logp| = {worst:.3g}")


# ------------------------------------------------------------------------- export
@pytest.mark.parametrize("kind", KINDS)
def test_export_round_trip_loads_in_transformers(qwen3_checkpoints, kind, tmp_path):
    path, hf_model = qwen3_checkpoints[kind]
    model = models.from_pretrained(path)
    out = models.save_pretrained(model, tmp_path / "export")
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["Qwen3ForCausalLM"] and written["model_type"] == "qwen3"
    assert written["head_dim"] == QWEN3_HEAD_DIM and written["attention_bias"] is False
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "Qwen3ForCausalLM"
    original = hf_model.state_dict()
    assert set(reloaded.state_dict()) == set(original)
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[key]), key
    ids = np.random.default_rng(2).integers(0, VOCAB, size=(2, 11))
    theirs, ours = _torch_logits(reloaded, ids), np.asarray(model(jnp.asarray(ids, jnp.int32)))
    print(f"{kind} export: max |transformers(exported) - ours| = {np.abs(theirs - ours).max():.3g}")
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    np.testing.assert_array_equal(_torch_logits(reloaded, ids), _torch_logits(hf_model, ids))


# ----------------------------------------------------------------- config.json mapping
def _hf_dict(**changes) -> dict:
    base = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=VOCAB,
                hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=QWEN3_HEAD_DIM,
                rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                sliding_window=None, max_window_layers=2, attention_bias=False,
                rope_theta=1000000.0, max_position_embeddings=256)
    base.update(changes)
    return base


def test_config_maps_both_ways():
    cfg = ModelConfig.from_hf_dict(_hf_dict())
    assert (cfg.architecture, cfg.head_dim, cfg.qk_norm, cfg.qkv_bias) == ("qwen3", 24, True, False)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    # Transformers' own Qwen3Config, serialised (rope_parameters, layer_types), maps the same.
    hf = transformers.Qwen3Config(**{k: v for k, v in _hf_dict().items()
                                     if k not in ("architectures", "model_type", "rope_theta")},
                                  rope_parameters={"rope_type": "default",
                                                   "rope_theta": 1000000.0}).to_dict()
    hf["architectures"] = ["Qwen3ForCausalLM"]
    assert ModelConfig.from_hf_dict(hf) == cfg
    # A sliding window that no layer uses (max_window_layers = all layers) is harmless.
    assert ModelConfig.from_hf_dict(_hf_dict(use_sliding_window=True, sliding_window=64,
                                             max_window_layers=2)) == cfg


def test_model_config_defaults_by_architecture():
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
              num_kv_heads=2)
    q3 = ModelConfig(**kw, architecture="qwen3", head_dim=32)
    assert (q3.qk_norm, q3.qkv_bias, q3.head_dim) == (True, False, 32)
    q2 = ModelConfig(**kw)
    assert (q2.qk_norm, q2.qkv_bias, q2.head_dim) == (False, True, 16)
    with pytest.raises(ValueError, match="qk_norm=True with architecture='qwen2'"):
        ModelConfig(**kw, qk_norm=True)
    with pytest.raises(ValueError, match="qkv_bias=True is not supported.*qkv_bias=False"):
        ModelConfig(**kw, architecture="qwen3", qkv_bias=True)
    with pytest.raises(ValueError, match="head_dim=15 must be a positive even number"):
        ModelConfig(**kw, architecture="qwen3", head_dim=15)


@pytest.mark.parametrize("changes, match", [
    (dict(use_sliding_window=True, sliding_window=64, max_window_layers=1),
     r"use_sliding_window=True, sliding_window=64.*layers \[1\].*set use_sliding_window=false"),
    (dict(layer_types=["full_attention", "sliding_attention"]),
     r"sliding-window attention.*layers \[1\]"),
    (dict(attention_bias=True), r"attention_bias=true is not supported for Qwen3"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope_scaling type 'yarn'"),
    (dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe"),
     r"unsupported architecture.*Qwen3MoeForCausalLM.*Qwen3ForCausalLM"),
])
def test_unsupported_settings_are_clear_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict(_hf_dict(**changes))


def test_sliding_window_checkpoint_is_refused_on_load(qwen3_checkpoints, tmp_path):
    import shutil

    path, _ = qwen3_checkpoints["qwen3"]
    shutil.copy(path / "model.safetensors", tmp_path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(use_sliding_window=True, sliding_window=8, max_window_layers=0)
    cfg.pop("layer_types", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        models.from_pretrained(tmp_path)


def test_missing_qk_norm_weight_names_the_key(qwen3_checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = qwen3_checkpoints["qwen3"]
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.q_norm\.weight"):
        models.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- plan
def test_qwen3_4b_shape_and_params_match_transformers():
    """The built-in Qwen3-4B shape has transformers' parameter count (4.02B, q/k norm included)."""
    from memagent_jax.config import load_config
    from memagent_jax.plan import KNOWN_SHAPES, resolve_model

    name, cfg = resolve_model(load_config("qwen3_4b_memagent"))
    assert name == "Qwen3-4B"
    assert (cfg.architecture, cfg.head_dim, cfg.num_heads * cfg.head_dim, cfg.hidden_size) == (
        "qwen3", 128, 4096, 2560)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e6
    assert cfg.max_position_embeddings == 40960
    hf = {k: v for k, v in KNOWN_SHAPES["Qwen3-4B"].items() if k not in ("architectures",
                                                                        "model_type")}
    with torch.device("meta"):
        peer = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf))
    assert models.count_params(cfg) == sum(p.numel() for p in peer.parameters()) == 4_022_468_096


def test_qwen3_4b_recipe_fits_8x80():
    from memagent_jax.config import load_config
    from memagent_jax.plan import format_plan, plan

    cfg = load_config("qwen3_4b_memagent")
    report = plan(cfg, 8, 80, suggest=False)
    assert report.mesh == (1, 4, 2)
    assert report.train.fits and report.rollout.fits, format_plan(report)
    assert cfg.rollout.max_rows_per_call == report.max_rollout_rows >= 128
    text = format_plan(report)
    assert "heads 32/8 kv x head_dim 128, q/k norm" in text and "verdict: FITS" in text
    # The uncapped rollout (every conversation of a turn in one call) would not fit.
    uncapped = plan(load_config("qwen3_4b_memagent", ["rollout.max_rows_per_call=0"]), 8, 80,
                    suggest=False)
    assert not uncapped.rollout.fits


def test_plan_counts_qk_norm_weights_and_activations():
    """q/k norm adds 2 * L * head_dim weights (replicated) and per-token activations."""
    from memagent_jax.plan import activation_bytes, weight_bytes
    from memagent_jax.models.sharding import TRAIN_RULES

    q3 = ModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=32, architecture="qwen3")
    no_norm = ModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=32, architecture="llama",
                          qkv_bias=False)
    mesh = (1, 4, 2)
    assert weight_bytes(q3, mesh, TRAIN_RULES, 4) - weight_bytes(no_norm, mesh, TRAIN_RULES, 4) \
        == 2 * 2 * 32 * 4
    extra = dict(activation_bytes(q3, 1, 256, 2, 64))
    base = dict(activation_bytes(no_norm, 1, 256, 2, 64))
    key = "activations saved by the scan, 2 layers (remat=none)"
    assert extra[key] - base[key] == 2 * 256 * (32 * (4 + 2) * (4 + 4) // 2)
