"""RULER synthetic tasks (docs/reference.md section 5): needle-in-a-haystack, variable tracking,
frequent-word extraction and SQuAD QA, generated to a target token length.

``generate(task, target_tokens, tokenizer, seed=...)`` returns a sample dict
{"id", "task", "question", "answers", "context", "depth", "num_tokens"}. The wording follows RULER
(needle "One of the special magic numbers for {key} is: {value}."). The haystack is fitted by
binary search so the tokenized context is within 2% of `target_tokens` (for haystacks of small
units); the *primary* needle (the one holding ``answers[0]``) sits at `depth`, a fraction of the
haystack snapped to a sentence boundary; other needles (distractors, extra values or queries) sit
at random depths. ``depth`` is -1.0 for fwe, which has no needle.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import uuid
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from memagent_jax.data import ruler_haystack as hs
from memagent_jax.data.ruler_haystack import Encoder, TargetTooShortError

__all__ = ["TASKS", "TaskSpec", "generate", "generate_many", "metric_for", "TargetTooShortError"]

# Lengths of the MemAgent RULER evaluation (8K .. 512K tokens).
EVAL_LENGTHS: tuple[int, ...] = (8192, 16384, 32768, 65536, 131072, 262144, 524288)

_ADJECTIVES = (
    "ancient", "bitter", "brave", "calm", "clever", "crimson", "curious", "damp", "eager", "fancy",
    "fierce", "fragile", "gentle", "gloomy", "golden", "grumpy", "hollow", "humble", "icy", "jolly",
    "lively", "lonely", "lucky", "mellow", "misty", "noisy", "odd", "pale", "proud", "quiet",
    "rapid", "rusty", "shiny", "silent", "sleepy", "smooth", "sour", "steady", "tiny", "wild",
)
_NOUNS = (
    "anchor", "badger", "barn", "beacon", "canyon", "castle", "cedar", "comet", "desk", "dragon",
    "falcon", "fern", "forest", "garden", "glacier", "harbor", "island", "kettle", "lantern",
    "meadow", "mirror", "needle", "orchard", "otter", "parrot", "pebble", "pillow", "quarry",
    "river", "saddle", "spider", "statue", "teapot", "thistle", "tower", "tulip", "valley",
    "violin", "walrus", "willow",
)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One RULER task: its kind and, for needle tasks, haystack / key / value types and counts."""

    kind: str  # "niah" | "vt" | "fwe" | "qa"
    metric: str  # "string_match_all" | "sub_em"
    haystack: str = "essay"  # niah: "noise" | "essay" | "needle"
    key_type: str = "words"  # "words" | "uuids"
    value_type: str = "numbers"  # "numbers" | "uuids"
    num_keys: int = 1  # needles with different keys (the first is queried)
    num_values: int = 1  # values per queried key
    num_queries: int = 1  # keys asked in the question


_SM = "string_match_all"
TASKS: dict[str, TaskSpec] = {
    "niah_single_1": TaskSpec("niah", _SM, haystack="noise"),
    "niah_single_2": TaskSpec("niah", _SM, haystack="essay"),
    "niah_single_3": TaskSpec("niah", _SM, haystack="essay", value_type="uuids"),
    "niah_multikey_1": TaskSpec("niah", _SM, haystack="essay", num_keys=4),
    "niah_multikey_2": TaskSpec("niah", _SM, haystack="needle"),
    "niah_multikey_3": TaskSpec(
        "niah", _SM, haystack="needle", key_type="uuids", value_type="uuids"
    ),
    "niah_multivalue": TaskSpec("niah", _SM, haystack="essay", num_values=4),
    "niah_multiquery": TaskSpec("niah", _SM, haystack="essay", num_queries=4),
    "vt": TaskSpec("vt", _SM),
    "fwe": TaskSpec("fwe", _SM),
    "qa_1": TaskSpec("qa", "sub_em"),
}


def _spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[task]


def metric_for(task: str) -> str:
    """The scoring metric of a task: "string_match_all" (niah, vt, fwe) or "sub_em" (qa)."""
    return _spec(task).metric


Render = Callable[[int], str]  # haystack units -> context with the needles inserted


def _rng(seed: int, *tags: str) -> np.random.Generator:
    return np.random.default_rng([int(seed)] + [zlib.crc32(t.encode()) for t in tags])


def _word_key(rng: np.random.Generator) -> str:
    return f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]}-{_NOUNS[rng.integers(len(_NOUNS))]}"


def _draw(rng: np.random.Generator, kind: str) -> str:
    if kind == "words":
        return _word_key(rng)
    if kind == "numbers":
        return str(int(rng.integers(1_000_000, 10_000_000)))
    bits = int(rng.integers(0, 2**63)) << 64 | int(rng.integers(0, 2**63))
    return str(uuid.UUID(int=bits, version=4))


