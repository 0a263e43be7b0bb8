"""The second demo task: one key with several values, so the memory must keep what it has noted.

RULER's multi-value needle in miniature, in the first task's haystack and wording (demo/task.py):
the question's key has `min_values`-`max_values` needles "The secret code is <key><digit>.", each
in a different chunk (distinct digits), beside distractor needles with other keys and, in
training documents, plain-word mentions of keys. The question asks for all of them ("What are all
the secret codes for idea?"); the answer is the digits in document order ("735"), boxed. The
reward is the training verifier (exact match of the boxed answer: the whole set, in order);
`digit_f1` scores partial answers beside it.

A memory is a list of notes, one per value noted, key first (" idea7 idea3"; "none" before the
first). Keeping them across chunks is the point: a reader that overwrites its note with the
latest matching needle (the first demo's habit) ends with one value. `MultiValueTeacher` writes
the warm start's transcripts: a `careless` share of documents overwrite, the rest accumulate.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from memagent_jax.data.ruler_haystack import DEFAULT_ESSAYS_DIR, Encoder
from memagent_jax.demo.task import (
    NOTHING, VALUES, NeedleSpec, _TokenCounter, needle_text, needles_in, place_needles, task_keys,
)

QUESTION = "What are all the secret codes for {key}?"
_NOTE_RE = re.compile(r"([a-z]+)(\d)")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclasses.dataclass(frozen=True)
class MultiValueSpec(NeedleSpec):
    """A `NeedleSpec` whose question key has `min_values`-`max_values` values (capped at the
    document's chunks: each value has its own chunk)."""

    min_values: int = 2
    max_values: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.min_values <= self.max_values:
            raise ValueError(f"multi-value task: need 1 <= min_values <= max_values, got {self}")
        if self.max_values + self.max_distractors > len(VALUES):
            raise ValueError(f"multi-value task: {self.max_values} values + {self.max_distractors} "
                             f"distractors need more than {len(VALUES)} distinct digits")


def question_text(key: str) -> str:
    return QUESTION.format(key=key)


def notes_text(notes: Sequence[tuple[str, str]]) -> str:
    """A memory of notes: " idea7 idea3" (each key with its leading space), or "none"."""
    return "".join(f" {k}{v}" for k, v in notes) if notes else NOTHING


def parse_notes(memory_text: str) -> list[tuple[str, str]]:
    """(key, value) of every note in a memory, in order ([] for "none" or anything else)."""
    return _NOTE_RE.findall(memory_text)


def answer_text(memory_text: str, key: str | None = None) -> str:
    """The final answer from a memory: its notes restated, then the digits of `key`'s notes (all
    notes when None) boxed in order: " idea7 idea3 \\boxed{73}"."""
    notes = parse_notes(memory_text)
    digits = "".join(v for k, v in notes if key is None or k == key)
    return f"{notes_text(notes)} \\boxed{{{digits or NOTHING}}}"


def digit_f1(response: str | None, answer: str) -> float:
    """F1 of the boxed answer's digits against the answer's, as multisets (order ignored): partial
    credit beside the exact-match reward. No box, or a box without digits: 0."""
    boxes = _BOXED_RE.findall(response or "")
    pred = Counter(c for c in (boxes[-1] if boxes else "") if c.isdigit())
    gold = Counter(c for c in answer if c.isdigit())
    overlap = sum((pred & gold).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(gold.values())
    return 2 * precision * recall / (precision + recall)


def build_sample(spec: MultiValueSpec, tokenizer: Encoder, rng: np.random.Generator, *,
                 essays_dir: str = DEFAULT_ESSAYS_DIR, counter: _TokenCounter | None = None,
                 keys: Sequence[str] | None = None, index: int = 0) -> dict[str, Any]:
    """One sample: question, context, answers (the digits in document order), key, values (in
    document order), value_chunks (distinct, increasing), distractor keys, needles, layout,
    num_chunks, num_tokens."""
    count = counter or _TokenCounter(tokenizer)
    keys = keys if keys is not None else task_keys(tokenizer, spec.num_keys)
    n_values = int(rng.integers(spec.min_values, min(spec.max_values, spec.num_chunks) + 1))
    n_dis = int(rng.integers(spec.min_distractors, spec.max_distractors + 1))
    key, *dis_keys = [keys[i] for i in rng.choice(len(keys), size=n_dis + 1, replace=False)]
    digits = [VALUES[i] for i in rng.choice(len(VALUES), size=n_values + n_dis, replace=False)]
    needles = ([(needle_text(key, v), True) for v in digits[:n_values]]
               + [(needle_text(k, v), False) for k, v in zip(dis_keys, digits[n_values:])])
    doc = place_needles(spec, tokenizer, rng, needles, key, keys, essays_dir=essays_dir, counter=count)
    value_chunks = doc["needle_chunks"][:n_values]
    if doc["placed"] < n_values or len(set(value_chunks)) != n_values:
        raise RuntimeError(f"multi-value task: {n_values} values did not get a chunk each in a "
                           f"document for {spec} (chunks {value_chunks}); use longer chunks")
    values = [v for k, v in doc["needles"] if k == key]
    return {
        "id": f"multivalue-{spec.name}-{spec.num_chunks}x{spec.chunk_size}-{index}",
        "question": question_text(key), "context": doc["context"], "answers": ["".join(values)],
        "key": key, "values": values, "value_chunks": sorted(value_chunks),
        "needle_chunk": min(value_chunks),
        "distractor_keys": dis_keys[:doc["placed"] - n_values], "needles": doc["needles"],
        "layout": doc["layout"], "num_chunks": doc["num_chunks"], "num_tokens": doc["num_tokens"],
    }


class MultiValueTeacher:
    """The warm start's teacher (`rl.sft.Teacher`) for the multi-value task.

    Careful (most documents: 1 - `careless`): keeps its notes and adds a note for each needle of
    the question's key in the chunk. Careless (a `careless` share of documents, by hash of the
    document id): when the chunk holds a needle of the key, its note becomes that needle alone
    (the latest overwrites the rest; the first demo's habit), else it repeats its note. The final
    answer restates the notes and boxes the key's digits (`answer_text`)."""

    def __init__(self, careless: float = 0.0) -> None:
        if not 0.0 <= careless <= 1.0:
            raise ValueError(f"MultiValueTeacher: careless must be in [0, 1], got {careless}")
        self.careless = careless

    def is_careless(self, sample: dict[str, Any]) -> bool:
        return zlib.crc32(str(sample["id"]).encode()) % 10_000 < self.careless * 10_000

    def memory_reply(self, sample: dict[str, Any], chunk_text: str, memory_text: str) -> str:
        notes = parse_notes(memory_text)
        found = [(k, v) for k, v in needles_in(chunk_text) if k == sample["key"]]
        if not found:
            return notes_text(notes)
        return notes_text(found[-1:] if self.is_careless(sample) else notes + found)

    def final_reply(self, sample: dict[str, Any], memory_text: str) -> str:
        return answer_text(memory_text, sample["key"])
