"""Supervised warm start: teacher transcripts of the memory workflow, cross-entropy on responses.

`teacher_transcripts` walks each sample through EXACTLY the prompts the RL rollout builds
(same tokenization, `policy.split(training=True)`, `policy.turn_prompt`, `policy.update`,
`policy.final_prompt`), with a `Teacher` writing the replies instead of the model. `train_sft`
then minimizes the token-mean negative log-likelihood of the reply tokens (EOS included; prompt
tokens are never trained) with AdamW, one jitted step per batch of conversations. Log-probs come
from `rl.logprobs.token_logprobs`, the forward the RL trainer and the sampler share; batches are
padded to the sampler's length buckets and power-of-two row counts, so few programs compile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memagent_jax.agent.memory import MemoryPolicy
from memagent_jax.agent.prompts import PromptBuilder
from memagent_jax.rl.logprobs import token_logprobs
from memagent_jax.rl.train_step import TrainState, init_policy_state, merge_policy
from memagent_jax.seeds import derive

Example = tuple[list[int], list[int]]  # (prompt ids, response ids incl. EOS), or a TeacherTurn


class MaskedSequence(NamedTuple):
    """A training sequence whose trained tokens are given by a 0/1 mask (e.g. several answers
    in one sequence); `train_sft` accepts these beside (prompt, response) examples."""

    tokens: list[int]
    mask: list[float]


class TeacherTurn(NamedTuple):
    """One teacher-written conversation; `kind` is "keep" (the memory reply repeats the memory),
    "write" (it changes the memory) or "final"."""

    prompt: list[int]
    response: list[int]
    kind: str


class Teacher(Protocol):
    """Writes the replies of a teacher transcript (text; the EOS is appended by the caller)."""

    def memory_reply(self, sample: Mapping[str, Any], chunk_text: str, memory_text: str) -> str: ...

    def final_reply(self, sample: Mapping[str, Any], memory_text: str) -> str: ...


def teacher_transcripts(samples: Sequence[Mapping[str, Any]], *, policy: MemoryPolicy,
                        builder: PromptBuilder, tokenizer: Any, teacher: Teacher,
                        training: bool = True) -> list[TeacherTurn]:
    """Every conversation (memory turns, then the final turn) of every sample, teacher-written."""
    out: list[TeacherTurn] = []
    eos = [int(tokenizer.eos_id)]
    for s in samples:
        q_ids = tokenizer.encode(s["question"])
        doc_ids = tokenizer.encode(s["context"])
        memory = list(policy.initial_memory(builder, doc_ids))
        for chunk in policy.split(doc_ids, training=training):
            prompt = policy.turn_prompt(builder, q_ids, memory, chunk)
            reply = tokenizer.encode(teacher.memory_reply(s, tokenizer.decode(chunk),
                                                          tokenizer.decode(memory))) + eos
            new_memory, _ = policy.update(memory, reply, tokenizer)
            out.append(TeacherTurn(list(prompt), reply, "keep" if new_memory == memory else "write"))
            memory = new_memory
        prompt = policy.final_prompt(builder, q_ids, memory)
        reply = tokenizer.encode(teacher.final_reply(s, tokenizer.decode(memory))) + eos
        out.append(TeacherTurn(list(prompt), reply, "final"))
    return out


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    """Optimizer and batching of the warm start."""

    steps: int = 200
    batch_size: int = 32  # conversations per step
    lr: float = 3e-3
    warmup_steps: int = 20
    final_lr_fraction: float = 0.1  # cosine decay to lr * this
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    logprob_chunk: int = 2048  # tokens per device per LM-head slice (rows x positions)
    pad_multiple: int = 32  # batches are padded to a multiple of this length (few programs compile)


def _schedule(s: SFTSettings) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=s.lr, warmup_steps=max(1, min(s.warmup_steps, s.steps - 1)),
        decay_steps=max(2, s.steps), end_value=s.lr * s.final_lr_fraction)


def make_sft_optimizer(s: SFTSettings) -> optax.GradientTransformation:
    """clip -> AdamW with linear warm-up and cosine decay over `s.steps`."""
    return optax.chain(optax.clip_by_global_norm(s.grad_clip),
                       optax.adamw(_schedule(s), weight_decay=s.weight_decay))


def _tokens_and_mask(ex: Example | MaskedSequence) -> tuple[list[int], list[float]]:
    if isinstance(ex, MaskedSequence):
        return list(ex.tokens), list(ex.mask)
    return list(ex[0]) + list(ex[1]), [0.0] * len(ex[0]) + [1.0] * len(ex[1])


def pad_batch(examples: Sequence[Example | MaskedSequence], rows: int, pad_id: int = 0,
              multiple: int = 32) -> dict[str, np.ndarray]:
    """tokens [rows, W] (prompt + response, or a MaskedSequence's tokens, right-padded to a
    multiple of `multiple`) and the trained-token mask; rows beyond len(examples) are all
    padding (mask 0)."""
    pairs = [_tokens_and_mask(ex) for ex in examples]
    width = -(-max(len(t) for t, _ in pairs) // multiple) * multiple
    tokens = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), np.float32)
    for i, (t, m) in enumerate(pairs):
        tokens[i, :len(t)], mask[i, :len(m)] = t, m
    return {"tokens": tokens, "mask": mask}


@functools.partial(jax.jit, static_argnames=("graphdef", "tx", "chunk"), donate_argnums=(1,))
def sft_step(graphdef: Any, state: TrainState, tokens: jax.Array, mask: jax.Array, *,
             tx: optax.GradientTransformation, chunk: int, frozen: Any = None,
             dropout_rng: jax.Array | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step on the token-mean NLL of the masked (response) tokens; with LoRA the state
    holds the adapters, `frozen` the base weights (not differentiated) and `dropout_rng` the
    key of the adapters' dropout (None: none)."""

    def loss_fn(params: Any) -> tuple[jax.Array, jax.Array]:
        logp, _ = token_logprobs(merge_policy(graphdef, params, frozen), tokens, chunk=chunk,
                                 dropout_rng=dropout_rng)
        n = jnp.maximum(mask.sum(), 1.0)
        return -(logp * mask).sum() / n, (jnp.exp(logp) * mask).sum() / n

    (loss, mean_p), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "mean_token_prob": mean_p, "grad_norm": optax.tree.norm(grads)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def train_sft(model: Any, examples: Sequence[Example | MaskedSequence], settings: SFTSettings, *, pad_id: int = 0,
              weights: Sequence[float] | None = None,
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> tuple[Any, list[dict]]:
    """Trains `model` (an NNX decoder) on `examples`; returns (trained model, per-step metrics).

    A model with LoRA adapters (models/lora.py: add_lora) trains its adapters only; the
    returned model is the frozen base with the trained adapters (`lora.merged` folds them in).

    Without `weights` each epoch visits the examples in a fresh random order (seeded); with them,
    each batch draws examples with probability proportional to their weight (with replacement).
    `on_step(step, metrics)` runs after every step (progress bars, logging).
    """
    if not examples:
        raise ValueError("train_sft got no examples: build them with teacher_transcripts")
    if settings.steps < 1 or settings.batch_size < 1:
        raise ValueError(f"train_sft: steps and batch_size must be >= 1 ({settings})")
    tx = make_sft_optimizer(settings)
    graphdef, state, frozen = init_policy_state(model, tx)
    rng = np.random.default_rng(settings.seed)
    rows = 1 << max(0, math.ceil(math.log2(settings.batch_size)))
    order: list[int] = []
    history = []
    probs = None
    if weights is not None:
        probs = np.asarray(weights, np.float64)
        if probs.shape != (len(examples),) or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"train_sft: weights must be {len(examples)} non-negative numbers, not all 0")
        probs = probs / probs.sum()
    schedule = _schedule(settings)
    lora = getattr(model.config, "lora", None)
    dropping = lora is not None and lora.dropout > 0  # the adapters' dropout: a stream per step
    for step in range(settings.steps):
        if probs is not None:
            picked = rng.choice(len(examples), size=settings.batch_size, p=probs).tolist()
        else:
            if len(order) < settings.batch_size:
                order += rng.permutation(len(examples)).tolist()
            picked, order = order[:settings.batch_size], order[settings.batch_size:]
        batch = pad_batch([examples[i] for i in picked], rows, pad_id, settings.pad_multiple)
        state, m = sft_step(graphdef, state, jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]),
                            tx=tx, chunk=settings.logprob_chunk, frozen=frozen,
                            dropout_rng=derive(settings.seed, step, 8) if dropping else None)
        metrics = {k: float(v) for k, v in jax.device_get(m).items()}
        metrics["lr"] = float(schedule(step))
        history.append({"step": step + 1, **metrics})
        if on_step is not None:
            on_step(step + 1, metrics)
    return merge_policy(graphdef, state.params, frozen), history
