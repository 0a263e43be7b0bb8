"""Tests for memagent_jax.rl.loss against an independent numpy version of docs/reference.md section 3."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memagent_jax.rl import loss as L

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


# ----------------------------------------------------------------------------- numpy reference


def ref_loss(logp, old, adv, mask, *, eps_low, eps_high, clip_c, agg, ref=None, kl_coef=0.0,
             entropy=None):  # fmt: skip
    """Per-token loops over docs/reference.md's formulas, float64."""
    B, T = logp.shape
    pg = np.zeros((B, T))
    kl = np.zeros((B, T))
    clip_up = np.zeros((B, T))
    clip_lo = np.zeros((B, T))
    akl = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            lr = min(max(float(logp[b, t]) - float(old[b, t]), -20.0), 20.0)
            r = np.exp(lr)
            a = float(adv[b, t])
            if a >= 0:
                pg[b, t] = -a * min(r, 1 + eps_high)
                clip_up[b, t] = r > 1 + eps_high
            else:
                v = max(r, 1 - eps_low)
                if clip_c is not None:
                    v = min(v, clip_c)
                    clip_lo[b, t] = r > clip_c
                pg[b, t] = abs(a) * v
                clip_up[b, t] = r < 1 - eps_low
            akl[b, t] = np.exp(lr) - 1 - lr
            if ref is not None:
                k = float(ref[b, t]) - float(logp[b, t])
                kl[b, t] = min(max(np.exp(k) - k - 1, -10.0), 10.0)

    def aggregate(x):
        if agg == "token-mean":
            return (mask * x).sum() / mask.sum()
        if agg == "seq-mean-token-mean":
            rows = [(mask[b] * x[b]).sum() / mask[b].sum() for b in range(B) if mask[b].sum() > 0]
            return float(np.mean(rows))
        if agg == "seq-mean-token-sum-norm":  # rows x the longest response
            return (mask * x).sum() / (B * max(1.0, mask.sum(axis=1).max()))
        raise AssertionError(agg)

    def tmean(x):
        return (mask * x).sum() / mask.sum()

    loss = aggregate(pg) + (kl_coef * aggregate(kl) if ref is not None else 0.0)
    aux = {"pg_loss": aggregate(pg), "clipfrac": tmean(clip_up), "clipfrac_lower": tmean(clip_lo),
           "approx_kl": tmean(akl)}  # fmt: skip
    if ref is not None:
        aux["kl"] = aggregate(kl)
    if entropy is not None:
        aux["entropy"] = tmean(entropy)
    return loss, aux


def make_batch(seed, B=6, T=9):
    """Random batch: wide log-ratios (r beyond the dual clip and the +-20 clamp), per-row
    advantages of both signs and zeros, ragged masks with an empty row."""
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 1.0, size=(B, T)).astype(np.float32)
    logp = (old + rng.normal(0.0, 1.5, size=(B, T))).astype(np.float32)
    logp[0, 0] = old[0, 0] + 25.0  # clamped log-ratio
    logp[1, 1] = old[1, 1] - 25.0
    adv_row = rng.normal(0.0, 1.0, size=(B, 1))
    adv_row[2] = 0.0
    adv_row[3] = -abs(adv_row[3]) - 0.5  # a surely negative row
    adv = np.broadcast_to(adv_row, (B, T)).astype(np.float32).copy()
    lengths = rng.integers(1, T + 1, size=B)
    lengths[4] = 0  # an empty row
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    mask[3, :] = 1.0
    ref = (logp + rng.normal(0.0, 0.5, size=(B, T))).astype(np.float32)
    ref[5, 0] = logp[5, 0] + 30.0  # KL beyond the clamp
    ent = rng.uniform(0.0, 3.0, size=(B, T)).astype(np.float32)
    return logp, old, adv, mask, ref, ent


def _check(got_loss, got_aux, want_loss, want_aux):
    np.testing.assert_allclose(float(got_loss), want_loss, rtol=2e-5, atol=1e-6)
    assert set(want_aux) <= set(got_aux)
    for k, v in want_aux.items():
        np.testing.assert_allclose(float(got_aux[k]), v, rtol=2e-5, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip_c", [10.0, 3.0, None])
def test_policy_loss_parity(seed, agg, clip_c):
    logp, old, adv, mask, _, _ = make_batch(seed)
    kw = dict(eps_low=0.2, eps_high=0.28, clip_c=clip_c, agg=agg)
    loss, aux = L.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
                              jnp.asarray(mask), **kw)  # fmt: skip
    want_loss, want_aux = ref_loss(logp, old, adv, mask, **kw)
    _check(loss, aux, want_loss, want_aux)
    assert "kl" not in aux and "entropy" not in aux


