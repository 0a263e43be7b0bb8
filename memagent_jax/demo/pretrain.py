"""The demo's base model: in-context lookup, learned before the memory workflow.

MemAgent starts from an instruct LLM that can already read a context and copy from it; RL then
teaches it what to keep. The tiny default's analog is this stage: a random-init decoder is
trained on multi-query associative recall over whole documents, in the final-answer format of
the agent (the document in the memory slot, as the `full_context` baseline reads it):

    <final prompt: memory = the whole document, problem = question 1>  " school7 \\boxed{7}" EOS
    "\\nProblem: <question 2>\\nAnswer ...:"                            " tell3 \\boxed{3}" EOS
    ...

Every needle of a document is asked (in random order), plus, with probability `absent_share`,
keys the document does not hold (answer "none \\boxed{none}"); only the answers are trained.
Documents have 1 to `max_chunks` chunks of the task's chunk size and 1 to 4 needles. The result
is both the starting point of the warm start and the full-context baseline of the evaluation.

The stage runs in two phases. First `copy_corpus`: random token spans repeated 2-3 times (loss
on the repeats) and nothing else, until induction heads form ("after X comes what came after X
before", ~500 steps), the mechanism the lookup answers need. Then the lookup sequences above,
mixed with a `copy_share` of more spans. Mixed from the start, the spans' loss never fell and the
lookup stayed at chance for thousands of steps in our trials; after the copying phase the lookup
is learned within a few hundred steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from memagent_jax.agent.prompts import PromptBuilder
from memagent_jax.demo import task as T
from memagent_jax.rl.sft import MaskedSequence


def followup_ids(builder: PromptBuilder, question_ids: Sequence[int]) -> list[int]:
    """The final template's part after its memory slot, for another question: the tokens that
    ask a follow-up question about the same document."""
    tmpl = builder.final_template
    at = tmpl.slots.index("memory")
    out = list(tmpl.pieces[at + 1])
    for slot, piece in zip(tmpl.slots[at + 1:], tmpl.pieces[at + 2:]):
        if slot == "memory":
            raise ValueError("the final template names {memory} twice; follow-up questions need one")
        out += list(question_ids) + list(piece)
    return out


def lookup_sequence(sample: dict[str, Any], keys: Sequence[str], builder: PromptBuilder, tokenizer: Any,
                    rng: np.random.Generator, absent_share: float = 0.25, max_queries: int = 0) -> MaskedSequence:
    """One multi-query sequence over `sample`'s document (see the module docstring); at most
    `max_queries` questions (0 = all; 1 = one question, about an absent key with probability
    `absent_share`)."""
    doc = tokenizer.encode(sample["context"])
    values = dict((k, v) for k, v in sample["needles"])
    asked = [k for k, _ in sample["needles"]]
    rng.shuffle(asked)
    absent = [k for k in keys if k not in values]
    if max_queries == 1:
        asked = [absent[int(rng.integers(len(absent)))] if absent and rng.random() < absent_share else asked[0]]
    for k in absent if max_queries != 1 else []:  # absent keys go after the first question
        if rng.random() < absent_share:
            asked.insert(int(rng.integers(1, len(asked) + 1)), k)
    if max_queries:
        asked = asked[:max_queries]
    eos = [int(tokenizer.eos_id)]
    tokens: list[int] = []
    mask: list[float] = []
    for i, key in enumerate(asked):
        q = tokenizer.encode(T.question_text(key))
        prompt = builder.final_prompt(q, doc) if i == 0 else followup_ids(builder, q)
        reply = tokenizer.encode(T.answer_text(T.note_text(key, values.get(key)))) + eos
        tokens += prompt + reply
        mask += [0.0] * len(prompt) + [1.0] * len(reply)
    return MaskedSequence(tokens, mask)


def lookup_corpus(tokenizer: Any, builder: PromptBuilder, *, num_docs: int, chunk_size: int, max_chunks: int,
                  num_keys: int, seed: int, absent_share: float = 0.25, max_decoys: int = 0,
                  copy_share: float = 0.0, max_queries: int = 0, progress: Any = None) -> list[MaskedSequence]:
    """`num_docs` lookup sequences over fresh documents of 1..max_chunks chunks, plus
    `copy_share * num_docs` repeated-span sequences, shuffled together."""
    rng = np.random.default_rng([seed, 7])
    keys = T.task_keys(tokenizer, num_keys)
    out = []
    lengths = rng.integers(1, max_chunks + 1, size=num_docs)
    for n in sorted(set(lengths.tolist())):
        count = int((lengths == n).sum())
        spec = T.NeedleSpec(chunk_size=chunk_size, num_chunks=n, min_distractors=0,
                            max_distractors=min(3, num_keys - 1, 2 * n - 1), num_keys=num_keys, name="pretrain",
                            max_decoys=max_decoys)
        for s in T.generate(spec, tokenizer, count, seed=seed, progress=progress):
            out.append(lookup_sequence(s, keys, builder, tokenizer, rng, absent_share, max_queries))
    ordinary = ordinary_ids(tokenizer)
    out += [repeated_span(ordinary, rng) for _ in range(int(round(copy_share * num_docs)))]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def ordinary_ids(tokenizer: Any) -> np.ndarray:
    """Token ids other than pad and EOS."""
    special = {int(tokenizer.pad_id), int(tokenizer.eos_id), *map(int, tokenizer.eos_ids)}
    return np.array([i for i in range(tokenizer.vocab_size) if i not in special])


def copy_corpus(tokenizer: Any, count: int, seed: int) -> list[MaskedSequence]:
    """`count` repeated random spans (`repeated_span`): the copying phase that comes first. Mixed
    with lookup sequences from the start, the span loss stayed flat (no induction heads) for
    4,400 steps in our trials; alone, it fell from 6.9 to 0.2 within 1,000 steps, and the model
    then picked the asked needle's digit by induction (0.75 vs 0.5 chance, teacher-forced)."""
    rng = np.random.default_rng([seed, 11])
    ordinary = ordinary_ids(tokenizer)
    return [repeated_span(ordinary, rng) for _ in range(count)]


def repeated_span(ordinary: np.ndarray, rng: np.random.Generator, min_len: int = 8, max_len: int = 40
                  ) -> MaskedSequence:
    """Random tokens drawn from `ordinary` (ids without pad/EOS), repeated 2-3 times; the repeats
    are trained (induction)."""
    n = int(rng.integers(min_len, max_len + 1))
    span = ordinary[rng.integers(0, len(ordinary), size=n)].tolist()
    reps = int(rng.integers(2, 4))
    return MaskedSequence(span * reps, [0.0] * n + [1.0] * n * (reps - 1))
