"""Multi-conversation rollout: B documents x G group members -> conversations and trajectories.

Step k gathers the k-th memory conversation of every trajectory whose document still has a k-th
chunk into ONE `generate_fn` call (each row is an independent context); after the last step all
final conversations go out in one more call. Prompts are assembled from token ids (question,
memory, chunk spliced into the cached template pieces); a memory reply becomes the next memory
ids directly (after the policy's strip/cap), never via decode/re-encode.

`generate_fn(prompts, *, max_new_tokens, seed, **sampling) -> SampleOutput` (docs/CONTRACTS.md);
`sampling` holds only the temperature/top_p/top_k that were set in `gen_kwargs`; `seed` is the
turn's key, `seeds.derive(gen_kwargs["seed"], turn)`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from memagent_jax.agent.memory import MemoryPolicy
from memagent_jax.agent.prompts import PromptBuilder
from memagent_jax.seeds import Seed, derive, derive_rows
from memagent_jax.types import Conversation, ConversationBatch, SampleOutput, Trajectory

GenerateFn = Callable[..., SampleOutput]
GEN_DEFAULTS: dict[str, Any] = {
    "max_memory_new_tokens": 1024,
    "max_final_new_tokens": 1024,
    "temperature": None,  # None: leave it to generate_fn's own default
    "top_p": None,
    "top_k": None,
    "seed": 0,
}


@dataclasses.dataclass
class RolloutResult:
    """Flat conversations (for the loss), per-trajectory records (for rewards) and stats."""

    conversations: list[Conversation]
    trajectories: list[Trajectory]
    stats: dict[str, Any]
    pad_id: int = 0

    def to_batch(
        self, advantages_per_trajectory: Sequence[float] | np.ndarray | None = None, pad_to_multiple: int = 1
    ) -> ConversationBatch:
        """Right-padded arrays of prompt+response rows; advantages broadcast from trajectories.

        `advantages_per_trajectory[i]` belongs to trajectory i (default: each trajectory's
        `.advantage`). The time axis is padded to a multiple of `pad_to_multiple`.
        """
        if advantages_per_trajectory is None:
            adv = np.array([t.advantage for t in self.trajectories], np.float32)
        else:
            adv = np.asarray(advantages_per_trajectory, np.float32).reshape(-1)
            if adv.shape[0] != len(self.trajectories):
                raise ValueError(f"to_batch: got {adv.shape[0]} advantages for {len(self.trajectories)} trajectories")
        n = len(self.conversations)
        longest = max((len(c.prompt) + len(c.response) for c in self.conversations), default=1)
        width = max(1, math.ceil(longest / max(1, pad_to_multiple)) * max(1, pad_to_multiple))
        tokens = np.full((n, width), self.pad_id, np.int32)
        mask = np.zeros((n, width), np.float32)
        logps = np.zeros((n, width), np.float32)
        for i, c in enumerate(self.conversations):
            p, r = len(c.prompt), len(c.response)
            tokens[i, :p], tokens[i, p : p + r] = c.prompt, c.response
            mask[i, p : p + r] = 1.0
            logps[i, p : p + r] = c.sampler_logps
        traj = np.array([c.trajectory_id for c in self.conversations], np.int32)
        return ConversationBatch(
            tokens=tokens,
            response_mask=mask,
            advantages=adv[traj][:, None] * mask,
            sampler_logps=logps,
            trajectory_ids=traj,
            group_ids=np.array([c.group_id for c in self.conversations], np.int32),
            is_final=np.array([c.is_final for c in self.conversations], bool),
        )


@dataclasses.dataclass
class _Doc:
    question_ids: list[int]
    chunks: list[list[int]]
    initial_memory: list[int]
    answers: list[str]
    num_tokens: int  # document length in tokens (before any truncation)


def _prepare(samples: Sequence[Mapping[str, Any]], policy: MemoryPolicy, builder: PromptBuilder,
             tokenizer: Any, training: bool, question_budget: int | None) -> list[_Doc]:
    """Tokenize each document once, check budgets, split into chunks."""
    docs = []
    for b, s in enumerate(samples):
        if not isinstance(s.get("question"), str) or not isinstance(s.get("context"), str):
            raise ValueError(f"sample {b}: needs string 'question' and 'context' fields, got keys {sorted(s)}")
        q_ids = tokenizer.encode(s["question"])
        if question_budget is not None and len(q_ids) > question_budget:
            raise ValueError(f"sample {b}: the question is {len(q_ids)} tokens, over question_budget="
                             f"{question_budget}; shorten it or raise question_budget")
        doc_ids = tokenizer.encode(s["context"])
        if not doc_ids:
            warnings.warn(f"sample {b}: empty document; the agent answers from the first memory "
                          "with zero memory turns", stacklevel=3)
        answers = s.get("answers", [])
        docs.append(_Doc(q_ids, policy.split(doc_ids, training=training),
                         list(policy.initial_memory(builder, doc_ids)),
                         [answers] if isinstance(answers, str) else list(answers), len(doc_ids)))
    return docs


class _Caller:
    """Runs one batched generate call and records its rows as conversations."""

    def __init__(self, generate_fn: GenerateFn, sampling: dict[str, Any]) -> None:
        self.generate_fn, self.sampling = generate_fn, sampling
        self.conversations: list[Conversation] = []
        self.rows_per_call: list[int] = []

    def __call__(self, trajs: list[Trajectory], prompts: list[list[int]], *, is_final: bool,
                 turn: int, max_new_tokens: int, seed: Seed) -> list[list[int]]:
        out = self.generate_fn(prompts, max_new_tokens=max_new_tokens, seed=seed, **self.sampling)
        if not (len(out.tokens) == len(out.logps) == len(out.finish_reasons) == len(prompts)):
            raise ValueError(f"generate_fn returned {len(out.tokens)} rows for {len(prompts)} prompts")
        self.rows_per_call.append(len(prompts))
        version = int(out.version or 0)
        for t, prompt, toks, lps, fin in zip(trajs, prompts, out.tokens, out.logps, out.finish_reasons):
            if len(lps) != len(toks):
                raise ValueError(f"generate_fn returned {len(lps)} logps for {len(toks)} tokens")
            t.conversation_ids.append(len(self.conversations))
            self.conversations.append(Conversation(
                prompt=list(prompt), response=[int(x) for x in toks], sampler_logps=[float(x) for x in lps],
                trajectory_id=t.trajectory_id, group_id=t.group_id,
                turn=t.num_chunks if is_final else turn, is_final=is_final, finish_reason=str(fin),
                policy_version=version))
        return [list(x) for x in out.tokens]


def rollout(
    samples: Sequence[Mapping[str, Any]],
    *,
    policy: MemoryPolicy,
    builder: PromptBuilder,
    tokenizer: Any,
    generate_fn: GenerateFn,
    group_size: int = 1,
    training: bool = True,
    gen_kwargs: Mapping[str, Any] | None = None,
    question_budget: int | None = 1024,
    on_step: Callable[[int, int, list[Trajectory]], None] | None = None,
    sync_steps: Callable[[int], int] | None = None,
) -> RolloutResult:
    """Run the memory agent on `samples` ({"question", "context", "answers"}) x `group_size`.

    Trajectory i = b * group_size + g reads document b. Call k (memory step k, then the final
    step) gets the key `seeds.derive(gen_kwargs["seed"], k)` (an int seed or a derived key), so the
    same seed reproduces the same rollout.
    `on_step(k, num_steps, trajectories)` runs after each memory step (progress, memory display).
    `sync_steps(local_steps) -> steps` makes processes agree on the number of memory steps (multi-
    host: every process joins every sampler call, with zero rows once its documents are done).
    """
    unknown = set(gen_kwargs or {}) - set(GEN_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown gen_kwargs {sorted(unknown)}; known: {sorted(GEN_DEFAULTS)}")
    gen = {**GEN_DEFAULTS, **(gen_kwargs or {})}
    if not samples or group_size < 1:
        raise ValueError(f"rollout needs >= 1 sample and group_size >= 1 (got {len(samples)}, {group_size})")
    docs = _prepare(samples, policy, builder, tokenizer, training, question_budget)
    trajs = [Trajectory(trajectory_id=b * group_size + g, group_id=b, conversation_ids=[],
                        num_chunks=len(d.chunks), answer_text="", ground_truths=list(d.answers))
             for b, d in enumerate(docs) for g in range(group_size)]
    memory = [list(docs[t.group_id].initial_memory) for t in trajs]
    call = _Caller(generate_fn, {k: gen[k] for k in ("temperature", "top_p", "top_k") if gen[k] is not None})
    num_steps = max(len(d.chunks) for d in docs)
    if sync_steps is not None:
        num_steps = sync_steps(num_steps)

    if getattr(generate_fn, "engine_config", None) is not None:  # multi-host too: the engine agrees per call
        return _rollout_continuous(docs, trajs, memory, num_steps, policy=policy, builder=builder,
                                   tokenizer=tokenizer, generate_fn=generate_fn, gen=gen,
                                   sampling=call.sampling, on_step=on_step)

    for k in range(num_steps):  # memory turns: every trajectory that still has a k-th chunk
        active = [t for t in trajs if k < t.num_chunks]
        prompts = [policy.turn_prompt(builder, docs[t.group_id].question_ids, memory[t.trajectory_id],
                                      docs[t.group_id].chunks[k]) for t in active]
        replies = call(active, prompts, is_final=False, turn=k,
                       max_new_tokens=gen["max_memory_new_tokens"], seed=derive(gen["seed"], k))
        for t, reply in zip(active, replies):
            memory[t.trajectory_id], capped = policy.update(memory[t.trajectory_id], reply, tokenizer)
            t.memory_capped_turns += int(capped)
            t.memories.append(tokenizer.decode(memory[t.trajectory_id]))
        if on_step is not None:
            on_step(k, num_steps, trajs)

    prompts = [policy.final_prompt(builder, docs[t.group_id].question_ids, memory[t.trajectory_id]) for t in trajs]
    replies = call(trajs, prompts, is_final=True, turn=num_steps,
                   max_new_tokens=gen["max_final_new_tokens"], seed=derive(gen["seed"], num_steps))
    for t, reply in zip(trajs, replies):
        t.answer_text = tokenizer.decode(reply)

    stats = _stats(call, trajs, docs)
    return RolloutResult(call.conversations, trajs, stats, pad_id=int(tokenizer.pad_id))


def _stats(call: _Caller, trajs: list[Trajectory], docs: list[_Doc]) -> dict[str, Any]:
    """Counts and means over one rollout."""
    convs = call.conversations

    def mean_len(cs: list[Conversation]) -> float:
        return float(np.mean([len(c.response) for c in cs])) if cs else 0.0

    mem, fin = [c for c in convs if not c.is_final], [c for c in convs if c.is_final]
    return {
        "num_calls": len(call.rows_per_call),
        "rows_per_call": list(call.rows_per_call),
        "num_conversations": len(convs),
        "num_trajectories": len(trajs),
        "memory_capped": sum(t.memory_capped_turns for t in trajs),
        "finish_length_memory": sum(c.finish_reason == "length" for c in mem),
        "finish_length_final": sum(c.finish_reason == "length" for c in fin),
        "mean_response_length": mean_len(convs),
        "mean_memory_response_length": mean_len(mem),
        "mean_final_response_length": mean_len(fin),
        "chunks_per_doc": [len(d.chunks) for d in docs],
        "doc_tokens": [d.num_tokens for d in docs],
        "empty_documents": sum(d.num_tokens == 0 for d in docs),
        "max_prompt_length": max(len(c.prompt) for c in convs),
    }


def sampler_generate_fn(model: Any, tokenizer: Any, **defaults: Any) -> GenerateFn:
    """Adapt `memagent_jax.sampler.generate` to the rollout's `generate_fn`.

    `defaults` (temperature, top_p, top_k, mesh, ...) apply to every call; keyword arguments
    given by the rollout override them. EOS ids and the vocabulary limit come from the tokenizer.
    """
    from memagent_jax import sampler  # lazy: keeps the agent importable without the model stack

    base = {"eos_ids": tuple(tokenizer.eos_ids), "vocab_limit": int(tokenizer.vocab_size), **defaults}

    def generate_fn(prompts: list[list[int]], *, max_new_tokens: int, seed: Seed, **overrides: Any) -> SampleOutput:
        kwargs = {**base, **{k: v for k, v in overrides.items() if v is not None}}
        return sampler.generate(model, prompts, max_new_tokens=max_new_tokens, seed=seed, **kwargs)

    return generate_fn


def _rollout_continuous(docs: list[_Doc], trajs: list[Trajectory], memory: list[list[int]],
                        num_steps: int, *, policy: MemoryPolicy, builder: PromptBuilder,
                        tokenizer: Any, generate_fn: Any, gen: dict[str, Any],
                        sampling: dict[str, Any], on_step: Callable[..., None] | None
                        ) -> RolloutResult:
    """The rollout on the continuous-batching engine: no barrier between turns.

    A trajectory's turn k+1 (or final) prompt is queued the moment its turn-k reply arrives.
    Each request gets the PRNG key the static path would give it (turn k's key, its row among the
    trajectories active at turn k over all processes, in process order), and conversations are
    recorded in the static order, so the result equals the static rollout's, and on several
    processes the rollout of all their documents on one process.
    """
    from memagent_jax import engine as eng  # lazy: keeps the agent importable without the model stack

    engine = generate_fn.make_engine()
    params = {**generate_fn.defaults, **sampling}
    request_kw = dict(temperature=float(params.get("temperature", 0.0)),
                      top_p=float(params.get("top_p", 1.0)), top_k=int(params.get("top_k", 0)),
                      stop_ids=tuple(generate_fn.eos_ids))
    # Row of trajectory t in the static call of turn k: its rank among those with a k-th chunk,
    # after the rows of the processes before this one (one all-gather of the per-turn counts).
    rows = [{t.trajectory_id: r for r, t in enumerate(x for x in trajs if k < x.num_chunks)}
            for k in range(num_steps)]
    first = _first_rows([len(r) for r in rows] + [len(trajs)], generate_fn.engine_config["mesh"])
    turn_keys = [derive(gen["seed"], k) for k in range(num_steps + 1)]
    # every request's key (`engine.row_key`) up front, one device call per turn: a submit while
    # the engine's next call runs must not wait on the device
    row_keys = [derive_rows(turn_keys[k], first[k] + np.arange(len(rows[k]))) for k in range(num_steps)]
    final_keys = derive_rows(turn_keys[num_steps],
                             first[num_steps] + np.arange(max((t.trajectory_id for t in trajs), default=-1) + 1))
    outputs: dict[tuple[int, int], Any] = {}  # (turn, trajectory) -> engine Result; final = num_steps
    prompts: dict[tuple[int, int], list[int]] = {}
    owner: dict[int, tuple[int, int]] = {}

    def submit(t: Trajectory, k: int) -> None:
        d = docs[t.group_id]
        if k < t.num_chunks:
            prompt = policy.turn_prompt(builder, d.question_ids, memory[t.trajectory_id], d.chunks[k])
            key = row_keys[k][rows[k][t.trajectory_id]]
            max_new = gen["max_memory_new_tokens"]
        else:
            k = num_steps
            prompt = policy.final_prompt(builder, d.question_ids, memory[t.trajectory_id])
            key = final_keys[t.trajectory_id]
            max_new = gen["max_final_new_tokens"]
        prompts[(k, t.trajectory_id)] = prompt
        owner[engine.submit(eng.Request(prompt, max_new, key, **request_kw))] = (k, t.trajectory_id)

    for t in trajs:
        submit(t, 0)
    remaining = [len(rows[k]) for k in range(num_steps)]
    next_step = 0
    for res in engine.run():
        k, i = owner.pop(res.request_id)
        outputs[(k, i)] = res
        if k == num_steps:
            continue
        t = trajs[i]
        memory[i], capped = policy.update(memory[i], res.tokens, tokenizer)
        t.memory_capped_turns += int(capped)
        t.memories.append(tokenizer.decode(memory[i]))
        submit(t, k + 1)
        remaining[k] -= 1
        while on_step is not None and next_step < num_steps and remaining[next_step] == 0:
            on_step(next_step, num_steps, trajs)
            next_step += 1

    # Record conversations in the static path's order (turn by turn, then the finals). The
    # engine keeps one set of weights for the whole rollout: one version (async RL swaps weights
    # between generation batches on this path, at turn boundaries on the static one).
    version = int(getattr(generate_fn, "version", 0) or 0)
    call = _Caller(generate_fn, sampling)
    for k in range(num_steps + 1):
        group = [t for t in trajs if k < t.num_chunks] if k < num_steps else trajs
        call.rows_per_call.append(len(group))
        for t in group:
            res = outputs[(k, t.trajectory_id)]
            t.conversation_ids.append(len(call.conversations))
            call.conversations.append(Conversation(
                prompt=list(prompts[(k, t.trajectory_id)]), response=list(res.tokens),
                sampler_logps=list(res.logps), trajectory_id=t.trajectory_id, group_id=t.group_id,
                turn=t.num_chunks if k == num_steps else k, is_final=k == num_steps,
                finish_reason=res.finish_reason, policy_version=version))
            if k == num_steps:
                t.answer_text = tokenizer.decode(res.tokens)
    stats = _stats(call, trajs, docs)
    stats["engine"] = engine.stats()
    return RolloutResult(call.conversations, trajs, stats, pad_id=int(tokenizer.pad_id))


def _first_rows(counts: list[int], mesh: Any) -> list[int]:
    """Per call, the global row of this process's first row: the rows of the processes before it
    when the engine spans several processes (`mesh`), else 0."""
    from memagent_jax.distributed import mesh_processes, process_offsets  # lazy, as the engine

    if mesh_processes(mesh)[0] == 1:
        return [0] * len(counts)
    return [int(x) for x in process_offsets(counts)]


class EngineGenerateFn:
    """A `generate_fn` whose rollout runs on the continuous-batching engine (`rollout()` detects
    it by `engine_config`; multi-host included: the engine's processes agree before every call).
    Called directly it is the static path: `static_fn` if given, else `sampler.generate` with the
    same defaults."""

    def __init__(self, model: Any, tokenizer: Any, *, slots: int = 64, max_len: int | None = None,
                 decode_steps: int = 32, prefill_chunk: int = 512, prefill_rows: int = 0,
                 refill_batch: int = 0, static_fn: GenerateFn | None = None, mesh: Any = None, **defaults: Any) -> None:
        self.model, self.defaults = model, {k: v for k, v in defaults.items() if v is not None}
        self.static_fn = static_fn
        self.eos_ids = tuple(int(e) for e in tokenizer.eos_ids)
        self.vocab_limit = int(tokenizer.vocab_size)
        self.engine_config = dict(slots=slots, max_len=max_len or model.config.max_position_embeddings,
                                  decode_steps=decode_steps, prefill_chunk=prefill_chunk,
                                  prefill_rows=prefill_rows, refill_batch=refill_batch, mesh=mesh)

    def make_engine(self) -> Any:
        from memagent_jax import engine as eng

        return eng.Engine(self.model, vocab_limit=self.vocab_limit, **self.engine_config)

    def __call__(self, prompts: list[list[int]], *, max_new_tokens: int, seed: Seed,
                 **overrides: Any) -> SampleOutput:
        if self.static_fn is not None:
            return self.static_fn(prompts, max_new_tokens=max_new_tokens, seed=seed, **overrides)
        from memagent_jax import sampler

        kwargs = {"eos_ids": self.eos_ids, "vocab_limit": self.vocab_limit,
                  "mesh": self.engine_config["mesh"], **self.defaults,
                  **{k: v for k, v in overrides.items() if v is not None}}
        return sampler.generate(self.model, prompts, max_new_tokens=max_new_tokens, seed=seed, **kwargs)


def engine_generate_fn(model: Any, tokenizer: Any, **kwargs: Any) -> EngineGenerateFn:
    """`sampler_generate_fn`'s counterpart for `rollout.engine: continuous` (see EngineGenerateFn):
    slots (per process), max_len (default: the model's window), decode_steps, prefill_chunk, mesh,
    static_fn (the direct-call path) and sampling defaults (temperature, top_p, top_k)."""
    return EngineGenerateFn(model, tokenizer, **kwargs)
