"""LoRA adapters (models/lora.py): the adapted forward equals the merged model's, adapter
gradients equal autodiff of the merged formula, a step moves only the adapters, the reference
policy is the base, SFT trains adapters only, and the bad inputs are clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_policy import tiny_model

from memagent_jax.config import load_config
from memagent_jax.errors import InputError
from memagent_jax.models.lora import (
    LORA_TARGETS, LoraConfig, LoraParam, add_lora, adapter_delta, freeze_base, lora_dropout,
    merged, split_trainable, zero_adapters,
)
from memagent_jax.rl.train_step import (
    LossSettings, init_policy_state, init_train_state, make_apply_update, make_optimizer,
    merge_policy, micro_batch_grads, sequence_logprobs,
)

IDS = jnp.asarray(np.random.default_rng(0).integers(4, 130, (2, 12)), jnp.int32)


@nnx.jit
def _logits(model, ids):
    """The model's logits, compiled (eager op-by-op forwards are slow on CPU)."""
    return model(ids)


def _adapted(rank: int = 4, targets: tuple[str, ...] = LORA_TARGETS, seed: int = 0,
             dropout: float = 0.0, **model_kw):
    """A tiny fp32 policy with adapters whose B is non-zero (as after training)."""
    model = add_lora(tiny_model(**model_kw), LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets,
                                                         dropout=dropout))
    graphdef, adapters, frozen = split_trainable(model)
    rng = np.random.default_rng(seed)  # host noise: no per-shape compiles
    adapters = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), adapters)
    return nnx.merge(graphdef, adapters, frozen)


def test_adapted_logits_equal_the_merged_model():
    model = _adapted()
    plain = merged(model)
    assert plain.config.lora is None and not nnx.state(plain, LoraParam)
    logits = _logits(model, IDS)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(_logits(plain, IDS)), atol=1e-5, rtol=0)
    # and the adapters do something (B != 0): the base alone differs
    graphdef, adapters, frozen = split_trainable(model)
    base = nnx.merge(graphdef, zero_adapters(adapters), frozen)
    assert float(jnp.abs(logits - _logits(base, IDS)).max()) > 1e-3


