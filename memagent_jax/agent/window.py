"""Fitting the memory workflow into the model's context window (max_position_embeddings).

A memory turn holds the rendered memory-update template, the question (up to the question
budget), the memory (up to `memory_tokens`), one chunk, and the reply (up to `memory_new_tokens`);
the final turn holds the final template, the question, the memory and the answer. `fit_window`
returns the largest chunk for which both fit (or checks a chosen one), counting the template
exactly as the `PromptBuilder` splices it. `full_context_tokens` is the document budget of the
full-context baseline in the same window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from memagent_jax.agent.prompts import PromptBuilder, SplicedTemplate
from memagent_jax.errors import InputError

#: MemAgent's released budgets (question, memory, answer), used when they fit the window.
RELEASED_BUDGET = 1024

#: How the settings are called where they come from: config keys (default) or CLI flags.
CONFIG_NAMES: dict[str, str] = {"chunk_size": "agent.chunk_size", "question_budget": "agent.question_budget",
                                "memory_tokens": "agent.max_memory_tokens",
                                "answer_tokens": "agent.max_final_new_tokens"}


def default_budget(window: int) -> int:
    """A question / memory / answer budget for a `window`-token model: MemAgent's 1024 tokens, or
    an eighth of the window when that is smaller (small models keep room for the chunk)."""
    return max(1, min(RELEASED_BUDGET, window // 8))


def _template_tokens(t: SplicedTemplate) -> int:
    return sum(len(p) for p in t.pieces)


def memory_slot_tokens(builder: PromptBuilder, memory_tokens: int) -> int:
    """Tokens the memory slot can hold: the memory budget, or the first memory ("No previous
    memory") when that is longer (a small budget on a small model)."""
    return max(memory_tokens, len(builder.first_memory_ids))


@dataclasses.dataclass(frozen=True)
class WindowFit:
    """Token budgets of one memory turn and the final turn in a `window`-token model."""

    window: int
    chunk_size: int
    question_budget: int
    memory_tokens: int  # the memory slot (overwrite policy: max_memory_tokens)
    memory_new_tokens: int  # a memory turn's reply budget
    answer_tokens: int
    memory_template: int  # tokens of the rendered memory-update template (chat markup included)
    final_template: int
    chosen: bool  # True: chunk_size is the largest that fits (not given)

    @property
    def memory_turn(self) -> int:
        return (self.memory_template + self.question_budget + self.memory_tokens + self.chunk_size
                + self.memory_new_tokens)

    @property
    def final_turn(self) -> int:
        return self.final_template + self.question_budget + self.memory_tokens + self.answer_tokens

    def summary(self, how: str | None = None) -> str:
        """One line: the chunk (`how` it was chosen; default "the largest that fits" or "as
        given") and how a memory turn fills the window."""
        how = how or ("the largest that fits" if self.chosen else "as given")
        return (f"chunk {self.chunk_size} tokens ({how}): a memory turn is {self.memory_turn} of the "
                f"{self.window}-token window = template {self.memory_template} + question "
                f"{self.question_budget} + memory {self.memory_tokens} + chunk {self.chunk_size} + "
                f"reply {self.memory_new_tokens}; the final turn {self.final_turn} (answer "
                f"{self.answer_tokens})")


def fit_window(builder: PromptBuilder, window: int, *, question_budget: int, memory_tokens: int,
               answer_tokens: int, memory_new_tokens: int | None = None, chunk_size: int | None = None,
               names: Mapping[str, str] = CONFIG_NAMES, source: str | None = None) -> WindowFit:
    """The chunk size for `window` (the largest that fits when `chunk_size` is None).

    Raises InputError naming the settings (`names`: config keys or CLI flags) and `source` (the
    file the window comes from) when the final turn does not fit, no chunk fits, or `chunk_size`
    is too large.
    """
    mem_new = memory_tokens if memory_new_tokens is None else memory_new_tokens
    memory = memory_slot_tokens(builder, memory_tokens)
    mt, ft = builder.memory_template, builder.final_template
    n = {slot: mt.slots.count(slot) for slot in ("prompt", "memory", "chunk")}
    nf = {slot: ft.slots.count(slot) for slot in ("prompt", "memory")}
    q, m, c, a = (names[k] for k in ("question_budget", "memory_tokens", "chunk_size", "answer_tokens"))
    final = _template_tokens(ft) + nf["prompt"] * question_budget + nf["memory"] * memory + answer_tokens
    if final > window:
        raise InputError(
            f"the final turn needs {final} tokens (template {_template_tokens(ft)} + {q} "
            f"{question_budget} + {m} {memory} + {a} {answer_tokens}), over the model's "
            f"{window}-token window", source, f"lower {a}, {m} or {q}")
    fixed = (_template_tokens(mt) + n["prompt"] * question_budget + n["memory"] * memory + mem_new)
    largest = (window - fixed) // max(1, n["chunk"])
    if largest < 1:
        raise InputError(
            f"no room for a chunk: template {_template_tokens(mt)} + {q} {question_budget} + "
            f"{m} {memory} + the memory reply {mem_new} fill the model's {window}-token window",
            source, f"lower {m} or {q}")
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"{c} {chunk_size} is not a number of tokens", source, f"use {c} >= 1")
    if chunk_size is not None and chunk_size > largest:
        raise InputError(
            f"{c} {chunk_size} does not fit the model's {window}-token window: a memory turn "
            f"would need {fixed + n['chunk'] * chunk_size} tokens (template {_template_tokens(mt)} + "
            f"{q} {question_budget} + {m} {memory} + chunk + reply {mem_new})", source,
            f"use {c} {largest} or less (or leave it out for the largest that fits), or lower {m} "
            f"or {q}")
    return WindowFit(window, largest if chunk_size is None else chunk_size, question_budget, memory,
                     mem_new, answer_tokens, _template_tokens(mt), _template_tokens(ft),
                     chosen=chunk_size is None)


def full_context_tokens(builder: PromptBuilder, window: int, *, question_tokens: int, answer_tokens: int,
                        names: Mapping[str, str] = CONFIG_NAMES, source: str | None = None) -> int:
    """How many document tokens the full-context baseline's one prompt can hold in `window`."""
    ft = builder.final_template
    fixed = (_template_tokens(ft) + ft.slots.count("prompt") * question_tokens + answer_tokens)
    room = (window - fixed) // max(1, ft.slots.count("memory"))
    if room < 1:
        raise InputError(
            f"no room for the document: the final template {_template_tokens(ft)} + question "
            f"{question_tokens} + {names['answer_tokens']} {answer_tokens} fill the model's "
            f"{window}-token window", source, f"lower {names['answer_tokens']}")
    return room


def engine_max_len(builder: PromptBuilder, window: int, *, question_budget: int, memory_tokens: int,
                   chunk_size: int, answer_tokens: int) -> int:
    """KV-cache positions one continuous-batching slot needs for the memory agent: the longer of
    a memory turn (template + question, memory and chunk budgets + reply) and the final turn
    (template + question and memory + answer), rounded up to a sampler bucket, capped at `window`.
    The memory slot is counted as `fit_window` counts it (`memory_slot_tokens`)."""
    from memagent_jax.sampler import bucket  # lazy: the window arithmetic needs no model stack

    def turn(t: SplicedTemplate, reply: int) -> int:
        sizes = {"prompt": question_budget, "memory": memory_slot_tokens(builder, memory_tokens),
                 "chunk": chunk_size}
        return _template_tokens(t) + sum(sizes[slot] for slot in t.slots) + reply

    need = max(turn(builder.memory_template, memory_tokens), turn(builder.final_template, answer_tokens))
    return min(bucket(need), window)
