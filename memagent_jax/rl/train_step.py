"""The jitted pieces of a DAPO update: micro-batch gradients, the optimizer step, log-prob passes.

Gradient accumulation gives the EXACT mini-batch loss: each micro-batch contributes
numerator / global_denominator (the denominator of the whole mini-batch, computed on the host),
so the summed gradients equal the gradient of the token-mean over the mini-batch, never a mean
of micro-batch means. The optimizer step is jitted with explicit shardings and donates the
train state; non-finite gradients skip the update (optax.apply_if_finite).

With LoRA adapters (models/lora.py) the train state holds only the adapters and their optimizer
state; the frozen base weights travel as a separate `frozen` argument that is never
differentiated, updated or donated (None for full-parameter training).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from memagent_jax.models.sharding import constrain_params
from memagent_jax.rl.logprobs import token_logprobs
from memagent_jax.rl.loss import policy_loss_sum
from memagent_jax.rl.off_policy import correction


@flax.struct.dataclass
class TrainState:
    """Optimizer steps taken, the policy's weights (an nnx.State of Params), the optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


@flax.struct.dataclass
class LossSettings:
    """Static loss hyperparameters (hashable: part of the compiled program's identity).

    tis_cap / tis_level, mis_cap / mis_level: the off-policy correction (rl/off_policy.py);
    0 turns each off."""

    eps_low: float = flax.struct.field(pytree_node=False, default=0.2)
    eps_high: float = flax.struct.field(pytree_node=False, default=0.28)
    clip_c: float | None = flax.struct.field(pytree_node=False, default=10.0)
    agg: str = flax.struct.field(pytree_node=False, default="token-mean")
    kl_coef: float = flax.struct.field(pytree_node=False, default=0.0)
    entropy_coef: float = flax.struct.field(pytree_node=False, default=0.0)
    temperature: float = flax.struct.field(pytree_node=False, default=1.0)
    tis_cap: float = flax.struct.field(pytree_node=False, default=0.0)
    tis_level: str = flax.struct.field(pytree_node=False, default="token")
    mis_cap: float = flax.struct.field(pytree_node=False, default=0.0)
    mis_level: str = flax.struct.field(pytree_node=False, default="token")
    logprob_chunk: int = flax.struct.field(pytree_node=False, default=2048)


