"""needle_kv: the tiny default's task, key-value needles in an essay haystack.

A document is essay text (the package's Paul Graham essays, whitespace collapsed) with one
*target* needle "The secret code is <key><value>." and 1-3 *distractor* needles with other keys;
the question is "What is the secret code for <key>?" and the answer is the value. Keys are essay
words the tokenizer keeps whole (one token, e.g. "programming"); values are a digit and a capital
letter ("5G"), so a needle reads "The secret code is programming5G.".

Documents are built in tokens of a given tokenizer to an exact number of `chunk_size`-token
chunks (every chunk but the last is full), and no needle straddles a chunk boundary, so "the
chunk that holds the fact" is well defined (the warm start's teacher uses it). Evaluation keys
and values never occur in training needles: both are split by a hash (a held-out key is an
essay word whose embedding is trained only as haystack; held-out values use the same digits
and letters in new pairs). Needles go to different chunks where the document has room.

`register_source("needle_kv")`: `data.path` = a JSONL file of samples (written by the demo), or
else `data.num_docs` samples generated from `data.options` (tokenizer, chunk_size, num_chunks,
split, min_distractors, max_distractors).
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memagent_jax.data.ruler_haystack import DEFAULT_ESSAYS_DIR, Encoder, cycled, essay_words
from memagent_jax.data.sources import register_source

SPLITS = ("train", "eval")
NEEDLE = "The secret code is {key}{value}."
QUESTION = "What is the secret code for {key}?"
NOTHING = "none"  # the demo's first memory, and what a note says before the code is found
EVAL_KEY_FRACTION = 8  # one key word in 8 is held out for evaluation
_NEEDLE_RE = re.compile(r"The secret code is ([a-z]+)(\d[A-Z])\.")
_NOTE_RE = re.compile(r"(\d[A-Z])$")
# Words of the templates and the needle wording are never keys.
_RESERVED = {"the", "secret", "code", "what", "problem", "memory", "section", "updated", "answer",
             "boxed", "none", "unknown", "for"}


def key_split(key: str) -> str:
    """"eval" for the held-out eighth of all key words (by crc32), else "train"."""
    return "eval" if zlib.crc32(key.encode()) % EVAL_KEY_FRACTION == 0 else "train"


def split_keys(tokenizer: Any, split: str) -> list[str]:
    """Key words of a split: the tokenizer's whole-word pieces ("▁word", 4+ lowercase letters,
    one token with its leading space), held out by hash. Keys are ordinary essay words: their
    embeddings are trained as inputs on the haystack, but held-out ones are never a needle's key
    in training."""
    _check_split(split)
    essay_vocab = set(essay_words())
    words = []
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.id_to_piece(i) if hasattr(tokenizer, "id_to_piece") else tokenizer.decode([i])
        word = piece.replace("\u2581", " ")
        if (not re.fullmatch(r" [a-z]{4,}", word) or word[1:] in _RESERVED
                or word[1:] not in essay_vocab):
            continue
        if tokenizer.encode(word) == [i] and key_split(word[1:]) == split:
            words.append(word[1:])
    if len(words) < 8:
        raise ValueError(f"needle_kv: the tokenizer has only {len(words)} whole-word {split} keys; "
                         "train it on needle_kv.tokenizer_corpus() with vocab_size >= 512")
    return sorted(words)


def split_values(split: str) -> list[str]:
    """All values of a split: a digit and a capital letter ("7K", 260 in all; a tiny model copies
    two tokens of different kinds without mixing up their order), eval = crc32 % 4 == 0."""
    _check_split(split)
    want_eval = split == "eval"
    every = [d + c for d in "0123456789" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    return [v for v in every if (zlib.crc32(v.encode()) % 4 == 0) == want_eval]


def needles_in(text: str) -> list[tuple[str, str]]:
    """(key, value) of every needle in `text`, in order."""
    return _NEEDLE_RE.findall(text)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"needle_kv: unknown split {split!r}; expected one of {SPLITS}")
    return split


def needle_text(key: str, value: str) -> str:
    return NEEDLE.format(key=key, value=value)


def question_text(key: str) -> str:
    return QUESTION.format(key=key)


@dataclasses.dataclass(frozen=True)
class NeedleSpec:
    """How documents are built: length in chunks of `chunk_size` tokens, split, distractor range.
    `key_split` draws the keys from another split than the values (e.g. training keys with
    held-out codes); empty = `split`."""

    chunk_size: int = 64
    num_chunks: int = 3
    split: str = "train"
    min_distractors: int = 1
    max_distractors: int = 3
    key_split: str = ""

    @property
    def keys_from(self) -> str:
        return self.key_split or self.split

    def __post_init__(self) -> None:
        _check_split(self.split)
        _check_split(self.keys_from)
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
                 keys: Sequence[str] | None = None, index: int = 0) -> dict[str, Any]:
    """One sample dict: question, context, answers, and metadata (key, value, needle_chunk,
    distractor keys, num_chunks, num_tokens). `keys` defaults to `split_keys(tokenizer, split)`."""
    count = counter or _TokenCounter(tokenizer)
    keys = keys if keys is not None else split_keys(tokenizer, spec.keys_from)
    values = split_values(spec.split)
    n_dis = int(rng.integers(spec.min_distractors, spec.max_distractors + 1))
    key, *dis_keys = [keys[i] for i in rng.choice(len(keys), size=n_dis + 1, replace=False)]
    value, *dis_values = [values[i] for i in rng.choice(len(values), size=n_dis + 1, replace=False)]
    needles = [(needle_text(key, value), True)] + [(needle_text(k, v), False)
                                                   for k, v in zip(dis_keys, dis_values)]
    target_tokens = spec.num_chunks * spec.chunk_size
    sizes = [count(" " + t) for t, _ in needles]
    if max(sizes) > spec.chunk_size // 2:
        raise ValueError(f"needle_kv: a needle of {max(sizes)} tokens needs chunk_size >= "
                         f"{2 * max(sizes)} (got {spec.chunk_size})")
    # Each needle's chunk, at random among chunks that keep a quarter of their tokens haystack
    # (empty chunks first); distractors that find no room are dropped (short documents).
    load = np.zeros(spec.num_chunks, np.int64)
    chunks_list: list[int] = []
    for n_tok in sizes:  # chunks without a needle first: one fact per chunk where possible
        fits = load + n_tok <= spec.chunk_size * 3 // 4
        free = np.flatnonzero(fits & (load == 0))
        free = free if len(free) else np.flatnonzero(fits)
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
        "id": f"needle_kv-{spec.split}{'-' + spec.key_split + 'keys' if spec.key_split else ''}"
              f"-{spec.num_chunks}x{spec.chunk_size}-{index}",
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
    if spec.key_split and spec.key_split != spec.split:
        tags.append(zlib.crc32(spec.key_split.encode()))
    rng = np.random.default_rng([int(seed), *tags])
    counter = _TokenCounter(tokenizer)
    keys = split_keys(tokenizer, spec.keys_from)
    out = []
    for i in range(num_docs):
        out.append(build_sample(spec, tokenizer, rng, essays_dir=essays_dir, counter=counter,
                                keys=keys, index=i))
        if progress is not None:
            progress(1)
    return out


def tokenizer_corpus(essays_dir: str = DEFAULT_ESSAYS_DIR) -> list[str]:
    """Texts to train the demo tokenizer on: the essays (whose whole-word pieces become the keys)
    and the needle / question / answer wording."""
    frame = f"{question_text('')} {needle_text('', '7K')} {NOTHING} \\boxed{{3Q}}"
    return [" ".join(essay_words(essays_dir)), "\n\n".join([frame] * 50)]


def note_text(key: str, value: str | None) -> str:
    """A memory note: the noted code ("5G"), or "none" before one is found. `key` (the question's
    key) is not repeated: notes that began with the key were tried, and within the demo's SFT
    budget the tiny policy did not learn to copy the key from the question."""
    return value if value else NOTHING


def noted_value(memory_text: str) -> str | None:
    """The code a note holds, or None."""
    m = _NOTE_RE.search(memory_text.strip())
    return m.group(1) if m else None


class NeedleTeacher:
    """The warm start's teacher (`rl.sft.Teacher`). Its memory is one note (`note_text`). A careful teacher notes the code when a chunk holds the key's needle and
    otherwise repeats its note; a careless one (a `careless` fraction of documents, chosen by
    hash of the document id) notes the FIRST code it sees, whatever the needle's key, and keeps
    it. The final answer boxes the noted code.

    The carelessness is the flaw RL must remove: imitating both, the warm start sometimes notes a
    distractor's code when one comes before the target, so its sampled groups disagree exactly
    where reading the key pays; the reward (exact match of the boxed answer) teaches it to read."""

    def __init__(self, careless: float = 0.0) -> None:
        if not 0.0 <= careless <= 1.0:
            raise ValueError(f"NeedleTeacher: careless must be in [0, 1], got {careless}")
        self.careless = careless

    def is_careless(self, sample: dict[str, Any]) -> bool:
        return zlib.crc32(str(sample["id"]).encode()) % 10_000 < self.careless * 10_000

    def memory_reply(self, sample: dict[str, Any], chunk_text: str, memory_text: str) -> str:
        key, noted = sample["key"], noted_value(memory_text)
        if noted:
            return note_text(key, noted)
        found = needles_in(chunk_text)
        if self.is_careless(sample):
            return note_text(key, found[0][1] if found else None)
        return note_text(key, next((v for k, v in found if k == key), None))

    def final_reply(self, sample: dict[str, Any], memory_text: str) -> str:
        return "\\boxed{" + (noted_value(memory_text) or NOTHING) + "}"


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