def _draw_unique(rng: np.random.Generator, kind: str, n: int, avoid: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = _draw(rng, kind)
        if v not in avoid and v not in out:
            out.append(v)
    return out


def _needle(key: str, value: str, value_type: str) -> str:
    return f"One of the special magic {value_type} for {key} is: {value}."


def _niah(
    spec: TaskSpec, rng: np.random.Generator, depth: float, essays_dir: str
) -> tuple[Render, str, list[str]]:
    """(render(n), question, answers) of a needle-in-a-haystack task."""
    keys = _draw_unique(rng, spec.key_type, max(spec.num_keys, spec.num_queries), set())
    queried = keys[: spec.num_queries]
    values = _draw_unique(rng, spec.value_type, spec.num_queries * spec.num_values, set())
    needles: list[str] = []  # answer needles first; the first one is the primary
    for q, key in enumerate(queried):
        for v in range(spec.num_values):
            needles.append(_needle(key, values[q * spec.num_values + v], spec.value_type))
    for key in keys[spec.num_queries:]:  # distractor keys (multikey_1)
        other = _draw_unique(rng, spec.value_type, 1, set(values))[0]
        needles.append(_needle(key, other, spec.value_type))
    placed = [(depth, needles[0])] + [(float(rng.uniform()), n) for n in needles[1:]]

    if spec.haystack == "noise":
        hay = hs.noise_haystack()
    elif spec.haystack == "essay":
        hay = hs.essay_haystack(int(rng.integers(len(hs.essay_words(essays_dir)))), essays_dir)
    else:  # other needles: distractor keys and values, never the queried ones
        sub = np.random.default_rng(rng.integers(2**32))
        avoid_k, avoid_v = set(keys), set(values)

        def distractor(_: int) -> str:
            k = _draw_unique(sub, spec.key_type, 1, avoid_k)[0]
            return _needle(k, _draw_unique(sub, spec.value_type, 1, avoid_v)[0], spec.value_type)

        stream = hs.lazy_stream(distractor)

        def hay(n: int) -> str:
            return " ".join(stream(n))

    noun = spec.value_type[:-1]  # "number" / "uuid"
    shown = ", ".join(queried[:-1]) + f" and {queried[-1]}" if len(queried) > 1 else queried[0]
    if len(values) == 1:
        question = f"What is the special magic {noun} for {shown} mentioned in the provided text?"
    else:
        question = (
            f"What are all the special magic {spec.value_type} for {shown} "
            "mentioned in the provided text?"
        )
    return (lambda n: hs.insert_needles(hay(n), placed)), question, values


def _vt(rng: np.random.Generator, depth: float, hops: int = 4) -> tuple[Render, str, list[str]]:
    """Variable tracking: one chain VAR A = value, VAR B = VAR A, ... over the noise haystack."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(chr(65 + int(c)) for c in rng.integers(0, 26, size=5))
        if name not in names:
            names.append(name)
    value = str(int(rng.integers(10_000, 100_000)))
    chain = [f"VAR {names[0]} = {value}."]
    chain += [f"VAR {names[k]} = VAR {names[k - 1]}." for k in range(1, hops + 1)]
    placed = [(depth + (1.0 - depth) * k / (hops + 1), s) for k, s in enumerate(chain)]
    hay = hs.noise_haystack()
    question = f"Find all variables that are assigned the value {value} in the text above."
    return (lambda n: hs.insert_needles(hay(n), placed)), question, names


def _fwe_stream(
    rng: np.random.Generator, vocab_size: int = 2000, alpha: float = 2.0
) -> Callable[[int], list[str]]:
    """take(n) -> the first n of an endless stream of zipf(alpha)-distributed coded words."""
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < vocab_size:
        w = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, size=int(rng.integers(3, 8))))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    words: list[str] = []

    def take(n: int) -> list[str]:
        while len(words) < n:
            ranks = rng.zipf(alpha, size=4096)
            words.extend(vocab[r - 1] for r in ranks if r <= vocab_size)
        return words[:n]

    return take


def _fwe(
    rng: np.random.Generator, tokenizer: Encoder, target_tokens: int, attempts: int = 20
) -> tuple[str, int, str, list[str]]:
    """Frequent-word extraction: the three most frequent coded words, with no tie at third place."""
    question = "What are the three most frequently appeared words in the above coded text?"
    for _ in range(attempts):
        take = _fwe_stream(np.random.default_rng(rng.integers(2**32)))
        n, text, num = hs.fit_units(
            lambda k: " ".join(take(k)), tokenizer, target_tokens, what="fwe context"
        )
        top = collections.Counter(take(n)).most_common(4)
        if len(top) >= 3 and (len(top) == 3 or top[2][1] > top[3][1]):
            return text, num, question, [w for w, _ in top[:3]]
    raise ValueError(
        f"fwe: no sample of {target_tokens} tokens has a unique top-3 word set after {attempts} "
        "attempts; use a longer target_tokens"
    )


@functools.lru_cache(maxsize=2)
def _squad(path: str) -> tuple[list[str], list[tuple[int, str, tuple[str, ...]]]]:
    """SQuAD v1.1 file -> (paragraphs, [(paragraph index, question, answers)])."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "data" not in data:
        raise ValueError(f"{path}: not a SQuAD file (want {{'data': [{{'paragraphs': [...]}}]}})")
    paragraphs: list[str] = []
    qas: list[tuple[int, str, tuple[str, ...]]] = []
    for article in data["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                if answers:
                    qas.append((len(paragraphs), qa["question"], answers))
            paragraphs.append(para["context"])
    if len(paragraphs) < 2 or not qas:
        raise ValueError(f"{path}: SQuAD file needs at least 2 paragraphs and 1 answered question")
    return paragraphs, qas


def _qa(
    rng: np.random.Generator, depth: float, squad_path: str
) -> tuple[Render, str, list[str], int]:
    """SQuAD QA: the gold paragraph among distractor paragraphs (units = distractor words)."""
    paragraphs, qas = _squad(os.path.abspath(squad_path))
    gold_idx, question, answers = qas[int(rng.integers(len(qas)))]
    others = [paragraphs[i] for i in rng.permutation(len(paragraphs)) if i != gold_idx]
    words = [p.split() for p in others]
    total_words = sum(len(w) for w in words)

    def render(n: int) -> str:
        docs: list[str] = []
        left, k = n, 0
        while left > 0:
            w = words[k % len(words)]
            docs.append(" ".join(w[:left]))
            left -= len(w)
            k += 1
        bounds, pos = [0], 0
        for d in docs:
            pos += len(d) + 2
            bounds.append(pos)
        at = bounds.index(hs.nearest(bounds, depth * max(pos - 2, 0)))
        docs.insert(at, paragraphs[gold_idx])
        return "\n\n".join(f"Document {i}:\n{d}" for i, d in enumerate(docs, start=1))

    return render, question, list(answers), total_words


def generate(
    task: str,
    target_tokens: int,
    tokenizer: Encoder,
    *,
    seed: int,
    depth: float | None = None,
    essays_dir: str | None = None,
    squad_path: str | None = None,
) -> dict[str, Any]:
    """One RULER sample of about `target_tokens` context tokens (see the module docstring).

    Args:
      task: a name in `TASKS`.
      target_tokens: context length in tokens of `tokenizer`.
      tokenizer: anything with ``encode(text) -> list[int]``.
      seed: makes the sample deterministic.
      depth: where the primary needle goes, a fraction 0..1 of the haystack; random by default.
      essays_dir: folder of ``.txt`` essays (default: the package copy of the Paul Graham essays).
      squad_path: a SQuAD v1.1 JSON file; required for qa_1.
    """
    spec = _spec(task)
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a fraction in [0, 1], got {depth}")
    rng = _rng(seed, task, str(target_tokens))
    depth = float(rng.uniform()) if depth is None else float(depth)
    essays_dir = essays_dir or hs.DEFAULT_ESSAYS_DIR
    what = f"{task} context"
    if spec.kind == "fwe":
        context, num, question, answers = _fwe(rng, tokenizer, target_tokens)
        depth = -1.0
    else:
        cap = None
        if spec.kind == "niah":
            render, question, answers = _niah(spec, rng, depth, essays_dir)
        elif spec.kind == "vt":
            render, question, answers = _vt(rng, depth)
        else:
            if not squad_path:
                raise ValueError(
                    "qa_1 needs squad_path: a local SQuAD v1.1 JSON file (dev-v1.1.json)"
                )
            render, question, answers, cap = _qa(rng, depth, squad_path)
        n, context, num = hs.fit_units(render, tokenizer, target_tokens, what=what)
        if cap is not None and n > cap:
            warnings.warn(
                f"qa_1: {target_tokens} tokens need more than all {cap} distractor words of "
                f"{squad_path}; distractor paragraphs repeat",
                stacklevel=2,
            )
    return {
        "id": f"{task}-{target_tokens}-{seed}",
        "task": task,
        "question": question,
        "answers": [str(a) for a in answers],
        "context": context,
        "depth": depth,
        "num_tokens": int(num),
    }


def generate_many(
    task: str,
    target_tokens: int,
    tokenizer: Encoder,
    num_samples: int,
    *,
    seed: int = 0,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """`num_samples` samples with seeds ``seed * 1_000_003 + i`` (random depths unless given)."""
    return [
        generate(task, target_tokens, tokenizer, seed=seed * 1_000_003 + i, **kwargs)
        for i in range(num_samples)
    ]

