"""Memory policies: how a document is read, what the memory starts as and how a reply updates it.

A policy is any object with the five methods of `MemoryPolicy` (duck typed). Built-ins are
registered by name; research forks either register their own class with `@register_policy(name)`
or name it in config as "module.path:ClassName" (`make_policy` imports it).

- `overwrite` (MemAgent): token chunks of `chunk_size`; the reply replaces the memory. A thinking
  block (`<think>...</think>`, Qwen3 in thinking mode) is cut from the reply first: the memory
  holds the updated memory only (the trained conversation keeps the whole reply).
- `append` (a research-fork baseline): the reply is added after the memory, which keeps its last
  `max_memory_tokens` tokens.
- `full_context` (baseline): no memory turns; the whole (center-truncated) document is placed in
  the memory slot of the final prompt, so the answer format and verifier stay the same as MemAgent's.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from memagent_jax.agent.prompts import PromptBuilder

logger = logging.getLogger(__name__)


def log_truncation(policy: Any, message: str, *args: Any) -> None:
    """A truncation is a WARNING the first time a policy object makes one, DEBUG afterwards: an
    evaluation of hundreds of long documents says it once, not once per document."""
    if getattr(policy, "_truncation_logged", False):
        logger.debug(message, *args)
        return
    logger.warning(message + " (further truncations by this policy are logged at DEBUG level)", *args)
    object.__setattr__(policy, "_truncation_logged", True)
T = TypeVar("T")


@runtime_checkable
class MemoryPolicy(Protocol):
    """What the rollout asks of a memory policy."""

    def split(self, doc_ids: Sequence[int], *, training: bool) -> list[list[int]]:
        """The document's chunks; one memory turn per chunk (may be empty)."""
        ...

    def initial_memory(self, builder: PromptBuilder, doc_ids: Sequence[int] = ()) -> list[int]:
        """Memory ids before the first turn (`doc_ids` lets a policy seed memory with the document)."""
        ...

    def update(self, memory_ids: list[int], reply_ids: Sequence[int], tokenizer: Any) -> tuple[list[int], bool]:
        """Next memory ids from a memory-turn reply, and whether it was capped."""
        ...

    def turn_prompt(
        self, builder: PromptBuilder, question_ids: Sequence[int], memory_ids: Sequence[int], chunk_ids: Sequence[int]
    ) -> list[int]:
        """Prompt ids of one memory turn."""
        ...

    def final_prompt(self, builder: PromptBuilder, question_ids: Sequence[int], memory_ids: Sequence[int]) -> list[int]:
        """Prompt ids of the final (answer) turn."""
        ...


# ----------------------------------------------------------------------------- helpers


def center_truncate(items: Sequence[T], max_len: int) -> list[T]:
    """Keep the first ceil(max_len/2) and the last floor(max_len/2) items (drop the middle)."""
    if max_len < 0:
        raise ValueError(f"center_truncate: max_len must be >= 0, got {max_len}")
    if len(items) <= max_len:
        return list(items)
    head, tail = (max_len + 1) // 2, max_len // 2
    return list(items[:head]) + list(items[len(items) - tail :])


def chunk_ids(ids: Sequence[int], chunk_size: int) -> list[list[int]]:
    """Contiguous slices of `chunk_size` ids (the last may be shorter); [] for an empty input."""
    return [list(ids[i : i + chunk_size]) for i in range(0, len(ids), chunk_size)]


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _marker_id(tokenizer: Any, marker: str) -> int | None:
    """The id of `marker` when the tokenizer has it as one token (Qwen3), else None."""
    token_to_id = getattr(tokenizer, "token_to_id", None)
    return token_to_id(marker) if callable(token_to_id) else None


def _without_thinking_text(text: str) -> str:
    """`text` without its thinking: what follows the last `</think>` (leading whitespace dropped),
    else what precedes an unclosed `<think>` (the reply ran out of tokens while thinking)."""
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1].lstrip()
    return text.split(THINK_OPEN, 1)[0].rstrip()


