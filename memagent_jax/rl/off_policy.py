"""Off-policy correction: the sampler-vs-trainer log-prob mismatch, corrected in the loss.

The rollout samples with one program (the engine, maybe merged LoRA weights, maybe older weights)
and reports `sampler_logp` for every sampled token; the trainer recomputes `old_logp` with the
training forward (or, in the on-policy shortcut, uses its own log-prob). The ratio
rho = exp(old_logp - sampler_logp) measures how far apart the two are; it is 1 when they agree.
Two corrections act on it, each at token or sequence level:

* truncated importance sampling (TIS, `tis_cap` C > 0): the advantage of a token is multiplied
  by w = min(rho, C);
* masked importance sampling (MIS, "rejection", `mis_cap` c > 1): a token whose rho lies outside
  [1/c, c] is masked out of the loss (contributes zero loss and zero gradient).

Level "token" uses each token's own rho_t. Level "sequence" uses one ratio per row,
exp(sum_t m_t (old_t - sampler_t)) over the row's response tokens, and applies the row's weight
(TIS) or decision (MIS) to all of its tokens. A row is one conversation: one memory turn or the
final answer of a trajectory, never a whole trajectory.

Masked tokens stay in the aggregation denominator: the mini-batch's normalisation is computed on
the host before the loss (rl/batching.global_denominator) and must not depend on the correction,
so masking down-weights a mini-batch rather than re-normalising over the kept tokens (and a row of
seq-mean-token-mean keeps its full token count). Both corrections may be on together: TIS then
weights the kept tokens. 0 turns each off; with both off the loss is exactly the uncorrected one.

Tokens outside the response mask (prompts, padding columns, padding rows) are untouched: weight 1,
kept. All functions are pure and jittable; caps and levels are Python values (static under jit).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

Level = Literal["token", "sequence"]
LEVELS: tuple[str, ...] = ("token", "sequence")

#: Sequence log-ratios are clamped to [-20, 20] before exp (as the loss clamps its log-ratio), so
#: a long reply's summed mismatch never overflows; exp(20) ~ 4.9e8 is above any sensible cap.
SEQ_LOG_RATIO_CLAMP = 20.0

#: The aux sums `correction` returns: masked token sums, normalised by the token count like the
#: loss's other token metrics (loss.reduce_aux_sums).
AUX_KEYS: tuple[str, ...] = ("mis_masked", "tis_clipped", "logprob_abs_diff")


def _check(tis_cap: float, tis_level: str, mis_cap: float, mis_level: str) -> None:
    if tis_level not in LEVELS or mis_level not in LEVELS:
        raise ValueError(f"off-policy correction levels tis_level={tis_level!r}, "
                         f"mis_level={mis_level!r}: each must be one of {LEVELS}")
    if tis_cap < 0:
        raise ValueError(f"tis_cap={tis_cap}: the truncation cap must be > 0 (0 = off)")
    if mis_cap != 0 and mis_cap <= 1:
        raise ValueError(f"mis_cap={mis_cap}: the rejection bound c must be > 1 (tokens outside "
                         "[1/c, c] are masked; 0 = off)")


def log_ratios(old_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, level: Level
               ) -> jax.Array:
    """log(rho) per token [B, T]: old_logp - sampler_logp ("token"), or each row's masked sum of
    it broadcast to the row's tokens ("sequence"). 0 outside the mask (rho = 1 there)."""
    f32 = jnp.float32
    on = mask.astype(f32) > 0
    diff = jnp.where(on, old_logp.astype(f32) - sampler_logp.astype(f32), 0.0)
    if level == "token":
        return diff
    if level == "sequence":
        row = diff.sum(axis=-1, keepdims=True)
        return jnp.where(on, jnp.broadcast_to(row, diff.shape), 0.0)
    raise ValueError(f"unknown off-policy correction level {level!r}; expected one of {LEVELS}")


