"""DAPO policy loss with dual clip, optional low-variance KL, three aggregation modes.

docs/reference.md section 3. Per response token, with the log-ratio clamped to [-20, 20] and
r = exp(logp - old_logp):

    A >= 0:  l = -A * min(r, 1 + eps_high)
    A <  0:  l = |A| * min(max(r, 1 - eps_low), c)        (no min(., c) when clip_c is None)

This is the PPO clipped objective max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) written out per
sign, with the dual clip c bounding the loss of negative advantages when r explodes.

Every aggregation mode is a weighted sum of per-token values divided by a denominator:

    token-mean               weight m,                       denominator sum(m)
    seq-mean-token-mean      weight m / sum_t(m) per row,    denominator #rows with sum_t(m) > 0
    seq-mean-token-sum-norm  weight m,                       denominator num_rows * L

L is the longest response among the rows (max over rows of sum_t m): the padded response length
when responses are padded to the longest, and independent of how far the time axis is padded
(rows here hold prompt + response). `aggregation_denominator` is the one definition; the
trainer's batching applies it to the whole mini-batch.

`policy_loss_sum` returns (numerator, denominator, aux sums); a trainer accumulating micro-batches
sums the numerators and divides once by the global denominator (or passes `denominator=` the global
value to each micro-batch), which gives the exact mini-batch loss and gradient, never a mean of
micro-batch means. `policy_loss` is numerator / denominator.

All functions are pure and jittable; `agg` and `clip_c` are Python values (static under jit) and
`ref_logp` / `entropy` switch optional terms by being None or not.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Agg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0

# aux_sums keys normalized by the loss denominator (aggregated like the loss); the others are
# plain masked token sums, normalized by aux_sums["num_tokens"].
_AGG_KEYS = ("pg_loss", "kl")


def aggregation_denominator(mask: Any, agg: str) -> Any:
    """The denominator of aggregation `agg` over the response mask `mask` [rows, T] (see the
    module docstring): a numpy float32 for a numpy mask (the trainer, over a whole mini-batch),
    else a jax float32 (the loss, under jit)."""
    xp = np if isinstance(mask, np.ndarray) else jnp
    tokens_per_row = mask.sum(axis=-1)
    if agg == "token-mean":
        den = tokens_per_row.sum()
    elif agg == "seq-mean-token-mean":
        den = (tokens_per_row > 0).sum()
    elif agg == "seq-mean-token-sum-norm":
        den = mask.shape[0] * xp.maximum(xp.max(tokens_per_row, initial=0.0), 1.0)
    else:
        raise ValueError(f"unknown loss aggregation agg={agg!r}; expected one of {AGG_MODES}")
    return xp.asarray(den, xp.float32)


def _agg_weights(mask: jax.Array, agg: str) -> tuple[jax.Array, jax.Array]:
    """Per-token weights w and the local denominator d so that agg(l) = sum(w * l) / d."""
    den = aggregation_denominator(mask, agg)
    if agg == "seq-mean-token-mean":  # empty rows get weight 0
        return mask / jnp.maximum(mask.sum(axis=-1, keepdims=True), 1.0), den
    return mask, den


def low_var_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k3 KL estimate to the reference policy: k = ref - logp, exp(k) - k - 1 clamped to [-10, 10].

    k is pre-clamped to [-20, 20]; beyond that range the estimate is already above the clamp, so
    values are unchanged, but exp never overflows (an inf would turn the gradient into NaN).
    """
    k = jnp.clip(ref_logp - logp, -2 * KL_CLAMP, 2 * KL_CLAMP)
    return jnp.clip(jnp.exp(k) - k - 1.0, -KL_CLAMP, KL_CLAMP)