def strip_thinking(ids: Sequence[int], tokenizer: Any) -> list[int]:
    """`ids` without a `<think>...</think>` block, so the memory never holds a model's thinking.

    Keeps what follows the last `</think>` (whitespace-only tokens right after it dropped), or,
    when a `<think>` is never closed, what precedes it. Works on ids when both markers are single
    tokens of the tokenizer (Qwen3); otherwise a reply whose text holds a marker is decoded,
    cut and re-encoded (replies without markers are returned as they are).
    """
    ids = [int(t) for t in ids]
    open_id, close_id = _marker_id(tokenizer, THINK_OPEN), _marker_id(tokenizer, THINK_CLOSE)
    if open_id is not None and close_id is not None:
        if close_id in ids:
            rest = ids[len(ids) - ids[::-1].index(close_id):]
            while rest and not tokenizer.decode(rest[:1]).strip():
                rest = rest[1:]
            return rest
        if open_id in ids:
            head = ids[:ids.index(open_id)]
            while head and not tokenizer.decode(head[-1:]).strip():
                head = head[:-1]
            return head
        return ids
    text = tokenizer.decode(ids)
    if THINK_OPEN not in text and THINK_CLOSE not in text:
        return ids
    return list(tokenizer.encode(_without_thinking_text(text)))


def strip_reply(reply_ids: Sequence[int], tokenizer: Any) -> list[int]:
    """A reply as the next memory: drop pad and EOS ids, ids the tokenizer does not know (MemAgent
    issue #25), and any thinking block (`strip_thinking`)."""
    drop = {tokenizer.pad_id, tokenizer.eos_id, *tokenizer.eos_ids}
    kept = [int(t) for t in reply_ids if t not in drop and 0 <= t < tokenizer.vocab_size]
    return strip_thinking(kept, tokenizer)


# ----------------------------------------------------------------------------- registry

_POLICIES: dict[str, Callable[..., MemoryPolicy]] = {}


def register_policy(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make the policy available as `make_policy(name, **kwargs)`."""

    def deco(cls: type[T]) -> type[T]:
        old = _POLICIES.get(name)
        # the same class imported twice (e.g. under two module names) may re-register
        if old is not None and getattr(old, "__qualname__", None) != cls.__qualname__:
            raise ValueError(f"memory policy {name!r} is already registered ({old!r})")
        _POLICIES[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def available_policies() -> list[str]:
    """Registered policy names."""
    return sorted(_POLICIES)


def make_policy(name: str, **kwargs: Any) -> MemoryPolicy:
    """Instantiate a registered policy, or "module.path:ClassName" imported on demand."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                factory = getattr(factory, part)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load memory policy {name!r}: {e}") from e
    elif name in _POLICIES:
        factory = _POLICIES[name]
    else:
        raise ValueError(
            f"unknown memory policy {name!r}; known: {', '.join(available_policies())} "
            "(or name your own class as 'module.path:ClassName')"
        )
    policy = factory(**kwargs)
    if not isinstance(policy, MemoryPolicy):
        raise TypeError(f"memory policy {name!r} does not implement MemoryPolicy (split, initial_memory, "
                        "update, turn_prompt, final_prompt)")
    return policy


# ----------------------------------------------------------------------------- built-ins