def make_optimizer(lr: float, warmup_steps: int, steps_per_rl_step: int, *, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01,
                   grad_clip: float = 1.0) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW with linear warm-up over `warmup_steps` RL steps, then constant;
    an update whose gradient is not finite is skipped."""

    def schedule(count: jax.Array) -> jax.Array:
        rl_step = count // steps_per_rl_step
        return lr * jnp.minimum(1.0, (rl_step + 1) / max(1, warmup_steps))

    chain = optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )
    return optax.apply_if_finite(chain, max_consecutive_errors=1_000_000)


def merge_policy(graphdef: Any, params: Any, frozen: Any = None) -> Any:
    """The NNX model from its trainable state and (with LoRA) the frozen base weights."""
    return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)


def init_train_state(model: Any, tx: optax.GradientTransformation,
                     mesh: jax.sharding.Mesh | None = None) -> tuple[Any, TrainState]:
    """(graphdef, TrainState) for a full-parameter NNX model (see `init_policy_state`)."""
    graphdef, state, frozen = init_policy_state(model, tx, mesh)
    if frozen is not None:
        raise ValueError("the model has LoRA adapters: use init_policy_state, which also returns "
                         "the frozen base weights")
    return graphdef, state


def init_policy_state(model: Any, tx: optax.GradientTransformation,
                      mesh: jax.sharding.Mesh | None = None) -> tuple[Any, TrainState, Any]:
    """(graphdef, TrainState, frozen) for an NNX model: the state holds the trainable weights
    (all of them, or only the LoRA adapters) and their optimizer state; `frozen` the base
    weights under adapters (None without). Optimizer moments inherit the weights' shardings and,
    with a mesh, scalars (step, counts) are replicated over it."""
    from memagent_jax.models.lora import split_trainable

    graphdef, params, frozen = split_trainable(model)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

        def on_mesh(x: jax.Array) -> jax.Array:
            sharding = getattr(x, "sharding", None)
            if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh:
                return x
            return jax.device_put(x, replicated)

        state = jax.tree.map(on_mesh, state)
    return graphdef, state, frozen


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "chunk"))
def sequence_logprobs(graphdef: Any, params: Any, tokens: jax.Array, *, temperature: float,
                      chunk: int, frozen: Any = None) -> jax.Array:
    """Per-token log-probs [N, T] under `params` (no gradient): old and reference passes."""
    logp, _ = token_logprobs(merge_policy(graphdef, params, frozen), tokens,
                             temperature=temperature, chunk=chunk)
    return logp


#: async RL's version-lag buckets of rollout_logprob_abs_diff: 0, 1, 2, >= 3 updates old
LAG_BUCKETS = 4


def _loss(params: Any, graphdef: Any, batch: dict[str, jax.Array], denominator: jax.Array,
          s: LossSettings, frozen: Any = None, dropout_rng: jax.Array | None = None
          ) -> tuple[jax.Array, dict[str, jax.Array]]:
    model = merge_policy(graphdef, params, frozen)
    logp, entropy = token_logprobs(model, batch["tokens"], temperature=s.temperature,
                                   chunk=s.logprob_chunk, with_entropy=True, dropout_rng=dropout_rng)
    mask = batch["mask"]
    # On-policy shortcut: without recomputed old log-probs the ratio is exactly 1.
    old = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
    adv = batch["advantages"]
    ref_logp, entropy_mask = batch.get("ref_logp"), mask
    # Sampler-vs-trainer mismatch (rl/off_policy.py): TIS weights the advantages; MIS-masked
    # tokens lose their policy, KL and entropy terms but stay in the (host-side) denominator.
    weight, keep, corr = correction(old, batch["sampler_logp"], mask, tis_cap=s.tis_cap,
                                    tis_level=s.tis_level, mis_cap=s.mis_cap,
                                    mis_level=s.mis_level)
    if s.tis_cap > 0:
        adv = adv * weight
    if s.mis_cap > 0:
        adv = adv * keep
        if ref_logp is not None:  # a masked token's KL is exactly 0 (k = 0) with no gradient
            ref_logp = jnp.where(keep > 0, ref_logp, jax.lax.stop_gradient(logp))
        entropy_mask = mask * keep
    num, _, aux = policy_loss_sum(
        logp, old, adv, mask, eps_low=s.eps_low, eps_high=s.eps_high, clip_c=s.clip_c,
        agg=s.agg, ref_logp=ref_logp, kl_coef=s.kl_coef, entropy=entropy,
        denominator=denominator,
    )
    loss = num / denominator
    if s.entropy_coef:
        loss = loss - s.entropy_coef * (entropy_mask * entropy).sum() / denominator
    # "logp_gap": sum of mask |old - sampler| (the trainer's actor/logp_gap, a token mean)
    aux["logp_gap"] = corr["logprob_abs_diff"]
    aux["mis_masked"], aux["tis_clipped"] = corr["mis_masked"], corr["tis_clipped"]
    if "lag" in batch:  # async RL: |old - sampler| per version lag of the sampled token
        gap = mask * jnp.abs(jax.lax.stop_gradient(old) - batch["sampler_logp"])
        for j in range(LAG_BUCKETS):
            at = (batch["lag"] == j) if j < LAG_BUCKETS - 1 else (batch["lag"] >= j)
            aux[f"lag_gap_{j}"], aux[f"lag_tokens_{j}"] = (gap * at).sum(), (mask * at).sum()
    return loss, aux


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"))
def micro_batch_grads(graphdef: Any, params: Any, batch: dict[str, jax.Array],
                      denominator: jax.Array, settings: LossSettings, frozen: Any = None,
                      dropout_rng: jax.Array | None = None) -> tuple[Any, dict[str, jax.Array]]:
    """Gradient of numerator / global denominator for one micro-batch (with respect to `params`
    only: with LoRA, the adapters), and its metric sums. `dropout_rng`: the key of the LoRA
    adapters' dropout in this forward (None when model.lora.dropout is 0)."""
    grads, aux = jax.grad(_loss, has_aux=True)(params, graphdef, batch, denominator, settings,
                                               frozen, dropout_rng)
    return constrain_params(grads, merge_policy(graphdef, params, frozen).config), aux


@functools.partial(jax.jit, donate_argnums=(0,))
def accumulate(acc: Any, grads: Any) -> Any:
    """acc + grads, in place (the accumulator is donated)."""
    return jax.tree.map(jnp.add, acc, grads)


def make_apply_update(tx: optax.GradientTransformation, state_shardings: Any = None) -> Any:
    """A jitted (state, grads) -> (state, grad_norm, skipped) that donates the train state."""

    def apply(state: TrainState, grads: Any) -> tuple[TrainState, jax.Array, jax.Array]:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = opt_state.last_finite
        return (TrainState(step=state.step + 1, params=params, opt_state=opt_state),
                optax.tree.norm(grads), ~finite)

    kwargs: dict[str, Any] = {"donate_argnums": (0,)}
    if state_shardings is not None:
        kwargs["out_shardings"] = (state_shardings, None, None)
    return jax.jit(apply, **kwargs)