def test_batch_exercises_every_branch():
    """The random batches do hit dual clip, upper clip and unclipped small r for A >= 0."""
    hits = np.zeros(3)
    for seed in range(3):
        logp, old, adv, mask, _, _ = make_batch(seed)
        r = np.exp(np.clip(logp - old, -20, 20))
        m = mask > 0
        hits += [(m & (adv < 0) & (r > 10)).sum(), (m & (adv >= 0) & (r > 1.28)).sum(),
                 (m & (adv > 0) & (r < 0.8)).sum()]  # fmt: skip
    assert (hits > 0).all(), hits


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_kl_and_entropy_parity(seed, agg):
    logp, old, adv, mask, ref, ent = make_batch(seed)
    kw = dict(eps_low=0.2, eps_high=0.2, clip_c=3.0, agg=agg, kl_coef=0.1)
    loss, aux = L.policy_loss(*map(jnp.asarray, (logp, old, adv, mask)), ref_logp=jnp.asarray(ref),
                              entropy=jnp.asarray(ent), **kw)  # fmt: skip
    want_loss, want_aux = ref_loss(logp, old, adv, mask, ref=ref, entropy=ent, **kw)
    _check(loss, aux, want_loss, want_aux)
    np.testing.assert_allclose(float(loss), float(aux["pg_loss"] + 0.1 * aux["kl"]), rtol=1e-5)


def test_ratio_one_is_minus_mean_advantage():
    logp, _, adv, mask, _, _ = make_batch(4)
    loss, aux = L.policy_loss(jnp.asarray(logp), jnp.asarray(logp), jnp.asarray(adv),
                              jnp.asarray(mask))  # fmt: skip
    np.testing.assert_allclose(float(loss), -(adv * mask).sum() / mask.sum(), rtol=1e-5)
    assert float(aux["clipfrac"]) == 0.0 and float(aux["approx_kl"]) == 0.0


def test_clip_regions_concrete():
    """One token per case: values and which gradients vanish."""
    lr = np.log(np.array([[0.5, 2.0, 0.5, 2.0, 20.0, 1.1]], np.float32))
    adv = np.array([[1.0, 1.0, -1.0, -1.0, -1.0, -2.0]], np.float32)
    mask = np.ones_like(adv)
    old = np.zeros_like(adv)

    def per_token(lp):
        num, _, _ = L.policy_loss_sum(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                                      eps_low=0.2, eps_high=0.28, clip_c=3.0)  # fmt: skip
        return num

    # A>=0: r=0.5 unclipped -> -0.5; r=2 clipped -> -1.28. A<0: r=0.5 -> 0.8 (clip);
    # r=2 -> 2 (unclipped); r=20 -> dual clip 3; r=1.1, |A|=2 -> 2.2.
    want = np.array([-0.5, -1.28, 0.8, 2.0, 3.0, 2.2])
    np.testing.assert_allclose(float(per_token(jnp.asarray(lr))), want.sum(), rtol=1e-5)
    g = np.asarray(jax.grad(per_token)(jnp.asarray(lr)))[0]
    np.testing.assert_allclose(g, [-0.5, 0.0, 0.0, 2.0, 0.0, 2.2], rtol=1e-5, atol=1e-7)
    _, aux = L.policy_loss(jnp.asarray(lr), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                           eps_low=0.2, eps_high=0.28, clip_c=3.0)  # fmt: skip
    np.testing.assert_allclose(float(aux["clipfrac"]), 2 / 6, rtol=1e-6)  # tokens 1 and 2
    np.testing.assert_allclose(float(aux["clipfrac_lower"]), 1 / 6, rtol=1e-6)  # token 4


def test_empty_mask_gives_zero_and_finite_grad():
    z = jnp.zeros((2, 3))
    loss, aux = L.policy_loss(z, z, jnp.ones((2, 3)), z)
    assert float(loss) == 0.0 and float(aux["clipfrac"]) == 0.0
    g = jax.grad(lambda lp: L.policy_loss(lp, z, jnp.ones((2, 3)), z)[0])(z)
    assert np.isfinite(np.asarray(g)).all()


def test_unknown_agg_raises():
    z = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="agg='mean'"):
        L.policy_loss(z, z, z, z, agg="mean")


@pytest.mark.parametrize("agg", AGGS)
def test_jit_matches_eager(agg):
    logp, old, adv, mask, ref, _ = make_batch(7)
    args = tuple(map(jnp.asarray, (logp, old, adv, mask)))
    fn = functools.partial(L.policy_loss, agg=agg, clip_c=3.0, kl_coef=0.01)
    eager, _ = fn(*args, ref_logp=jnp.asarray(ref))
    jitted, _ = jax.jit(fn)(*args, ref_logp=jnp.asarray(ref))
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)


