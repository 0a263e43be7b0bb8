"""Prompt templates of the memory agent (docs/reference.md section 1) and token-spliced rendering.

Templates are plain data. Placeholders are the literal substrings `{prompt}` (the question),
`{memory}` and `{chunk}`; they are substituted by splitting, never with `str.format`, so literal
braces such as `\\boxed{}` need no escaping.

Rendering goes through the tokenizer's chat template once per template: the user message is
rendered with sentinel strings in the placeholder slots, the rendered string is cut at the
sentinels and every static piece is encoded once and cached. A prompt is then assembled purely
from token ids (piece0 + slot ids + piece1 + ...), so the question, memory and chunk ids are
spliced in without a decode/re-encode round trip. For tokenizers whose merges never cross a
piece boundary (the usual case: pieces end in a newline) this equals encoding the rendered text.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

# Byte-identical to MemAgent's released prompts (docs/reference.md section 1): the trailing space
# after `<problem>`, no final newline.
MEMORY_UPDATE_TEMPLATE = (
    "You are presented with a problem, a section of an article that may contain the answer to the "
    "problem, and a previous memory. Please read the provided section carefully and update the "
    "memory with the new information that helps to answer the problem. Be sure to retain all "
    "relevant details from the previous memory while adding any new, useful information.\n"
    "\n"
    "<problem> \n"
    "{prompt}\n"
    "</problem>\n"
    "\n"
    "<memory>\n"
    "{memory}\n"
    "</memory>\n"
    "\n"
    "<section>\n"
    "{chunk}\n"
    "</section>\n"
    "\n"
    "Updated memory:"
)

FINAL_BOXED_TEMPLATE = (
    "You are presented with a problem and a previous memory. Please answer the problem based on "
    "the previous memory and put the answer in \\boxed{}.\n"
    "\n"
    "<problem> \n"
    "{prompt}\n"
    "</problem>\n"
    "\n"
    "<memory>\n"
    "{memory}\n"
    "</memory>\n"
    "\n"
    "Your answer:"
)

# Evaluation style: the answer is read from the text after the last "the answer is".
FINAL_ANSWER_IS_TEMPLATE = (
    "You are presented with a problem and a previous memory. Please answer the problem based on "
    "the previous memory. Your answer should be concise and end with "
    "\"Therefore, the answer is (insert answer here)\".\n"
    "\n"
    "<problem> \n"
    "{prompt}\n"
    "</problem>\n"
    "\n"
    "<memory>\n"
    "{memory}\n"
    "</memory>\n"
    "\n"
    "Your answer:"
)

FINAL_STYLES: dict[str, str] = {"boxed": FINAL_BOXED_TEMPLATE, "answer_is": FINAL_ANSWER_IS_TEMPLATE}
SLOTS = ("prompt", "memory", "chunk")


@dataclasses.dataclass(frozen=True)
class PromptTemplates:
    """The agent's prompt texts. Defaults reproduce MemAgent's RL training prompts."""

    memory_update: str = MEMORY_UPDATE_TEMPLATE
    final: str = FINAL_BOXED_TEMPLATE
    first_memory: str = "No previous memory"

    @classmethod
    def for_style(cls, final_style: str = "boxed", **overrides: Any) -> PromptTemplates:
        """Templates whose final prompt is `final_style` ("boxed" | "answer_is")."""
        if final_style not in FINAL_STYLES:
            raise ValueError(f"unknown final_style {final_style!r}; known: {sorted(FINAL_STYLES)}")
        return cls(**{"final": FINAL_STYLES[final_style], **overrides})


def _sentinel(slot: str) -> str:
    return f"[[MEMAGENT_SLOT_{slot.upper()}]]"


@dataclasses.dataclass(frozen=True)
class SplicedTemplate:
    """A chat-rendered template cut at its slots: len(pieces) == len(slots) + 1."""

    text_pieces: tuple[str, ...]
    pieces: tuple[tuple[int, ...], ...]  # encoded text_pieces
    slots: tuple[str, ...]  # slot names in template order (a slot may repeat)

    def build(self, fields: Mapping[str, Sequence[int]]) -> list[int]:
        """Prompt ids: piece0 + fields[slot0] + piece1 + ... + last piece."""
        out = list(self.pieces[0])
        for slot, piece in zip(self.slots, self.pieces[1:]):
            out.extend(fields[slot])
            out.extend(piece)
        return out

    def render(self, fields: Mapping[str, str]) -> str:
        """The same prompt as text (for inspection and tests)."""
        parts = [self.text_pieces[0]]
        for slot, piece in zip(self.slots, self.text_pieces[1:]):
            parts += [fields[slot], piece]
        return "".join(parts)


def splice_template(tokenizer: Any, template: str, required: Sequence[str], name: str,
                    chat_template_kwargs: Mapping[str, Any] | None = None) -> SplicedTemplate:
    """Render `template` as one user message through the chat template and cut it at the slots.

    `chat_template_kwargs` (e.g. enable_thinking) go to `tokenizer.apply_chat_template`.
    """
    missing = [s for s in required if "{" + s + "}" not in template]
    if missing:
        raise ValueError(f"prompt template {name!r} lacks placeholder(s) {['{' + s + '}' for s in missing]}")
    content = template
    for slot in SLOTS:
        if _sentinel(slot) in template:
            raise ValueError(f"prompt template {name!r} contains the reserved string {_sentinel(slot)!r}")
        content = content.replace("{" + slot + "}", _sentinel(slot))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             **dict(chat_template_kwargs or {}))
    parts = re.split("(" + "|".join(re.escape(_sentinel(s)) for s in SLOTS) + ")", rendered)
    by_sentinel = {_sentinel(s): s for s in SLOTS}
    text_pieces, slots = tuple(parts[0::2]), tuple(by_sentinel[p] for p in parts[1::2])
    for slot in SLOTS:  # the chat template must keep every placeholder, exactly once per use
        if slots.count(slot) != content.count(_sentinel(slot)):
            raise ValueError(f"the chat template altered placeholder {{{slot}}} of prompt template {name!r}")
    pieces = tuple(tuple(tokenizer.encode(p)) if p else () for p in text_pieces)
    return SplicedTemplate(text_pieces=text_pieces, pieces=pieces, slots=slots)


class PromptBuilder:
    """Builds chat-formatted prompt ids for memory turns and the final turn by token splicing.

    `enable_thinking` is passed to the chat template (Qwen3's template reads it; others ignore
    it). The default False renders Qwen3 prompts in non-thinking mode (an empty think block after
    the generation prompt), so memory replies are the memory itself; True lets the model think,
    and the overwrite policy still cuts the thinking from each reply (`memory.strip_thinking`).
    None passes nothing (for tokenizers whose `apply_chat_template` takes no extra arguments).
    """

    def __init__(self, tokenizer: Any, templates: PromptTemplates | None = None, *,
                 enable_thinking: bool | None = False) -> None:
        self.tokenizer = tokenizer
        self.templates = templates if templates is not None else PromptTemplates()
        self.enable_thinking = enable_thinking
        kwargs = {} if enable_thinking is None else {"enable_thinking": bool(enable_thinking)}
        self.memory_template = splice_template(
            tokenizer, self.templates.memory_update, ("prompt", "memory", "chunk"), "memory_update", kwargs
        )
        self.final_template = splice_template(tokenizer, self.templates.final, ("prompt", "memory"), "final",
                                              kwargs)
        self.first_memory_ids: list[int] = list(tokenizer.encode(self.templates.first_memory))

    def memory_prompt(
        self, question_ids: Sequence[int], memory_ids: Sequence[int], chunk_ids: Sequence[int]
    ) -> list[int]:
        """Prompt ids of one memory-update turn."""
        return self.memory_template.build({"prompt": question_ids, "memory": memory_ids, "chunk": chunk_ids})

    def final_prompt(self, question_ids: Sequence[int], memory_ids: Sequence[int]) -> list[int]:
        """Prompt ids of the final (answer) turn."""
        return self.final_template.build({"prompt": question_ids, "memory": memory_ids})

    def memory_prompt_text(self, question: str, memory: str, chunk: str) -> str:
        """The memory-update prompt as rendered text."""
        return self.memory_template.render({"prompt": question, "memory": memory, "chunk": chunk})

    def final_prompt_text(self, question: str, memory: str) -> str:
        """The final prompt as rendered text."""
        return self.final_template.render({"prompt": question, "memory": memory})


def builder_from_config(tokenizer: Any, agent: Any) -> PromptBuilder:
    """The PromptBuilder of an `AgentSection`: its templates and `enable_thinking`."""
    return PromptBuilder(tokenizer, templates_from_config(agent),
                         enable_thinking=getattr(agent, "enable_thinking", False))


def templates_from_config(agent: Any) -> PromptTemplates:
    """PromptTemplates from an `AgentSection`: the final style plus any non-empty overrides."""
    overrides = {
        key: value
        for key, value in (("memory_update", agent.memory_template), ("final", agent.final_template),
                           ("first_memory", agent.first_memory))
        if value
    }
    return PromptTemplates.for_style(agent.final_style, **overrides)
