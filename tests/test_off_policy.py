"""The off-policy correction (rl/off_policy.py): truncated and masked importance sampling at token
and sequence level against hand-computed values, its place in the loss (defaults = the loss as it
was, masked tokens contribute nothing but keep the denominator), and the config's checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_policy import tiny_model

from memagent_jax.config import load_config
from memagent_jax.errors import InputError
from memagent_jax.rl.logprobs import token_logprobs
from memagent_jax.rl.loss import policy_loss_sum
from memagent_jax.rl.off_policy import AUX_KEYS, correction
from memagent_jax.rl.train_step import (
    LossSettings, _loss, init_train_state, make_optimizer, merge_policy,
)

# Rows: a response of 3 tokens after a prompt token; a response of 2; a padding row. Log-ratios
# old - sampler on response tokens: row 0: ln 3, ln 0.25, ln 1.5; row 1: ln 1.2, ln 1.1.
LR = np.log(np.array([[1.0, 3.0, 0.25, 1.5], [1.0, 1.2, 1.1, 1.0], [1.0, 1.0, 1.0, 1.0]]))
MASK = np.array([[0, 1, 1, 1], [0, 1, 1, 0], [0, 0, 0, 0]], np.float32)


def _inputs():
    sampler = np.full(MASK.shape, -2.0, np.float32)
    sampler[:, 0] = 0.0  # prompt positions: the sampler reports nothing
    old = (sampler + LR).astype(np.float32)
    old[:, 0] = -7.0  # prompt log-probs: must not matter
    old[2] = [-50.0, 40.0, -30.0, 9.0]  # a padding row with wild values: untouched
    return jnp.asarray(old), jnp.asarray(sampler), jnp.asarray(MASK)


def _run(**kw):
    w, keep, aux = jax.jit(lambda o, s, m: correction(o, s, m, **kw))(*_inputs())
    return np.asarray(w), np.asarray(keep), {k: float(v) for k, v in aux.items()}


ABS_DIFF = np.log(3) + np.log(4) + np.log(1.5) + np.log(1.2) + np.log(1.1)


def test_everything_off_is_identity_with_the_gap_metric():
    w, keep, aux = _run()
    assert set(aux) == set(AUX_KEYS)
    np.testing.assert_array_equal(w, np.ones_like(w))
    np.testing.assert_array_equal(keep, np.ones_like(keep))
    assert aux["mis_masked"] == 0 and aux["tis_clipped"] == 0
    np.testing.assert_allclose(aux["logprob_abs_diff"], ABS_DIFF, rtol=1e-6)


def test_tis_token_level():
    w, keep, aux = _run(tis_cap=2.0)
    want = np.array([[1, 2.0, 0.25, 1.5], [1, 1.2, 1.1, 1], [1, 1, 1, 1]])
    np.testing.assert_allclose(w, want, rtol=1e-6)
    np.testing.assert_array_equal(keep, np.ones_like(keep))
    assert aux["tis_clipped"] == 1 and aux["mis_masked"] == 0  # the ratio-3 token


def test_tis_sequence_level():
    w, _, aux = _run(tis_cap=2.0, tis_level="sequence")
    row0 = min(3 * 0.25 * 1.5, 2.0)  # 1.125
    row1 = min(1.2 * 1.1, 2.0)  # 1.32
    want = np.array([[1, row0, row0, row0], [1, row1, row1, 1], [1, 1, 1, 1]])
    np.testing.assert_allclose(w, want, rtol=1e-6)
    assert aux["tis_clipped"] == 0
    w, _, aux = _run(tis_cap=1.2, tis_level="sequence")  # row 1 (1.32) is truncated: 2 tokens
    np.testing.assert_allclose(w[1], [1, 1.2, 1.2, 1], rtol=1e-6)
    np.testing.assert_allclose(w[0, 1:], 1.125, rtol=1e-6)
    assert aux["tis_clipped"] == 2


def test_mis_token_level_masks_tokens_outside_the_band():
    _, keep, aux = _run(mis_cap=2.0)  # keep ratios in [0.5, 2]: drop 3 and 0.25
    want = np.array([[1, 0, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(keep, want)
    assert aux["mis_masked"] == 2
    _, keep, aux = _run(mis_cap=1.15)  # [0.87, 1.15]: 1.2 is out too, 1.1 stays
    np.testing.assert_array_equal(keep[1], [1, 0, 1, 1])
    assert aux["mis_masked"] == 4


def test_mis_sequence_level_masks_whole_rows():
    _, keep, aux = _run(mis_cap=1.25, mis_level="sequence")  # row 0: 1.125 in; row 1: 1.32 out
    np.testing.assert_array_equal(keep, [[1, 1, 1, 1], [1, 0, 0, 1], [1, 1, 1, 1]])
    assert aux["mis_masked"] == 2
    _, keep, _ = _run(mis_cap=1.1, mis_level="sequence")  # both rows out, padding row kept
    np.testing.assert_array_equal(keep, [[1, 0, 0, 0], [1, 0, 0, 1], [1, 1, 1, 1]])


def test_tis_and_mis_together_weight_the_kept_tokens():
    w, keep, aux = _run(tis_cap=1.4, mis_cap=2.0)
    np.testing.assert_array_equal(keep[0], [1, 0, 0, 1])
    np.testing.assert_allclose(w[0], [1, 1.4, 0.25, 1.4], rtol=1e-6)
    # clipped among the kept tokens: 1.5 (kept) yes, 3 (masked) not counted
    assert aux["tis_clipped"] == 1 and aux["mis_masked"] == 2


def test_sequence_log_ratio_is_clamped_before_exp():
    old = jnp.asarray([[0.0] * 8])
    sampler = jnp.asarray([[-30.0] * 8])  # log-ratio 240: exp overflows without the clamp
    mask = jnp.ones((1, 8))
    w, keep, _ = correction(old, sampler, mask, tis_cap=3.0, tis_level="sequence", mis_cap=2.0,
                            mis_level="sequence")
    np.testing.assert_array_equal(np.asarray(w), 3.0)
    np.testing.assert_array_equal(np.asarray(keep), 0.0)
    w, keep, _ = correction(sampler, old, mask, tis_cap=3.0, tis_level="sequence")
    np.testing.assert_allclose(np.asarray(w), np.exp(-20.0), rtol=1e-5)


def test_bad_settings_raise():
    o, s, m = _inputs()
    for kw in ({"tis_level": "row"}, {"mis_level": "seq"}, {"mis_cap": 0.5}, {"tis_cap": -1.0}):
        with pytest.raises(ValueError):
            correction(o, s, m, **kw)


# ---------------------------------------------------------------------------------- the loss


def _legacy_loss(params, graphdef, batch, denominator, s):
    """The loss as it was before the correction suite (TIS token level inline)."""
    model = merge_policy(graphdef, params)
    logp, entropy = token_logprobs(model, batch["tokens"], temperature=s.temperature,
                                   chunk=s.logprob_chunk, with_entropy=True)
    mask = batch["mask"]
    old = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
    adv = batch["advantages"]
    if s.tis_cap > 0:
        adv = adv * jnp.minimum(jnp.exp(old - batch["sampler_logp"]), s.tis_cap)
    num, _, aux = policy_loss_sum(
        logp, old, adv, mask, eps_low=s.eps_low, eps_high=s.eps_high, clip_c=s.clip_c,
        agg=s.agg, ref_logp=batch.get("ref_logp"), kl_coef=s.kl_coef, entropy=entropy,
        denominator=denominator)
    loss = num / denominator
    if s.entropy_coef:
        loss = loss - s.entropy_coef * (mask * entropy).sum() / denominator
    aux["logp_gap"] = (mask * jnp.abs(jax.lax.stop_gradient(old) - batch["sampler_logp"])).sum()
    return loss, aux


@pytest.fixture(scope="module")
def policy():
    graphdef, state = init_train_state(tiny_model(num_layers=1), make_optimizer(1e-3, 1, 1))
    rng = np.random.default_rng(0)
    n, t = 4, 16
    mask = np.zeros((n, t), np.float32)
    mask[0, 5:12], mask[1, 3:16], mask[2, 8:10] = 1, 1, 1  # row 3: padding
    batch = {"tokens": rng.integers(4, 132, (n, t)).astype(np.int32), "mask": mask,
             "advantages": (np.array([[1.0], [-0.7], [0.4], [0.0]]) * mask).astype(np.float32),
             "old_logp": rng.normal(-4.0, 0.3, (n, t)).astype(np.float32),
             "ref_logp": rng.normal(-4.0, 0.3, (n, t)).astype(np.float32)}
    noise = rng.normal(0, 0.8, (n, t))
    batch["sampler_logp"] = (batch["old_logp"] + noise).astype(np.float32) * mask
    return graphdef, state.params, {k: jnp.asarray(v) for k, v in batch.items()}


def _grad(fn, graphdef, params, batch, settings, den):
    """Gradient leaves and aux (with "loss") of fn at params."""
    g = jax.jit(jax.value_and_grad(fn, has_aux=True), static_argnums=(1, 4))
    (loss, aux), grads = g(params, graphdef, batch, jnp.float32(den), settings)
    aux = {"loss": loss, **aux}
    leaves = [np.asarray(x) for x in jax.tree.leaves(grads)]
    return leaves, {k: np.asarray(v) for k, v in aux.items()}


@pytest.mark.parametrize("tis_cap", [0.0, 1.5])
def test_default_settings_reproduce_the_previous_loss_bit_for_bit(policy, tis_cap):
    graphdef, params, batch = policy
    s = LossSettings(clip_c=3.0, kl_coef=0.01, entropy_coef=0.001, tis_cap=tis_cap)
    assert s == LossSettings(clip_c=3.0, kl_coef=0.01, entropy_coef=0.001, tis_cap=tis_cap,
                             tis_level="token", mis_cap=0.0, mis_level="token")
    den = float(batch["mask"].sum())
    new, new_aux = _grad(_loss, graphdef, params, batch, s, den)
    old, old_aux = _grad(_legacy_loss, graphdef, params, batch, s, den)
    for a, b in zip(new, old):
        np.testing.assert_array_equal(a, b)
    for k, v in old_aux.items():
        np.testing.assert_array_equal(new_aux[k], v, err_msg=k)
    assert new_aux["mis_masked"] == 0
    assert (new_aux["tis_clipped"] > 0) == (tis_cap > 0)


def test_mis_masked_tokens_add_nothing_and_keep_the_denominator(policy):
    graphdef, params, batch = policy
    den = float(batch["mask"].sum())
    s = LossSettings(clip_c=3.0, mis_cap=1.5)
    _, keep, _ = correction(batch["old_logp"], batch["sampler_logp"], batch["mask"], mis_cap=1.5)
    assert 0 < float((batch["mask"] * (1 - keep)).sum()) < den  # some tokens masked, not all
    masked, aux = _grad(_loss, graphdef, params, batch, s, den)
    # the same as zero advantages on the rejected tokens, divided by the same denominator
    zeroed, _ = _grad(_loss, graphdef, params, {**batch, "advantages": batch["advantages"] * keep},
                      LossSettings(clip_c=3.0), den)
    for a, b in zip(masked, zeroed):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    assert aux["mis_masked"] == float((batch["mask"] * (1 - keep)).sum())
    # every token rejected: zero loss and gradient, KL and entropy terms included
    s_all = LossSettings(clip_c=3.0, kl_coef=0.1, entropy_coef=0.01, mis_cap=2.0)
    far = {**batch, "sampler_logp": batch["old_logp"] - 1.0}
    grads, aux = _grad(_loss, graphdef, params, far, s_all, den)
    assert aux["loss"] == 0.0 and aux["mis_masked"] == den
    assert all(not g.any() for g in grads)


# -------------------------------------------------------------------------------- the config


@pytest.mark.parametrize("override, match", [
    ("rl.tis_level=row", r"rl.tis_level='row'.*set rl.tis_level to token .* or sequence"),
    ("rl.mis_level=tokens", r"rl.mis_level='tokens'.*set rl.mis_level to token"),
    ("rl.mis_cap=0.8", r"rl.mis_cap=0.8 is not a bound above 1.*c > 1"),
    ("rl.mis_cap=1", r"rl.mis_cap=1.0 .*or 0 \(off\)"),
    ("rl.tis_cap=-2", r"rl.tis_cap=-2.0 is negative.*or 0 \(off\)"),
])
def test_bad_config_values_are_a_clear_error(override, match):
    with pytest.raises(InputError, match=match):
        load_config(None, [override])


def test_config_reaches_the_trainers_loss_settings(tmp_path):
    from tiny_policy import AsciiTokenizer

    from memagent_jax.rl.trainer import Trainer

    cfg = load_config(None, ["rl.tis_cap=2", "rl.tis_level=sequence", "rl.mis_cap=3",
                             "rl.mis_level=sequence", f"trainer.out_dir={tmp_path}",
                             "trainer.async_checkpoint=false"])
    trainer = Trainer(cfg, tiny_model(), AsciiTokenizer(), iter([]),
                      generate_fn=lambda *a, **k: None)
    s = trainer.settings
    assert (s.tis_cap, s.tis_level, s.mis_cap, s.mis_level) == (2.0, "sequence", 3.0, "sequence")
    trainer.close()
