"""Per-token log-probs (and entropies) from the training forward, chunked over the sequence.

The [B, T, V] fp32 logits never exist at once: hidden states are computed for the whole
sequence, then the LM head runs over slices of positions holding about `chunk` TOKENS per device
(rows on this device x positions; `rl.logprob_chunk`), so a micro-batch of many short rows gets
as small a logits slice as one long row (a chunk counted in positions made a 64-row x 256-position
micro-batch of Qwen2.5-7B hold 4.6 GiB of fp32 logits per buffer on v5p). Each slice is one fused
function with its own backward (`_head`): the forward keeps only each position's log-sum-exp
and entropy; the backward recomputes the slice's logits once and forms d loss / d logits in
closed form (softmax minus one-hot for the log-prob, -p (log p + H) for the entropy), so no
[chunk, V] array is stored between the passes and no scatter of the gathered target is needed
(autodiff of log_softmax + take_along_axis under jax.checkpoint was 25% slower on XLA:CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memagent_jax.models.sharding import batch_shards
from memagent_jax.models.transformer import Decoder


def _head_logits(h: jax.Array, w: jax.Array, temperature: float) -> jax.Array:
    """fp32 logits / temperature of hidden states h [..., D] under the head w [D, V]."""
    logits = jnp.einsum("...d,dv->...v", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    return logits / temperature


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head(h: jax.Array, w: jax.Array, targets: jax.Array, temperature: float
          ) -> tuple[jax.Array, jax.Array]:
    """(log p(targets), entropy) of softmax(h @ w / temperature), both fp32 [...]."""
    return _head_fwd(h, w, targets, temperature)[0]


def _head_fwd(h: jax.Array, w: jax.Array, targets: jax.Array, temperature: float) -> tuple:
    z = _head_logits(h, w, temperature)
    lse = jax.nn.logsumexp(z, axis=-1)
    lp = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0] - lse
    ent = lse - jnp.sum(jnp.exp(z - lse[..., None]) * z, axis=-1)
    return (lp, ent), (h, w, targets, lse, ent)


def _head_bwd(temperature: float, res: tuple, grads: tuple[jax.Array, jax.Array]) -> tuple:
    h, w, targets, lse, ent = res
    d_lp, d_ent = grads
    logp = _head_logits(h, w, temperature) - lse[..., None]
    p = jnp.exp(logp)
    onehot = jnp.arange(w.shape[-1], dtype=targets.dtype) == targets[..., None]
    # d lp / dz = onehot - p;  d H / dz = -p (log p + H);  z = logits / temperature
    dz = (d_lp[..., None] * (onehot - p) - d_ent[..., None] * p * (logp + ent[..., None]))
    dz = (dz / temperature).astype(h.dtype)
    dh = jnp.einsum("...v,dv->...d", dz, w.astype(h.dtype), preferred_element_type=jnp.float32)
    dw = jnp.einsum("...d,...v->dv", h, dz, preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dw.astype(w.dtype), None


_head.defvjp(_head_fwd, _head_bwd)
_head_jit = jax.jit(_head, static_argnums=3)  # one compiled program for eager callers too


def token_logprobs(
    model: Decoder,
    tokens: jax.Array,
    *,
    temperature: float = 1.0,
    chunk: int = 256,
    with_entropy: bool = False,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """logp[b, t] = log softmax(logits[b, t-1] / T)[tokens[b, t]] for t >= 1; logp[:, 0] = 0.

    Returns (logp [B, T] fp32, entropy [B, T] fp32 or None). Entropy is of the same tempered
    distribution, at the position predicting token t. `chunk`: tokens per device per slice of
    the LM head (positions = chunk // rows on one device, at least 1). `dropout_rng`: a training
    forward's key for the LoRA adapters' dropout (None: no dropout).
    """
    B, T = tokens.shape
    hidden, _ = model.hidden_states(tokens, dropout_rng=dropout_rng)
    hidden = hidden[:, :-1]  # position t-1 predicts token t
    targets = tokens[:, 1:]
    n = T - 1
    chunk = max(1, min(chunk // max(1, B // batch_shards(B)), n))  # tokens -> positions
    pad = (-n) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    steps = hidden.shape[1] // chunk
    hs = hidden.reshape(B, steps, chunk, -1).swapaxes(0, 1)
    ts = targets.reshape(B, steps, chunk).swapaxes(0, 1)
    w = model.output_weight()
    temperature = float(temperature)
    if steps == 1:
        lp, ent = _head_jit(hs[0], w, ts[0], temperature)
        lp, ent = lp[None], ent[None]
    else:
        lp, ent = jax.lax.map(lambda x: _head_jit(x[0], w, x[1], temperature), (hs, ts))
    lp = lp.swapaxes(0, 1).reshape(B, -1)[:, :n]
    ent = ent.swapaxes(0, 1).reshape(B, -1)[:, :n]
    zero = jnp.zeros((B, 1), jnp.float32)
    logp = jnp.concatenate([zero, lp], axis=1)
    entropy = jnp.concatenate([zero, ent], axis=1) if with_entropy else None
    return logp, entropy