def policy_loss_sum(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_c: float | None = 10.0,
    agg: Agg = "token-mean",
    ref_logp: jax.Array | None = None,
    kl_coef: float = 0.0,
    entropy: jax.Array | None = None,
    denominator: jax.Array | float | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Un-normalized DAPO loss: (numerator, denominator, aux_sums). All inputs [B, T].

    loss = numerator / denominator. `denominator` overrides the local one: pass the whole
    mini-batch's `aggregation_denominator` when accumulating micro-batches.

    aux_sums: "pg_loss" and "kl" (when ref_logp is given) are numerators of the same aggregation;
    "clipfrac", "clipfrac_lower", "approx_kl", "entropy" (when given) are masked token sums, and
    "num_tokens" = sum(mask). `reduce_aux_sums` turns them into means.
    """
    f32 = jnp.float32
    logp, old_logp = logp.astype(f32), old_logp.astype(f32)
    adv, mask = advantages.astype(f32), mask.astype(f32)

    log_ratio = jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    pos = adv >= 0
    loss_pos = -adv * jnp.minimum(ratio, 1.0 + eps_high)
    clipped_neg = jnp.maximum(ratio, 1.0 - eps_low)
    if clip_c is not None:
        clipped_neg = jnp.minimum(clipped_neg, clip_c)
    pg = jnp.where(pos, loss_pos, jnp.abs(adv) * clipped_neg)

    weights, local_den = _agg_weights(mask, agg)
    den = local_den if denominator is None else jnp.asarray(denominator, f32)

    per_token = pg
    aux: dict[str, jax.Array] = {"pg_loss": (weights * pg).sum()}
    if ref_logp is not None:
        kl = low_var_kl(logp, ref_logp.astype(f32))
        per_token = per_token + kl_coef * kl
        aux["kl"] = (weights * kl).sum()
    numerator = (weights * per_token).sum()

    # Metrics (no gradient needed): clip activity and the old -> new policy shift.
    sg_ratio, sg_lr = jax.lax.stop_gradient(ratio), jax.lax.stop_gradient(log_ratio)
    clipped = jnp.where(pos, sg_ratio > 1.0 + eps_high, sg_ratio < 1.0 - eps_low)
    aux["clipfrac"] = (mask * clipped).sum()
    if clip_c is not None:
        aux["clipfrac_lower"] = (mask * (~pos & (sg_ratio > clip_c))).sum()
    else:
        aux["clipfrac_lower"] = jnp.zeros((), f32)
    # k3 estimator of KL(old || new) with tokens sampled from old: r - 1 - log r, r = new / old.
    aux["approx_kl"] = (mask * (jnp.exp(sg_lr) - 1.0 - sg_lr)).sum()
    if entropy is not None:
        aux["entropy"] = (mask * jax.lax.stop_gradient(entropy.astype(f32))).sum()
    aux["num_tokens"] = mask.sum()
    return numerator, den, aux


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, 0 where den == 0 (an all-padding batch), gradient-safe."""
    den = jnp.asarray(den, jnp.float32)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def reduce_aux_sums(aux_sums: dict[str, jax.Array], denominator: jax.Array) -> dict[str, jax.Array]:
    """Means from (possibly micro-batch accumulated) aux sums; drops "num_tokens"."""
    n = aux_sums["num_tokens"]
    return {
        k: _safe_div(v, denominator if k in _AGG_KEYS else n)
        for k, v in aux_sums.items()
        if k != "num_tokens"
    }


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_c: float | None = 10.0,
    agg: Agg = "token-mean",
    ref_logp: jax.Array | None = None,
    kl_coef: float = 0.0,
    entropy: jax.Array | None = None,
    denominator: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DAPO loss (scalar) and metrics. See `policy_loss_sum` for arguments.

    aux: pg_loss, clipfrac, clipfrac_lower, approx_kl (k3, token-mean), and kl / entropy when
    ref_logp / entropy are given. loss == pg_loss + kl_coef * kl. An all-padding batch gives 0.
    """
    num, den, sums = policy_loss_sum(
        logp, old_logp, advantages, mask,
        eps_low=eps_low, eps_high=eps_high, clip_c=clip_c, agg=agg,
        ref_logp=ref_logp, kl_coef=kl_coef, entropy=entropy, denominator=denominator,
    )  # fmt: skip
    return _safe_div(num, den), reduce_aux_sums(sums, den)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Per-position entropy of softmax(logits) in fp32: [..., V] -> [...].

    Tolerates -inf logits (masked vocabulary entries contribute 0).
    """
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    finite = jnp.isfinite(logp)
    safe = jnp.where(finite, logp, 0.0)
    return -jnp.sum(jnp.where(finite, jnp.exp(safe) * safe, 0.0), axis=-1)
