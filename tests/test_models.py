"""The Flax decoder against HF transformers on tiny random checkpoints, and the HF round trip."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from memagent_jax import models
from memagent_jax.models import KVCache

KINDS = ("qwen2", "qwen2_tied", "llama")


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(hf_checkpoints, kind):
    path, hf_model = hf_checkpoints[kind]
    model = models.from_pretrained(path, dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 96, size=(3, 37))
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    theirs = _torch_logits(hf_model, ids)
    assert ours.shape == theirs.shape == (3, 37, 96)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked", "per_layer"])
@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_prefill_then_decode_equals_full_forward(hf_checkpoints, kind, per_layer):
    """Prefill then one-token decode over the stacked cache (scanned layers) and over a per-layer
    cache (unrolled layers, the CPU sampler's) equal the cache-free forward; `last_index` returns
    each row's last prompt position, the same as the full prefill's."""
    path, _ = hf_checkpoints[kind]
    model = models.from_pretrained(path)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 96, size=(2, 20)), jnp.int32)
    full = np.asarray(model(ids))
    # Rows have different prompt lengths (5 and 9); the rest is decoded one token at a time.
    lengths = np.array([5, 9])
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, cache, index, last=None):
        m = nnx.merge(graphdef, state)
        hidden, cache = m.hidden_states(tokens, cache=cache, cache_index=index, last_index=last)
        return m.logits(hidden), cache

    cache = KVCache.zeros(model.config, 2, 32, per_layer=per_layer)
    assert cache.per_layer == per_layer
    picked, _ = run(state, ids[:, :9], cache, jnp.zeros(2, jnp.int32), jnp.asarray(lengths - 1))
    assert picked.shape == (2, 1, 96)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(picked)[b, 0], full[b, n - 1], atol=1e-5)
    prefill, cache = run(state, ids[:, :9], cache, jnp.zeros(2, jnp.int32))
    prefill = np.asarray(prefill)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(prefill[b, :n], full[b, :n], atol=1e-5)
    pos = jnp.asarray(lengths, jnp.int32)
    for _ in range(20 - 9):
        tok = ids[jnp.arange(2), pos][:, None]
        step, cache = run(state, tok, cache, pos)
        step = np.asarray(step)[:, 0]
        for b in range(2):
            np.testing.assert_allclose(step[b], full[b, int(pos[b])], atol=1e-5)
        pos = pos + 1


@pytest.mark.parametrize("kind", KINDS)
def test_export_round_trip_is_bitwise_and_loads_in_transformers(hf_checkpoints, kind, tmp_path):
    path, hf_model = hf_checkpoints[kind]
    model = models.from_pretrained(path)
    out = models.save_pretrained(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    original = hf_model.state_dict()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[key]), key
    ids = np.random.default_rng(2).integers(0, 96, size=(2, 11))
    np.testing.assert_allclose(_torch_logits(reloaded, ids),
                               np.asarray(model(jnp.asarray(ids, jnp.int32))), atol=1e-4)
    again = models.from_pretrained(out)
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, _params(model))),
                    jax.tree.leaves(jax.tree.map(np.asarray, _params(again)))):
        assert np.array_equal(a, b)


def _params(model):
    from flax import nnx
    return nnx.state(model, nnx.Param)


def test_sharded_checkpoint_index_round_trip(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints["qwen2"]
    model = models.from_pretrained(path)
    out = models.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = jnp.arange(12, dtype=jnp.int32)[None]
    np.testing.assert_array_equal(np.asarray(models.from_pretrained(out)(ids)), np.asarray(model(ids)))


def test_bf16_params_give_close_logits(hf_checkpoints):
    path, hf_model = hf_checkpoints["qwen2"]
    model = models.from_pretrained(path, dtype=jnp.bfloat16)
    assert model.embed[...].dtype == jnp.bfloat16
    ids = np.random.default_rng(3).integers(0, 96, size=(1, 16))
    logits = model(jnp.asarray(ids, jnp.int32))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), _torch_logits(hf_model, ids), atol=0.05)


def test_remat_and_scan_give_same_logits_and_grads(hf_checkpoints):
    """Every remat policy, and the unrolled layer loop (scan_layers=False), give the scanned
    forward's gradients."""
    path, _ = hf_checkpoints["llama"]
    from flax import nnx

    ids = jnp.asarray(np.random.default_rng(4).integers(0, 96, size=(2, 9)), jnp.int32)
    grads = []
    for remat, scan in (("none", True), ("full", True), ("dots", True), ("none", False), ("full", False)):
        model = models.from_pretrained(path, remat=remat, scan_layers=scan)
        graphdef, params = nnx.split(model)

        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p)(ids) ** 2)

        grads.append(jax.jit(jax.grad(loss))(params))
    for g in grads[1:]:
        for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(g)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


# ---------------------------------------------------------------------------- bad input
def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.from_pretrained(tmp_path)


def test_missing_weights_is_a_clear_error(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints["qwen2"]
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        models.from_pretrained(tmp_path)


def test_unsupported_architecture_is_a_clear_error(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints["qwen2"]
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        models.from_pretrained(tmp_path)


def test_shape_mismatch_names_the_key(hf_checkpoints, tmp_path):
    import shutil

    path, _ = hf_checkpoints["qwen2"]
    shutil.copy(path / "model.safetensors", tmp_path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight.*shape"):
        models.from_pretrained(tmp_path)


def test_unmapped_key_is_a_clear_error(hf_checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = hf_checkpoints["qwen2"]
    tensors = load_file(path / "model.safetensors")
    tensors["model.extra_adapter.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(KeyError, match="extra_adapter"):
        models.from_pretrained(tmp_path)