@register_policy("overwrite")
@dataclasses.dataclass
class OverwritePolicy:
    """MemAgent: read `chunk_size`-token chunks; each reply overwrites the memory.

    Training caps the document at `max_chunks` chunks by center truncation (head and tail kept);
    evaluation (training=False) reads every chunk. `max_chunks=None` disables the cap.
    """

    chunk_size: int = 5000
    max_chunks: int | None = 8
    max_memory_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.max_memory_tokens < 1:
            raise ValueError(f"overwrite policy: chunk_size and max_memory_tokens must be >= 1 ({self})")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise ValueError(f"overwrite policy: max_chunks must be >= 1 or None, got {self.max_chunks}")

    def split(self, doc_ids: Sequence[int], *, training: bool) -> list[list[int]]:
        chunks = chunk_ids(doc_ids, self.chunk_size)
        if training and self.max_chunks is not None and len(chunks) > self.max_chunks:
            log_truncation(self, "document of %d chunks center-truncated to max_chunks=%d for training",
                           len(chunks), self.max_chunks)
            chunks = center_truncate(chunks, self.max_chunks)
        return chunks

    def initial_memory(self, builder: PromptBuilder, doc_ids: Sequence[int] = ()) -> list[int]:
        return list(builder.first_memory_ids)

    def update(self, memory_ids: list[int], reply_ids: Sequence[int], tokenizer: Any) -> tuple[list[int], bool]:
        new = strip_reply(reply_ids, tokenizer)
        return new[: self.max_memory_tokens], len(new) > self.max_memory_tokens

    def turn_prompt(
        self, builder: PromptBuilder, question_ids: Sequence[int], memory_ids: Sequence[int], chunk_ids: Sequence[int]
    ) -> list[int]:
        return builder.memory_prompt(question_ids, memory_ids, chunk_ids)

    def final_prompt(self, builder: PromptBuilder, question_ids: Sequence[int], memory_ids: Sequence[int]) -> list[int]:
        return builder.final_prompt(question_ids, memory_ids)


@register_policy("append")
@dataclasses.dataclass
class AppendPolicy(OverwritePolicy):
    """A research-fork baseline: each reply is ADDED to the memory instead of replacing it.

    The next memory is the old memory followed by the reply (`strip_reply`), truncated to its
    LAST `max_memory_tokens` tokens (the oldest fall out: a sliding window over what was noted).
    The first memory (the template's placeholder, e.g. "none") is dropped at the first
    non-empty reply, so it never sits in front of real notes. Chunking, prompts and the training
    cap are the overwrite policy's.
    """

    def initial_memory(self, builder: PromptBuilder, doc_ids: Sequence[int] = ()) -> list[int]:
        first = list(builder.first_memory_ids)
        object.__setattr__(self, "_placeholder", first)
        return first

    def update(self, memory_ids: list[int], reply_ids: Sequence[int], tokenizer: Any) -> tuple[list[int], bool]:
        new = strip_reply(reply_ids, tokenizer)
        if not new:
            return list(memory_ids), False
        old = [] if list(memory_ids) == getattr(self, "_placeholder", None) else list(memory_ids)
        joined = old + new
        capped = len(joined) > self.max_memory_tokens
        return (joined[-self.max_memory_tokens:] if capped else joined), capped


@register_policy("full_context")
@dataclasses.dataclass
class FullContextPolicy:
    """Baseline: the whole document in ONE memory-free prompt (zero memory turns).

    The document, center-truncated to `max_context_tokens` (with a logged warning), fills the
    memory slot of the final template, so the baseline answers in the same format as MemAgent.
    The default fits the released 8192-token window next to a 1024-token question and the template.
    """

    max_context_tokens: int = 7000

    def __post_init__(self) -> None:
        if self.max_context_tokens < 1:
            raise ValueError(f"full_context policy: max_context_tokens must be >= 1, got {self.max_context_tokens}")

    def split(self, doc_ids: Sequence[int], *, training: bool) -> list[list[int]]:
        return []

    def initial_memory(self, builder: PromptBuilder, doc_ids: Sequence[int] = ()) -> list[int]:
        if len(doc_ids) > self.max_context_tokens:
            log_truncation(self, "full_context: document of %d tokens center-truncated to "
                           "max_context_tokens=%d", len(doc_ids), self.max_context_tokens)
        return center_truncate(doc_ids, self.max_context_tokens)

    def update(self, memory_ids: list[int], reply_ids: Sequence[int], tokenizer: Any) -> tuple[list[int], bool]:
        return strip_reply(reply_ids, tokenizer), False  # never called: no memory turns

    def turn_prompt(
        self, builder: PromptBuilder, question_ids: Sequence[int], memory_ids: Sequence[int], chunk_ids: Sequence[int]
    ) -> list[int]:
        return builder.memory_prompt(question_ids, memory_ids, chunk_ids)

    def final_prompt(self, builder: PromptBuilder, question_ids: Sequence[int], memory_ids: Sequence[int]) -> list[int]:
        return builder.final_prompt(question_ids, memory_ids)
