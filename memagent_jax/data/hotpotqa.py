"""RULER-HotpotQA documents from a local HotpotQA file in the official distractor format.

Recipe (docs/reference.md section 5):

- Pool = all unique paragraphs of the file, each rendered ``title + "\\n" + "".join(sentences)``
  (HotpotQA sentences carry their own leading spaces, so they are joined without a separator).
- Per question: its own paragraphs (usually 2 gold + 8 distractors) plus random pool paragraphs
  (never its own) up to ``num_docs`` documents, shuffled with a per-question seed, rendered
  ``Document {i}:\\n{text}`` (i from 1) and joined with blank lines.

Samples are stored as *records* holding paragraph indices into the pool; `render_sample` turns a
record into the sample dict, so that documents of 25,600 paragraphs cost only their indices until
they are read.
"""

from __future__ import annotations

import json
import os
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

# Document counts of the MemAgent evaluation (about 7K .. 3.5M tokens).
EVAL_NUM_DOCS: tuple[int, ...] = (50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600)

REQUIRED_KEYS: tuple[str, ...] = ("_id", "question", "answer", "supporting_facts", "context")
EXPECTED_FORMAT = (
    "expected the official HotpotQA distractor format: a JSON list of objects "
    '{"_id": str, "question": str, "answer": str, "supporting_facts": [[title, sent_id], ...], '
    '"context": [[title, [sentence, ...]], ...]} (e.g. hotpot_dev_distractor_v1.json)'
)


class HotpotqaFormatError(ValueError):
    """The input is not in the HotpotQA distractor format."""


def validate_hotpotqa(items: Any, source: str = "<input>") -> list[dict[str, Any]]:
    """Check `items` is a list of HotpotQA questions; raise `HotpotqaFormatError` otherwise."""
    if not isinstance(items, list):
        raise HotpotqaFormatError(
            f"{source}: top level is {type(items).__name__}; {EXPECTED_FORMAT}"
        )
    if not items:
        raise HotpotqaFormatError(f"{source}: the file holds no questions; {EXPECTED_FORMAT}")
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise HotpotqaFormatError(
                f"{source}: record {n} is {type(item).__name__}, not an object; {EXPECTED_FORMAT}"
            )
        for key in REQUIRED_KEYS:
            if key not in item:
                raise HotpotqaFormatError(
                    f"{source}: record {n} (id {item.get('_id', '?')!r}) has no key {key!r}; "
                    f"{EXPECTED_FORMAT}"
                )
        ctx = item["context"]
        ok = isinstance(ctx, list) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str)
            and isinstance(p[1], list)
            for p in ctx
        )
        if not ok:
            raise HotpotqaFormatError(
                f"{source}: record {n} (id {item['_id']!r}) has a malformed 'context' "
                f"(want [[title, [sentences]], ...]); {EXPECTED_FORMAT}"
            )
    return items


def load_hotpotqa(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and validate a HotpotQA distractor-format JSON file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"HotpotQA file {path!r} not found; pass the path of a local file in the official "
            "distractor format (e.g. hotpot_dev_distractor_v1.json)"
        )
    with open(path, encoding="utf-8") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            raise HotpotqaFormatError(f"{path}: not valid JSON ({e}); {EXPECTED_FORMAT}") from e
    return validate_hotpotqa(items, source=path)


def render_paragraph(title: str, sentences: Sequence[str]) -> str:
    """One pool paragraph: the title line, then the sentences joined as they are."""
    return f"{title}\n{''.join(sentences)}"


def build_pool(items: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[int]]]:
    """Unique paragraphs of all questions (first-seen order) and each question's own indices."""
    pool: list[str] = []
    index: dict[str, int] = {}
    own: list[list[int]] = []
    for item in items:
        mine: list[int] = []
        for title, sentences in item["context"]:
            text = render_paragraph(title, sentences)
            j = index.get(text)
            if j is None:
                j = index[text] = len(pool)
                pool.append(text)
            if j not in mine:
                mine.append(j)
        own.append(mine)
    return pool, own


