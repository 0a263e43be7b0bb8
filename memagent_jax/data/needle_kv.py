"""needle_kv: the tiny default's task, key-value needles in an essay haystack.

A document is essay text (the package's Paul Graham essays, whitespace collapsed) with one
*target* needle "The secret code of <key> is <value>." and 1-3 *distractor* needles with other
keys; the question is "What is the secret code of <key>?" and the answer is the value.

Documents are built in tokens of a given tokenizer to an exact number of `chunk_size`-token
chunks (every chunk but the last is full, the last holds at least one token), and no needle
straddles a chunk boundary, so "the chunk that holds the fact" is well defined (the teacher of
the warm start uses it). Evaluation keys and values are disjoint from training ones: keys are
`<adjective>-<noun>` with separate word lists per split, values are 4-digit numbers split by a
hash (not by range, so every digit appears in every position in both splits).

`register_source("needle_kv")`: `data.path` = a JSONL file of samples (written by the demo), or
else `data.num_docs` samples generated from `data.options` (tokenizer, chunk_size, num_chunks,
split, distractors).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memagent_jax.data.ruler_haystack import DEFAULT_ESSAYS_DIR, Encoder, cycled, essay_words
from memagent_jax.data.sources import register_source

SPLITS = ("train", "eval")
NEEDLE = "The secret code of {key} is {value}."
QUESTION = "What is the secret code of {key}?"

# Key words per split (disjoint). Keys are "<adjective>-<noun>".
_WORDS = {
    "train": (
        ("red", "blue", "green", "dark", "bright", "cold", "warm", "quiet", "loud", "small", "big",
         "old", "young", "fast", "slow", "soft", "hard", "sweet", "wild", "calm", "tall", "short",
         "rich", "poor", "clean", "dirty", "happy", "sad", "busy", "empty", "full", "heavy", "light",
         "sharp", "round", "flat", "deep", "thin", "thick", "early", "late", "brown", "white",
         "black", "silver", "golden", "purple", "orange", "yellow", "tiny"),
        ("fox", "owl", "wolf", "bear", "hawk", "fish", "frog", "lion", "goat", "duck", "crow",
         "deer", "seal", "crab", "moth", "swan", "mole", "hare", "lamb", "toad", "river", "stone",
         "tree", "cloud", "star", "moon", "lake", "hill", "road", "door", "box", "ship", "car",
         "bell", "lamp", "book", "coin", "ring", "key", "boat", "tower", "bridge", "garden",
         "castle", "window", "mirror", "candle", "basket", "engine", "anchor"),
    ),
    "eval": (
        ("brave", "proud", "lazy", "grey", "pink", "shy", "noble", "humble", "fierce", "gentle",
         "rusty", "misty", "lucky", "jolly", "eager", "mellow"),
        ("cat", "dog", "bee", "ant", "pig", "cow", "rat", "bat", "kettle", "violin", "walrus",
         "tulip", "parrot", "otter", "lantern", "meadow"),
    ),
}


def split_keys(split: str) -> list[str]:
    """All keys of a split: `<adjective>-<noun>` over that split's own word lists."""
    adjectives, nouns = _WORDS[_check_split(split)]
    return [f"{a}-{n}" for a in adjectives for n in nouns]


def split_values(split: str) -> list[str]:
    """All values of a split: 4-digit numbers, eval = crc32 % 4 == 0 (a quarter), train = the rest."""
    _check_split(split)
    want_eval = split == "eval"
    return [str(v) for v in range(1000, 10000) if (zlib.crc32(str(v).encode()) % 4 == 0) == want_eval]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"needle_kv: unknown split {split!r}; expected one of {SPLITS}")
    return split


def needle_text(key: str, value: str) -> str:
    return NEEDLE.format(key=key, value=value)


def question_text(key: str) -> str:
    return QUESTION.format(key=key)


def fact_text(value: str) -> str:
    """The memory the warm-start teacher writes once it has read the target needle.

    The key is left out on purpose: a model can only write tokens it was trained to emit, and
    held-out keys are made of word pieces that training keys need not contain; the question,
    shown in every turn, already says whose code it is."""
    return f"secret code: {value}"


@dataclasses.dataclass(frozen=True)
class NeedleSpec:
    """How documents are built: length in chunks of `chunk_size` tokens, split, distractor range."""

    chunk_size: int = 64
    num_chunks: int = 3
    split: str = "train"
    min_distractors: int = 1
    max_distractors: int = 3

    def __post_init__(self) -> None:
        _check_split(self.split)
        if self.chunk_size < 16 or self.num_chunks < 1:
            raise ValueError(f"needle_kv: need chunk_size >= 16 and num_chunks >= 1, got {self}")
        if not 0 <= self.min_distractors <= self.max_distractors:
            raise ValueError(f"needle_kv: need 0 <= min_distractors <= max_distractors, got {self}")