def _ratio(old_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, level: Level
           ) -> jax.Array:
    """rho per token [B, T] (1 outside the mask); the sequence log-ratio clamped before exp."""
    lr = log_ratios(old_logp, sampler_logp, mask, level)
    if level == "sequence":
        lr = jnp.clip(lr, -SEQ_LOG_RATIO_CLAMP, SEQ_LOG_RATIO_CLAMP)
    return jnp.exp(lr)


def tis_weights(old_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, *, cap: float,
                level: Level = "token") -> jax.Array:
    """Truncated importance weights [B, T]: min(rho, cap) on response tokens, 1 elsewhere.

    Token level: rho_t = exp(old_t - sampler_t) (min(inf, cap) = cap, so no clamp is needed and
    the weights equal the loss's historical min(exp(old - sampler), cap) on response tokens).
    Sequence level: rho = exp(clip(sum_t m_t (old_t - sampler_t), -20, 20)), one per row."""
    w = jnp.minimum(_ratio(old_logp, sampler_logp, mask, level), cap)
    return jnp.where(mask > 0, w, 1.0)


def mis_keep(old_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, *, cap: float,
             level: Level = "token") -> jax.Array:
    """Masked importance sampling: 1.0 where a token is kept, 0.0 where rho lies outside
    [1/cap, cap] (compared in log space: |log rho| <= log cap, nothing overflows). Tokens outside
    the mask are kept. Sequence level rejects a whole row by its summed log-ratio."""
    lr = log_ratios(old_logp, sampler_logp, mask, level)
    bound = math.log(cap)
    inside = (lr >= -bound) & (lr <= bound)
    return jnp.where((mask > 0) & ~inside, 0.0, 1.0).astype(jnp.float32)


def correction(old_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, *,
               tis_cap: float = 0.0, tis_level: Level = "token", mis_cap: float = 0.0,
               mis_level: Level = "token") -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The sampler-vs-trainer correction of one batch: (adv_weight, keep, aux_sums).

    old_logp: the trainer's log-probs of the sampled tokens [B, T] (not differentiated: pass
    stop_gradient of the current log-probs in the on-policy shortcut); sampler_logp: the
    sampler's [B, T]; mask: the response mask [B, T].

    adv_weight [B, T]: TIS weights min(rho, tis_cap) (ones when tis_cap == 0), to multiply the
    advantages with. keep [B, T]: 1.0 for tokens in the loss, 0.0 for tokens MIS masked out
    (ones when mis_cap == 0); a masked token must contribute zero loss but stay in the
    aggregation denominator (see the module docstring). Outside the mask both are 1.

    aux_sums (masked token sums): "mis_masked" tokens masked by MIS; "tis_clipped" kept tokens
    whose TIS weight was truncated (rho > tis_cap); "logprob_abs_diff" sum of m |old - sampler|.
    """
    _check(tis_cap, tis_level, mis_cap, mis_level)
    f32 = jnp.float32
    old_logp = jax.lax.stop_gradient(old_logp).astype(f32)
    sampler_logp, m = sampler_logp.astype(f32), mask.astype(f32)
    ones = jnp.ones(m.shape, f32)
    keep = (ones if mis_cap == 0
            else mis_keep(old_logp, sampler_logp, m, cap=mis_cap, level=mis_level))
    if tis_cap == 0:
        weight, clipped = ones, jnp.zeros((), f32)
    else:
        weight = tis_weights(old_logp, sampler_logp, m, cap=tis_cap, level=tis_level)
        clipped = (m * keep * (_ratio(old_logp, sampler_logp, m, tis_level) > tis_cap)).sum()
    diff = jnp.where(m > 0, old_logp - sampler_logp, 0.0)
    aux = {"mis_masked": (m * (1.0 - keep)).sum(), "tis_clipped": clipped,
           "logprob_abs_diff": (m * jnp.abs(diff)).sum()}
    return weight, keep, aux