def test_fresh_adapters_change_nothing():
    plain = tiny_model()
    expected = np.asarray(_logits(plain, IDS))
    adapted = add_lora(plain, LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj")))
    np.testing.assert_array_equal(np.asarray(_logits(adapted, IDS)), expected)


def test_adapter_grads_equal_autodiff_of_the_merged_formula():
    model = _adapted(rank=3, targets=("q_proj", "o_proj", "down_proj"))
    lora = model.config.lora
    graphdef, adapters, frozen = split_trainable(model)
    plain_graphdef = nnx.split(merged(model))[0]
    weights = jax.random.normal(jax.random.key(3), (2, 12, 132))

    def adapted_loss(a):
        return jnp.sum(merge_policy(graphdef, a, frozen)(IDS) * weights)

    def merged_loss(a):  # W + (alpha/r) A @ B built by hand, then the plain decoder
        flat = dict(nnx.to_flat_state(frozen))
        for t in lora.targets:
            w = flat[("layers", t)]
            delta = adapter_delta(a["layers"][f"{t}_lora_a"][...], a["layers"][f"{t}_lora_b"][...],
                                  lora.scale)
            flat[("layers", t)] = w.replace(w.get_value() + delta)
        return jnp.sum(nnx.merge(plain_graphdef, nnx.from_flat_state(flat))(IDS) * weights)

    ours, ref = jax.jit(jax.grad(adapted_loss))(adapters), jax.jit(jax.grad(merged_loss))(adapters)
    for (path, g), (_, r) in zip(nnx.to_flat_state(ours), nnx.to_flat_state(ref)):
        np.testing.assert_allclose(np.asarray(g.get_value()), np.asarray(r.get_value()),
                                   rtol=1e-4, atol=1e-5, err_msg=str(path))


def test_a_step_trains_only_the_adapters():
    model = _adapted(targets=("q_proj", "up_proj"))
    tx = make_optimizer(1e-2, 1, 1, weight_decay=0.0)
    graphdef, state, frozen = init_policy_state(model, tx)
    names = {p[-1] for p, _ in nnx.to_flat_state(state.params)}
    assert names == {"q_proj_lora_a", "q_proj_lora_b", "up_proj_lora_a", "up_proj_lora_b"}
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    n_moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_moments == 2 * n_adapter  # AdamW's two moments, of the adapters only
    base_before = [np.asarray(x) for x in jax.tree.leaves(frozen)]
    adapters_before = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    tokens = IDS
    batch = {"tokens": tokens, "mask": jnp.ones(tokens.shape, jnp.float32),
             "advantages": jnp.asarray([[1.0] * 12, [-1.0] * 12]),
             "sampler_logp": jnp.zeros(tokens.shape, jnp.float32)}
    grads, _ = micro_batch_grads(graphdef, state.params, batch, jnp.float32(24.0), LossSettings(),
                                 frozen)
    assert jax.tree.structure(grads) == jax.tree.structure(state.params)
    state, norm, skipped = make_apply_update(tx)(state, grads)
    assert float(norm) > 0 and not bool(skipped)
    for a, b in zip(base_before, jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert all(not np.array_equal(a, np.asarray(b))
               for a, b in zip(adapters_before, jax.tree.leaves(state.params)))
    with pytest.raises(ValueError, match="init_policy_state"):
        init_train_state(model, tx)


def test_reference_logprobs_are_the_base_without_adapters():
    model = _adapted()
    graphdef, adapters, frozen = split_trainable(model)
    ref = sequence_logprobs(graphdef, zero_adapters(adapters), IDS, temperature=1.0, chunk=64,
                            frozen=frozen)
    base = tiny_model()  # the same seed: the weights under the adapters
    expected = sequence_logprobs(*split_trainable(base)[:2], IDS, temperature=1.0, chunk=64)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(expected), atol=1e-6)
    adapted = sequence_logprobs(graphdef, adapters, IDS, temperature=1.0, chunk=64, frozen=frozen)
    assert float(jnp.abs(adapted - expected).max()) > 1e-3


def test_sft_trains_adapters_only():
    from memagent_jax.rl.sft import SFTSettings, train_sft

    model = add_lora(tiny_model(), LoraConfig(rank=4, alpha=8.0))
    base_q = np.asarray(model.layers.q_proj[...])
    examples = [([5, 6, 7, 8], [9, 10, 11, 2])] * 4
    trained, history = train_sft(model, examples, SFTSettings(steps=4, batch_size=4, lr=3e-2,
                                                              warmup_steps=1, pad_multiple=8))
    np.testing.assert_array_equal(np.asarray(trained.layers.q_proj[...]), base_q)
    assert float(jnp.abs(trained.layers.q_proj_lora_b[...]).max()) > 0
    assert history[-1]["loss"] < history[0]["loss"]


# --------------------------------------------------------------------------------- dropout
def test_lora_dropout_zeroes_its_rate_and_keeps_the_expectation():
    x = jnp.full((200_000,), 2.0, jnp.float32)
    y = np.asarray(lora_dropout(x, jax.random.key(1), 0.25))
    assert abs((y == 0).mean() - 0.25) < 0.005  # 3 sigma of a binomial(200k, 0.25) share
    np.testing.assert_allclose(y[y != 0], 2.0 / 0.75, rtol=1e-6)  # the kept ones, rescaled
    assert abs(y.mean() - 2.0) < 0.02
    np.testing.assert_array_equal(y, np.asarray(lora_dropout(x, jax.random.key(1), 0.25)))
    assert not np.array_equal(y, np.asarray(lora_dropout(x, jax.random.key(2), 0.25)))


@nnx.jit
def _dropped_logits(model, ids, key):
    return model(ids, dropout_rng=key)


def test_dropout_acts_on_the_adapter_path_of_training_forwards_only():
    model = _adapted(dropout=0.5)
    undropped = np.asarray(_logits(_adapted(dropout=0.0), IDS))
    # no key (rollouts, old/reference log-probs, evaluation): exactly the policy without dropout
    np.testing.assert_array_equal(np.asarray(_logits(model, IDS)), undropped)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, b = np.asarray(_dropped_logits(model, IDS, k1)), np.asarray(_dropped_logits(model, IDS, k2))
    assert np.abs(a - undropped).max() > 1e-3 and np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(a, np.asarray(_dropped_logits(model, IDS, k1)))  # key-determined
    # only the adapter path drops: with B = 0 (fresh adapters) a key changes nothing
    fresh = add_lora(tiny_model(), LoraConfig(rank=4, alpha=8.0, dropout=0.5))
    np.testing.assert_allclose(np.asarray(_dropped_logits(fresh, IDS, k1)),
                               np.asarray(_logits(tiny_model(), IDS)), atol=1e-6, rtol=0)


def test_dropout_keys_reach_the_rl_and_sft_gradients():
    from memagent_jax.rl.sft import SFTSettings, train_sft

    model = _adapted(targets=("q_proj", "up_proj"), dropout=0.3)
    graphdef, adapters, frozen = split_trainable(model)
    batch = {"tokens": IDS, "mask": jnp.ones(IDS.shape, jnp.float32),
             "advantages": jnp.asarray([[1.0] * 12, [-1.0] * 12]),
             "sampler_logp": jnp.zeros(IDS.shape, jnp.float32)}
    den, s = jnp.float32(24.0), LossSettings()
    plain = micro_batch_grads(graphdef, adapters, batch, den, s, frozen)[0]
    key = np.asarray(jax.random.PRNGKey(4), np.uint32)  # the trainer's seeds.derive key data
    dropped = micro_batch_grads(graphdef, adapters, batch, den, s, frozen, key)[0]
    again = micro_batch_grads(graphdef, adapters, batch, den, s, frozen, key)[0]
    diffs = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(dropped))]
    assert max(diffs) > 1e-4
    for a, b in zip(jax.tree.leaves(dropped), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    examples = [([5, 6, 7, 8], [9, 10, 11, 2])] * 4
    settings = SFTSettings(steps=6, batch_size=4, lr=3e-2, warmup_steps=1, pad_multiple=8)
    _, with_dropout = train_sft(_adapted(targets=("q_proj", "up_proj"), dropout=0.3), examples, settings)
    _, without = train_sft(_adapted(targets=("q_proj", "up_proj")), examples, settings)
    assert with_dropout[-1]["loss"] < with_dropout[0]["loss"]
    assert with_dropout[1]["loss"] != without[1]["loss"]  # the masks changed the steps


# ------------------------------------------------------------------------------- bad input
def test_unknown_target_is_a_clear_error():
    with pytest.raises(InputError, match=r"unknown projection 'qkv'.*q_proj"):
        load_config(None, ["model.lora.rank=8", "model.lora.targets=[q,qkv]"])
    cfg = load_config(None, ["model.lora.rank=8", "model.lora.targets=q,v_proj,down"])
    from memagent_jax.models.lora import lora_from_section

    assert lora_from_section(cfg.model.lora, "float32").targets == ("q_proj", "v_proj", "down_proj")


def test_rank_above_a_target_dimension_is_a_clear_error():
    # tiny_model: hidden 32, one kv head of 16: k_proj is 32 x 16
    with pytest.raises(InputError, match=r"rank=17 is larger than k_proj's dimension \(32 x 16"):
        add_lora(tiny_model(), LoraConfig(rank=17, alpha=17.0))
    add_lora(tiny_model(), LoraConfig(rank=17, alpha=17.0, targets=("q_proj",)))  # 32 x 32: fine


def test_negative_rank_and_dropout_are_clear_errors():
    with pytest.raises(InputError, match=r"model.lora.rank=-1 must be >= 0.*command line"):
        load_config(None, ["model.lora.rank=-1"])
    for bad in ("1.0", "-0.1"):
        with pytest.raises(InputError, match=rf"model.lora.dropout={bad} must be in \[0, 1\)"):
            load_config(None, ["model.lora.rank=4", f"model.lora.dropout={bad}"])
    assert load_config(None, ["model.lora.rank=4", "model.lora.dropout=0.1"]).model.lora.dropout == 0.1


def test_base_that_does_not_fit_the_frozen_dtype_is_a_clear_error():
    model = tiny_model()
    model.layers.up_proj[...] = model.layers.up_proj[...].at[0, 0, 0].set(1e5)  # > float16's max
    with pytest.raises(InputError, match=r"'layers/up_proj' cannot be frozen in model.dtype=float16"):
        freeze_base(model, "float16")
    frozen = freeze_base(tiny_model(), "bfloat16")
    assert frozen.layers.q_proj[...].dtype == jnp.bfloat16
    assert frozen.config.param_dtype == "bfloat16"


def test_peft_adapter_loaded_by_transformers_equals_our_policy(tmp_path):
    from memagent_jax.models import save_pretrained
    from memagent_jax.models.peft_adapter import peft_key, save_adapter

    model = _adapted(targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
    graphdef, adapters, frozen = split_trainable(model)
    save_pretrained(merged(nnx.merge(graphdef, zero_adapters(adapters), frozen)), tmp_path / "base")
    out = save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    from safetensors.numpy import load_file

    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors[peft_key(1, "q_proj", "A")].shape == (4, 32)  # lora_A: [r, in]
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (32, 4)
    peft = pytest.importorskip("peft", reason="peft is the test-only dependency for this check")
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        theirs = adapted(torch.as_tensor(np.asarray(IDS), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(_logits(model, IDS)), atol=1e-4)


@pytest.mark.slow  # ~11 s on a loaded 2-core CPU: the engine's prefill and decode programs
def test_engine_with_applied_adapters_decodes_as_the_merged_policy():
    """model.lora.rollout: applied runs the adapters inside the engine's prefill and decode."""
    from test_engine import _prompts, _run_engine

    from memagent_jax import sampler

    model = _adapted(rank=2, targets=("q_proj", "down_proj"), vocab_size=64)
    prompts, news = _prompts(5, [7, 12, 9]), [6, 6, 6]
    got, _ = _run_engine(model, prompts, news, slots=2, seed=0, decode_steps=3)
    ref = sampler.generate(merged(model), prompts, max_new_tokens=6)
    assert [g[0] for g in got] == ref.tokens
    for (_, lp, _), rlp in zip(got, ref.logps):
        np.testing.assert_allclose(lp, rlp, atol=1e-4)