# ----------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("agg", AGGS)
def test_grad_accumulation_over_uneven_micro_batches(agg):
    """Summing policy_loss_sum / global denominator over micro-batches of 1, 3, 2, 2 rows gives
    exactly the whole-batch loss and gradient (never a mean of micro-batch means)."""
    logp, old, adv, mask, ref, _ = make_batch(11, B=8, T=7)
    mask[1, :] = 0.0  # an empty row inside the 3-row micro-batch
    kw = dict(eps_low=0.2, eps_high=0.28, clip_c=3.0, agg=agg, kl_coef=0.05)
    full = lambda lp: L.policy_loss(lp, old, adv, mask, ref_logp=ref, **kw)[0]  # noqa: E731
    want_loss, want_grad = jax.value_and_grad(full)(jnp.asarray(logp))

    # Global denominator, computed independently of the module.
    global_den = {"token-mean": mask.sum(), "seq-mean-token-mean": (mask.sum(1) > 0).sum(),
                  "seq-mean-token-sum-norm": mask.shape[0] * mask.sum(1).max()}[agg]  # fmt: skip
    bounds = np.cumsum([0, 1, 3, 2, 2])
    total, grads, local_dens = 0.0, [], 0.0
    for s, e in zip(bounds[:-1], bounds[1:]):
        sl = slice(s, e)

        def micro(lp, sl=sl):
            num, den, _ = L.policy_loss_sum(lp, old[sl], adv[sl], mask[sl], ref_logp=ref[sl],
                                            denominator=float(global_den), **kw)  # fmt: skip
            return num / den

        v, g = jax.value_and_grad(micro)(jnp.asarray(logp[sl]))
        total += float(v)
        grads.append(np.asarray(g))
        local_dens += float(L.policy_loss_sum(logp[sl], old[sl], adv[sl], mask[sl], **kw)[1])

    if agg != "seq-mean-token-sum-norm":  # a max over rows does not add up: pass the global one
        np.testing.assert_allclose(local_dens, global_den)  # local denominators add up
    np.testing.assert_allclose(total, float(want_loss), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.concatenate(grads), np.asarray(want_grad), rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(want_grad)).max() > 0


@pytest.mark.parametrize("agg", AGGS)
def test_one_aggregation_definition_for_loss_and_trainer_batching(agg):
    """The trainer's mini-batch denominator (rl/batching.py) is the loss's own, and neither moves
    when the time axis is padded further (rows hold prompt + response, padded to a bucket)."""
    from memagent_jax.rl.batching import global_denominator

    logp, old, adv, mask, _, _ = make_batch(5, B=6, T=9)
    mask[:, 7:] = 0.0  # the longest response ends before the padded width
    kw = dict(eps_low=0.2, eps_high=0.28, clip_c=3.0, agg=agg)
    loss, _ = L.policy_loss(logp, old, adv, mask, **kw)
    _, den, _ = L.policy_loss_sum(logp, old, adv, mask, **kw)
    assert global_denominator(mask, agg) == pytest.approx(float(den))
    pad = lambda x: np.pad(x, ((0, 0), (0, 7)))  # noqa: E731
    padded, _ = L.policy_loss(pad(logp), pad(old), pad(adv), pad(mask), **kw)
    np.testing.assert_allclose(float(padded), float(loss), rtol=1e-6)
    assert global_denominator(pad(mask), agg) == global_denominator(mask, agg)


def test_aux_sums_reduce_to_aux():
    logp, old, adv, mask, ref, ent = make_batch(3)
    args = tuple(map(jnp.asarray, (logp, old, adv, mask)))
    kw = dict(agg="seq-mean-token-mean", ref_logp=jnp.asarray(ref), entropy=jnp.asarray(ent))
    _, aux = L.policy_loss(*args, **kw)
    num, den, sums = L.policy_loss_sum(*args, **kw)
    reduced = L.reduce_aux_sums(sums, den)
    assert set(reduced) == set(aux)
    for k in aux:
        np.testing.assert_allclose(float(reduced[k]), float(aux[k]), rtol=1e-6)
    np.testing.assert_allclose(float(sums["num_tokens"]), mask.sum())


# ----------------------------------------------------------------------------- entropy


def test_entropy_from_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(2, 3, 11)).astype(np.float32)
    logits[0, 0, 5:] = -np.inf  # masked vocabulary
    got = np.asarray(L.entropy_from_logits(jnp.asarray(logits)))
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    assert got.shape == (2, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(L.entropy_from_logits(jnp.zeros(8))), np.log(8), rtol=1e-6)
    # bf16 logits are computed in fp32; a one-hot distribution has zero entropy
    onehot = jnp.asarray([0.0, -jnp.inf, -jnp.inf], jnp.bfloat16)
    out = L.entropy_from_logits(onehot)
    assert out.dtype == jnp.float32 and float(out) == 0.0