def question_rng(seed: int, question_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, question id), not on question order or filtering."""
    return np.random.default_rng([int(seed), zlib.crc32(question_id.encode("utf-8"))])


def _extra_indices(
    own: Sequence[int], pool_size: int, extra: int, rng: np.random.Generator
) -> np.ndarray:
    """`extra` pool indices outside `own`; without replacement when the pool is large enough."""
    if extra <= 0:
        return np.zeros((0,), np.int64)
    available = pool_size - len(own)
    if extra <= available:
        # Draw extra + len(own) distinct indices; dropping own ones leaves at least `extra`.
        draw = rng.choice(pool_size, size=min(pool_size, extra + len(own)), replace=False)
        draw = draw[~np.isin(draw, np.asarray(own, np.int64))]
        return draw[:extra]
    # Not enough paragraphs: reuse the pool, each paragraph about equally often (tiling).
    if available <= 0:
        raise ValueError(
            f"the paragraph pool ({pool_size}) has no paragraph outside the question's own"
        )
    candidates = np.setdiff1d(np.arange(pool_size), np.asarray(own, np.int64))
    reps, rest = divmod(extra, available)
    parts = [rng.permutation(candidates) for _ in range(reps)]
    parts.append(rng.choice(candidates, size=rest, replace=False))
    return np.concatenate(parts)


def make_records(
    items: Sequence[dict[str, Any]],
    num_docs: int,
    *,
    seed: int = 0,
    filter_fn: Callable[[dict[str, Any]], bool] | None = None,
    max_questions: int | None = None,
    pool: tuple[list[str], list[list[int]]] | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """The pool and one record per kept question.

    Args:
      items: validated HotpotQA questions (see `load_hotpotqa`).
      num_docs: documents per sample (N); at least the largest question's own paragraph count.
      seed: base seed; each question's shuffle uses `question_rng(seed, _id)`.
      filter_fn: called with each raw question dict; return False to drop it (e.g. questions a
        model answers without the document).
      max_questions: keep at most this many questions (after filtering), in file order.
      pool: a precomputed `build_pool(items)` result, to share between several N.

    Returns:
      (pool, records); a record is {"id", "question", "answers", "doc_indices", "num_docs"}.
      The pool is built from *all* items (filtering does not shrink it).
    """
    if num_docs < 1:
        raise ValueError(f"num_docs must be >= 1, got {num_docs}")
    paragraphs, own_all = pool if pool is not None else build_pool(items)
    records: list[dict[str, Any]] = []
    reuse = 0
    for item, own in zip(items, own_all):
        if max_questions is not None and len(records) >= max_questions:
            break
        if filter_fn is not None and not filter_fn(item):
            continue
        if len(own) > num_docs:
            raise ValueError(
                f"num_docs={num_docs} is smaller than question {item['_id']!r}'s own "
                f"{len(own)} paragraphs; use num_docs >= {len(own)}"
            )
        rng = question_rng(seed, str(item["_id"]))
        extra = num_docs - len(own)
        if extra > len(paragraphs) - len(own):
            reuse += 1
        more = _extra_indices(own, len(paragraphs), extra, rng)
        docs = np.concatenate([np.asarray(own, np.int64), more])
        docs = rng.permutation(docs)
        records.append({
            "id": str(item["_id"]),
            "question": str(item["question"]),
            "answers": [str(item["answer"])],
            "doc_indices": docs.astype(np.int64).tolist(),
            "num_docs": int(num_docs),
        })
    if reuse:
        warnings.warn(
            f"RULER-HotpotQA: num_docs={num_docs} exceeds the paragraph pool ({len(paragraphs)} "
            f"paragraphs); sampled the pool with replacement for {reuse} question(s), so "
            "paragraphs repeat within a document. Use a larger HotpotQA file to avoid this.",
            stacklevel=2,
        )
    return paragraphs, records


def render_context(doc_indices: Iterable[int], pool: Sequence[str]) -> str:
    """`Document {i}:\\n{text}` for each index (i from 1), joined with blank lines."""
    return "\n\n".join(f"Document {i}:\n{pool[j]}" for i, j in enumerate(doc_indices, start=1))


def render_sample(record: dict[str, Any], pool: Sequence[str]) -> dict[str, Any]:
    """The sample dict {"id", "question", "answers", "context", "num_docs"} of a record."""
    return {
        "id": str(record["id"]),
        "question": str(record["question"]),
        "answers": [str(a) for a in record["answers"]],
        "context": render_context(record["doc_indices"], pool),
        "num_docs": int(record["num_docs"]),
    }


class RenderedSource:
    """Random-access view of records that renders each sample on access (len, __getitem__)."""

    def __init__(self, records: Sequence[dict[str, Any]], pool: Sequence[str]):
        self._records = records
        self._pool = pool

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return render_sample(self._records[i], self._pool)


def generate(
    source: str | os.PathLike[str] | Sequence[dict[str, Any]],
    num_docs: int,
    *,
    seed: int = 0,
    filter_fn: Callable[[dict[str, Any]], bool] | None = None,
    max_questions: int | None = None,
) -> RenderedSource:
    """RULER-HotpotQA samples of `num_docs` documents from a file path or loaded questions."""
    if isinstance(source, (str, os.PathLike)):
        items = load_hotpotqa(source)
    else:
        items = validate_hotpotqa(list(source))
    pool, records = make_records(
        items, num_docs, seed=seed, filter_fn=filter_fn, max_questions=max_questions
    )
    return RenderedSource(records, pool)
