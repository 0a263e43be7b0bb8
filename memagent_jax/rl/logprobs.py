"""Per-token log-probs (and entropies) from the training forward, chunked over the sequence.

The [B, T, V] fp32 logits never exist at once: hidden states are computed for the whole
sequence, then logits -> log-softmax -> gather run over slices of `chunk` positions (each slice
under `jax.checkpoint`, so the backward pass recomputes its logits instead of storing them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memagent_jax.models.transformer import Decoder


def token_logprobs(
    model: Decoder,
    tokens: jax.Array,
    *,
    temperature: float = 1.0,
    chunk: int = 256,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """logp[b, t] = log softmax(logits[b, t-1] / T)[tokens[b, t]] for t >= 1; logp[:, 0] = 0.

    Returns (logp [B, T] fp32, entropy [B, T] fp32 or None). Entropy is of the same tempered
    distribution, at the position predicting token t.
    """
    B, T = tokens.shape
    hidden, _ = model.hidden_states(tokens)
    hidden = hidden[:, :-1]  # position t-1 predicts token t
    targets = tokens[:, 1:]
    n = T - 1
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    steps = hidden.shape[1] // chunk
    hs = hidden.reshape(B, steps, chunk, -1).swapaxes(0, 1)
    ts = targets.reshape(B, steps, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(h: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = model.logits(h) / temperature
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        lp = jnp.take_along_axis(logp_all, t[..., None], axis=-1)[..., 0]
        ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1) if with_entropy else jnp.zeros_like(lp)
        return lp, ent

    lp, ent = jax.lax.map(lambda x: one(*x), (hs, ts))
    lp = lp.swapaxes(0, 1).reshape(B, -1)[:, :n]
    ent = ent.swapaxes(0, 1).reshape(B, -1)[:, :n]
    zero = jnp.zeros((B, 1), jnp.float32)
    logp = jnp.concatenate([zero, lp], axis=1)
    entropy = jnp.concatenate([zero, ent], axis=1) if with_entropy else None
    return logp, entropy
