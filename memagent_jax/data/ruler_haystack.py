"""Haystacks for the RULER synthetic tasks: sources, length fitting and needle insertion.

A haystack is a function ``units(n) -> str`` that renders the first `n` units (essay words,
noise sentences, distractor needles, ...) of an endless, deterministic stream. `fit_units` finds
the `n` whose rendered context (needles inserted) tokenizes closest to a target length by binary
search; `insert_needles` places needles at depth fractions, snapped to sentence boundaries.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Protocol

DEFAULT_ESSAYS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "essays")

# RULER's "noise" haystack: these five sentences repeated.
NOISE_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

LENGTH_TOLERANCE = 0.02  # fitted contexts should be within 2% of the target token count

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")


class Encoder(Protocol):
    """The part of the Tokenizer protocol the data code needs."""

    def encode(self, text: str) -> list[int]: ...


class TargetTooShortError(ValueError):
    """The requested length cannot hold the needles (and the question-specific text) alone."""


@functools.lru_cache(maxsize=4)
def essay_words(essays_dir: str = DEFAULT_ESSAYS_DIR) -> tuple[str, ...]:
    """All essays (``*.txt``, sorted by name) as one word sequence, as RULER reads them."""
    if not os.path.isdir(essays_dir):
        raise FileNotFoundError(
            f"essays directory {essays_dir!r} not found (want a folder of .txt files)"
        )
    names = sorted(n for n in os.listdir(essays_dir) if n.endswith(".txt"))
    if not names:
        raise FileNotFoundError(f"essays directory {essays_dir!r} holds no .txt files")
    texts = []
    for name in names:
        with open(os.path.join(essays_dir, name), encoding="utf-8") as f:
            texts.append(f.read())
    return tuple(" ".join(texts).split())


def cycled(seq: Sequence[str], start: int, n: int) -> list[str]:
    """`n` items of `seq` from `start`, wrapping around (the haystack repeats when it runs out)."""
    if not seq:
        raise ValueError("empty haystack source")
    out: list[str] = []
    pos = start % len(seq)
    while len(out) < n:
        take = min(n - len(out), len(seq) - pos)
        out.extend(seq[pos:pos + take])
        pos = 0
    return out


def essay_haystack(start: int, essays_dir: str = DEFAULT_ESSAYS_DIR) -> Callable[[int], str]:
    """Haystack of essay words starting at word `start` (units = words)."""
    words = essay_words(essays_dir)
    return lambda n: " ".join(cycled(words, start, n))


def noise_haystack() -> Callable[[int], str]:
    """RULER's repeated noise sentences (units = sentences)."""
    return lambda n: " ".join(cycled(NOISE_SENTENCES, 0, n))


def lazy_stream(make: Callable[[int], str]) -> Callable[[int], list[str]]:
    """Memoised endless stream: ``take(n)`` returns items 0..n-1, item i = make(i) in order.

    `make` is called in index order only, so a stateful random generator inside it yields the
    same items whatever order the binary search asks for lengths.
    """
    items: list[str] = []

    def take(n: int) -> list[str]:
        while len(items) < n:
            items.append(make(len(items)))
        return items[:n]

    return take


def sentence_boundaries(text: str) -> list[int]:
    """Offsets where a sentence starts (0 and len(text) included)."""
    cuts = [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]
    return sorted(set(cuts))


def nearest(boundaries: Sequence[int], target: float) -> int:
    """The boundary closest to `target`."""
    return min(boundaries, key=lambda b: (abs(b - target), b))


def insert_needles(haystack: str, needles: Sequence[tuple[float, str]]) -> str:
    """Insert each (depth, needle) at the sentence start nearest ``depth * len(haystack)``.

    Needles that land on the same boundary keep their given order. A needle is followed by a
    space (or preceded by one at the very end), so it reads as its own sentence.
    """
    if not haystack:
        return " ".join(n for _, n in needles)
    bounds = sentence_boundaries(haystack)
    placed = sorted(
        ((nearest(bounds, d * len(haystack)), k, text) for k, (d, text) in enumerate(needles))
    )
    pieces: list[str] = []
    prev = 0
    for pos, _, text in placed:
        pieces.append(haystack[prev:pos])
        if pos >= len(haystack):
            pieces.append((" " if not pieces[-1].endswith(" ") else "") + text)
        else:
            pieces.append(text + " ")
        prev = pos
    pieces.append(haystack[prev:])
    return "".join(pieces)


def fit_units(
    render: Callable[[int], str],
    tokenizer: Encoder,
    target_tokens: int,
    *,
    what: str = "context",
    max_units: int | None = None,
) -> tuple[int, str, int]:
    """The unit count whose rendering tokenizes closest to `target_tokens`: (n, text, num_tokens).

    `render(n)` must grow (weakly) in token count with `n`. Raises `TargetTooShortError` when
    `render(0)` (the needles alone) is already longer than the target; warns when the closest
    length is off by more than `LENGTH_TOLERANCE` (units too coarse for a short target).
    """
    if target_tokens < 1:
        raise TargetTooShortError(f"target_tokens must be positive, got {target_tokens}")
    count_cache: dict[int, tuple[str, int]] = {}

    def count(n: int) -> int:
        if n not in count_cache:
            text = render(n)
            count_cache[n] = (text, len(tokenizer.encode(text)))
        return count_cache[n][1]

    base = count(0)
    if base > target_tokens:
        raise TargetTooShortError(
            f"target_tokens={target_tokens} is shorter than the {what} without any haystack "
            f"({base} tokens: the needles / question-specific text); use target_tokens > {base}"
        )
    cap = max_units if max_units is not None else 1 << 40
    # Estimate tokens per unit from a probe, then bracket the target around the estimate.
    probe = min(64, cap)
    per_unit = max((count(probe) - base) / probe, 1e-3) if probe else 1.0
    step = max(8, int((target_tokens - base) / per_unit) // 32)
    lo, hi = 0, None  # invariant: count(lo) <= target < count(hi)
    cand = min(cap, int((target_tokens - base) / per_unit))
    if count(cand) <= target_tokens:
        lo = cand
        while hi is None and lo < cap:
            cand = min(cap, lo + step)
            if count(cand) <= target_tokens:
                lo, step = cand, 2 * step
            else:
                hi = cand
    else:
        hi = cand
        while True:
            cand = max(0, hi - step)
            if count(cand) <= target_tokens:
                lo = cand
                break
            hi, step = cand, 2 * step
    if hi is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if count(mid) <= target_tokens:
                lo = mid
            else:
                hi = mid
        best = min((lo, hi), key=lambda n: (abs(count(n) - target_tokens), n))
    else:
        best = lo
    text, num = count_cache[best]
    if abs(num - target_tokens) > LENGTH_TOLERANCE * target_tokens:
        warnings.warn(
            f"{what}: closest length is {num} tokens for target {target_tokens} "
            f"(haystack units of about {per_unit:.0f} tokens are too coarse, or the haystack "
            "ran out); use a longer target",
            stacklevel=2,
        )
    return best, text, num