class _TokenCounter:
    """Token counts of words with their leading space, cached (SentencePiece splits on spaces,
    so a space-joined text has the sum of its words' counts; `build_sample` checks it)."""

    def __init__(self, tokenizer: Encoder) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self.cache.get(text)
        if n is None:
            n = self.cache[text] = len(self.tokenizer.encode(text))
        return n


def build_sample(spec: NeedleSpec, tokenizer: Encoder, rng: np.random.Generator, *,
                 essays_dir: str = DEFAULT_ESSAYS_DIR, counter: _TokenCounter | None = None,
                 index: int = 0) -> dict[str, Any]:
    """One sample dict: question, context, answers, and metadata (key, value, needle_chunk,
    distractor keys, num_chunks, num_tokens)."""
    count = counter or _TokenCounter(tokenizer)
    keys, values = split_keys(spec.split), split_values(spec.split)
    n_dis = int(rng.integers(spec.min_distractors, spec.max_distractors + 1))
    picked = rng.choice(len(keys), size=n_dis + 1, replace=False)
    key, dis_keys = keys[picked[0]], [keys[i] for i in picked[1:]]
    value, *dis_values = [values[i] for i in rng.choice(len(values), size=n_dis + 1, replace=False)]
    needles = [(needle_text(key, value), True)] + [(needle_text(k, v), False)
                                                   for k, v in zip(dis_keys, dis_values)]
    target_tokens = spec.num_chunks * spec.chunk_size
    sizes = [count(" " + t) for t, _ in needles]
    if max(sizes) > spec.chunk_size // 2:
        raise ValueError(f"needle_kv: a needle of {max(sizes)} tokens needs chunk_size >= "
                         f"{2 * max(sizes)} (got {spec.chunk_size})")
    # Each needle's chunk, at random among chunks that keep a quarter of their tokens haystack;
    # distractors that find no room are dropped (short documents hold fewer of them).
    load = np.zeros(spec.num_chunks, np.int64)
    chunks_list: list[int] = []
    for n_tok in sizes:
        free = np.flatnonzero(load + n_tok <= spec.chunk_size * 3 // 4)
        if not len(free):
            break
        chunks_list.append(int(free[rng.integers(len(free))]))
        load[chunks_list[-1]] += n_tok
    needles, sizes, dis_keys = needles[:len(chunks_list)], sizes[:len(chunks_list)], dis_keys[:len(chunks_list) - 1]
    chunks = np.array(chunks_list)
    order = np.lexsort((rng.random(len(needles)), chunks))  # by chunk, random within a chunk

    # Haystack words (with their leading space) until the document is full.
    words = essay_words(essays_dir)
    start = int(rng.integers(len(words)))
    needle_tokens = sum(sizes)
    items: list[tuple[str, int, bool | None]] = []  # (text with leading space, tokens, needle?)
    total, pos = 0, start
    while total < target_tokens - needle_tokens:
        w = (" " if items else "") + cycled(words, pos, 1)[0]  # no space before the first word
        pos += 1
        items.append((w, count(w), None))
        total += items[-1][1]

    last = 1  # needles go in increasing position (after the first word, after earlier needles)
    for j, i in enumerate(order):
        text, is_target = needles[i]
        text, n_tok = " " + text, sizes[i]
        prefix = np.concatenate([[0], np.cumsum([it[1] for it in items])])
        # Its own chunk first (leaving room for the chunk's later needles), else the next chunks.
        for c in [*range(int(chunks[i]), spec.num_chunks), *range(int(chunks[i]))]:
            lo, hi = c * spec.chunk_size, (c + 1) * spec.chunk_size
            room = n_tok + sum(sizes[i2] for i2 in order[j + 1:] if chunks[i2] == c)
            ok = [k for k in range(last, len(items) + 1) if lo <= prefix[k] and prefix[k] + room <= hi]
            if ok:
                break
        else:
            raise ValueError(f"needle_kv: {len(needles)} needles do not fit {spec.num_chunks} "
                             f"chunks of {spec.chunk_size} tokens; use fewer distractors")
        k = ok[int(rng.integers(len(ok)))]
        items.insert(k, (text, n_tok, is_target))
        last = k + 1

    # Trim haystack from the end so the document holds exactly num_chunks chunks.
    while sum(it[1] for it in items) > target_tokens and items[-1][2] is None:
        items.pop()
    context = "".join(it[0] for it in items)
    ids = tokenizer.encode(context)
    n_chunks = -(-len(ids) // spec.chunk_size)
    target_chunk = _chunk_of(ids, spec.chunk_size, tokenizer, needle_text(key, value))
    if n_chunks != spec.num_chunks or target_chunk is None:
        raise RuntimeError(
            f"needle_kv: built a document of {len(ids)} tokens ({n_chunks} chunks, target needle in "
            f"chunk {target_chunk}) for {spec}; the tokenizer does not split on spaces as expected")
    return {
        "id": f"needle_kv-{spec.split}-{spec.num_chunks}x{spec.chunk_size}-{index}",
        "question": question_text(key), "context": context, "answers": [value],
        "key": key, "value": value, "needle_chunk": target_chunk,
        "distractor_keys": dis_keys, "num_chunks": n_chunks, "num_tokens": len(ids),
    }


def _chunk_of(ids: Sequence[int], chunk_size: int, tokenizer: Any, text: str) -> int | None:
    """Index of the chunk whose decoded text contains `text`, or None."""
    for c in range(0, len(ids), chunk_size):
        if text in tokenizer.decode(ids[c:c + chunk_size]):
            return c // chunk_size
    return None


def generate(spec: NeedleSpec, tokenizer: Encoder, num_docs: int, *, seed: int = 0,
             essays_dir: str = DEFAULT_ESSAYS_DIR, progress: Any = None) -> list[dict[str, Any]]:
    """`num_docs` samples of `spec`; the same (spec, seed) gives the same samples.

    `progress(n)` (e.g. a tqdm bar's update) is called after each document.
    """
    tags = [zlib.crc32(spec.split.encode()), spec.num_chunks, spec.chunk_size]
    rng = np.random.default_rng([int(seed), *tags])
    counter = _TokenCounter(tokenizer)
    out = []
    for i in range(num_docs):
        out.append(build_sample(spec, tokenizer, rng, essays_dir=essays_dir, counter=counter, index=i))
        if progress is not None:
            progress(1)
    return out


def tokenizer_corpus(essays_dir: str = DEFAULT_ESSAYS_DIR) -> list[str]:
    """Texts to train the demo tokenizer on: the essays and the needle / question / answer
    wording, WITHOUT any key: train and eval keys are cut into pieces of the same essay
    vocabulary, so held-out keys are no rarer for the tokenizer than training ones."""
    frame = (f"{question_text('')} {needle_text('', '1234')} {fact_text('5678')} "
             "\\boxed{9012}")
    return [" ".join(essay_words(essays_dir)), "\n\n".join([frame] * 50)]


class NeedleTeacher:
    """The warm start's teacher (`rl.sft.Teacher`): keep the memory verbatim until the chunk that
    holds the TARGET needle, then write "secret code: <value>" and keep that; distractors are
    ignored.
    The final answer boxes the value."""

    def memory_reply(self, sample: dict[str, Any], chunk_text: str, memory_text: str) -> str:
        if needle_text(sample["key"], sample["value"]) in chunk_text:
            return fact_text(sample["value"])
        return memory_text

    def final_reply(self, sample: dict[str, Any], memory_text: str) -> str:
        return "\\boxed{" + sample["value"] + "}"


def write_jsonl(samples: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"needle_kv: {path} not found (write it with needle_kv.write_jsonl)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@register_source("needle_kv")
def needle_kv_source(data: Any) -> list[dict[str, Any]]:
    """Training samples: `data.path` (JSONL) if set, else generated from `data.options`
    {tokenizer (dir, required), chunk_size, num_chunks, split, min_distractors, max_distractors}."""
    if data.path:
        return read_jsonl(data.path)
    opts = dict(data.options)
    tok_dir = opts.pop("tokenizer", None)
    if not tok_dir:
        raise ValueError("data.source=needle_kv needs data.path=FILE.jsonl or "
                         "data.options.tokenizer=DIR (documents are measured in its tokens)")
    from memagent_jax.tokenizer import load_tokenizer

    fields = {f.name for f in dataclasses.fields(NeedleSpec)}
    unknown = sorted(set(opts) - fields)
    if unknown:
        raise ValueError(f"unknown data.options {unknown} for needle_kv; known: {sorted(fields | {'tokenizer'})}")
    return generate(NeedleSpec(**opts), load_tokenizer(tok_dir), data.num_docs, seed=data.seed)
