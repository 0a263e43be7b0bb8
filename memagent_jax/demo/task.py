"""The demo's task: key-value needles in an essay haystack, and its teacher.

A document is essay text (the package's Paul Graham essays, whitespace collapsed) with one
*target* needle "The secret code is <key><value>." and `min_distractors`-`max_distractors`
*distractor* needles with other keys; the question is "What is the secret code for <key>?" and
the answer is the value. Keys are `num_keys` essay words the tokenizer keeps whole (one token,
e.g. "school"), chosen by hash; values are the digits 0-9, so a needle reads "The secret code is
school7." Every (key, value) pair occurs in training; evaluation documents are unseen: a fresh
random stream, and any document whose needle layout (keys, values and positions) also occurs
in a training set is redrawn (`generate(..., exclude=...)`). Value and key distributions are the
same in training and evaluation.

A memory note writes the key before the value ("school7", or "none" until the code is found):
writing the key first turns "find the value of this key" into a plain copy of the token that
follows that key in the section, which a tiny transformer learns in minutes (a value-only note
did not move from chance in our trials). The final answer restates the note and boxes the value
("school7 \\boxed{7}").

Keys are ordinary essay words, so a long document also mentions them as plain words (and "disc"
starts "discover"): a policy that notes a key wherever it sees the word fails there. Training
documents may add such mentions on purpose (`max_decoys`, hard negatives); evaluation documents
have only the essays' own.

Documents are built in tokens of a given tokenizer to an exact number of `chunk_size`-token
chunks (every chunk but the last is full), and no needle straddles a chunk boundary, so "the
chunk that holds the fact" is well defined.
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

NEEDLE = "The secret code is {key}{value}."
QUESTION = "What is the secret code for {key}?"
NOTHING = "none"  # the demo's first memory, and what a note says before the code is found
VALUES = tuple("0123456789")
_NEEDLE_RE = re.compile(r"The secret code is ([a-z]+)(\d)\.")
_NOTE_RE = re.compile(r"([a-z]+)(\d)")
# Words of the templates and the needle wording are never keys.
_RESERVED = {"the", "secret", "code", "what", "problem", "memory", "section", "updated", "answer",
             "boxed", "none", "unknown", "for"}


def task_keys(tokenizer: Any, num_keys: int = 8) -> list[str]:
    """The task's keys: `num_keys` of the tokenizer's whole-word essay pieces ("▁word", 4+
    lowercase letters, one token with its leading space), the first by crc32 order."""
    essay_vocab = set(essay_words())
    words = []
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.id_to_piece(i) if hasattr(tokenizer, "id_to_piece") else tokenizer.decode([i])
        word = piece.replace("\u2581", " ")
        if (not re.fullmatch(r" [a-z]{4,}", word) or word[1:] in _RESERVED
                or word[1:] not in essay_vocab):
            continue
        if tokenizer.encode(word) == [i]:
            words.append(word[1:])
    if len(words) < max(2, num_keys):
        raise ValueError(f"needle task: the tokenizer has only {len(words)} whole-word keys, {num_keys} "
                         "asked; train it on task.tokenizer_corpus() with vocab_size >= 512")
    return sorted(words, key=lambda w: (zlib.crc32(w.encode()), w))[:num_keys]


def needles_in(text: str) -> list[tuple[str, str]]:
    """(key, value) of every needle in `text`, in order."""
    return _NEEDLE_RE.findall(text)


def needle_text(key: str, value: str) -> str:
    return NEEDLE.format(key=key, value=value)


def question_text(key: str) -> str:
    return QUESTION.format(key=key)


def note_text(key: str | None, value: str | None) -> str:
    """A memory note: key then value (" school7": the leading space makes the key the same token
    as in the needle), or "none" before a code is noted."""
    return f" {key}{value}" if key and value else NOTHING


def parse_note(memory_text: str) -> tuple[str, str] | None:
    """(key, value) of a note, or None ("none" or anything else)."""
    m = _NOTE_RE.fullmatch(memory_text.strip())
    return (m.group(1), m.group(2)) if m else None


def answer_text(memory_text: str) -> str:
    """The final answer from a memory: the note restated, then its value boxed."""
    note = parse_note(memory_text)
    return f"{note_text(*note)} \\boxed{{{note[1]}}}" if note else f"{NOTHING} \\boxed{{{NOTHING}}}"
@dataclasses.dataclass(frozen=True)
class NeedleSpec:
    """How documents are built: length in chunks of `chunk_size` tokens, how many distractors,
    how many keys the task draws from. `name` tags the documents' ids (e.g. "rl", "eval_4x")."""

    chunk_size: int = 32
    num_chunks: int = 3
    min_distractors: int = 1
    max_distractors: int = 3
    num_keys: int = 8
    name: str = "train"
    max_decoys: int = 0  # up to this many plain-word mentions of keys in the haystack (hard negatives)

    def __post_init__(self) -> None:
        if self.num_keys < self.max_distractors + 1:
            raise ValueError(f"needle task: num_keys must exceed max_distractors ({self})")
        if self.chunk_size < 16 or self.num_chunks < 1:
            raise ValueError(f"needle task: need chunk_size >= 16 and num_chunks >= 1, got {self}")
        if not 0 <= self.min_distractors <= self.max_distractors:
            raise ValueError(f"needle task: need 0 <= min_distractors <= max_distractors, got {self}")


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
    distractor keys, needles in document order, layout, num_chunks, num_tokens). `keys` defaults
    to `task_keys(tokenizer, spec.num_keys)`."""
    count = counter or _TokenCounter(tokenizer)
    keys = keys if keys is not None else task_keys(tokenizer, spec.num_keys)
    values = VALUES
    n_dis = int(rng.integers(spec.min_distractors, spec.max_distractors + 1))
    key, *dis_keys = [keys[i] for i in rng.choice(len(keys), size=n_dis + 1, replace=False)]
    value, *dis_values = [values[i] for i in rng.choice(len(values), size=n_dis + 1, replace=False)]
    needles = [(needle_text(key, value), True)] + [(needle_text(k, v), False)
                                                   for k, v in zip(dis_keys, dis_values)]
    doc = place_needles(spec, tokenizer, rng, needles, key, keys, essays_dir=essays_dir, counter=count)
    ids = doc.pop("ids")
    target_chunk = _chunk_of(ids, spec.chunk_size, tokenizer, needle_text(key, value))
    if target_chunk is None:
        raise RuntimeError(f"needle task: the target needle is in no chunk of a document for {spec}; "
                           "the tokenizer does not split on spaces as expected")
    return {
        "id": f"needle-{spec.name}-{spec.num_chunks}x{spec.chunk_size}-{index}",
        "question": question_text(key), "context": doc["context"], "answers": [value],
        "key": key, "value": value, "needle_chunk": target_chunk,
        "distractor_keys": dis_keys[:doc["placed"] - 1], "needles": doc["needles"],
        "layout": doc["layout"], "num_chunks": doc["num_chunks"], "num_tokens": doc["num_tokens"],
    }


def place_needles(spec: NeedleSpec, tokenizer: Encoder, rng: np.random.Generator,
                  needles: Sequence[tuple[str, bool]], key: str, keys: Sequence[str], *,
                  essays_dir: str = DEFAULT_ESSAYS_DIR, counter: _TokenCounter | None = None
                  ) -> dict[str, Any]:
    """Essay haystack of exactly `spec.num_chunks` chunks with `needles` ((text, is_target), the
    targets first) inside chunks, none straddling a boundary.

    Each needle goes to a random chunk among those that keep a quarter of their tokens haystack,
    chunks without a needle first (one fact per chunk where possible); needles that find no room
    are dropped from the end (short documents). Training documents may add plain-word mentions of
    keys (`spec.max_decoys`, half of them `key`). Returns context, ids, placed (needles kept),
    needles ((key, value) in document order), layout ([key, value, token offset] each),
    needle_chunks (each kept needle's chunk, in the order given), num_chunks, num_tokens.
    """
    count = counter or _TokenCounter(tokenizer)
    needles = list(needles)
    target_tokens = spec.num_chunks * spec.chunk_size
    sizes = [count(" " + t) for t, _ in needles]
    if max(sizes) > spec.chunk_size // 2:
        raise ValueError(f"needle task: a needle of {max(sizes)} tokens needs chunk_size >= "
                         f"{2 * max(sizes)} (got {spec.chunk_size})")
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
    needles, sizes = needles[:len(chunks_list)], sizes[:len(chunks_list)]
    chunks = np.array(chunks_list)
    order = np.lexsort((rng.random(len(needles)), chunks))  # by chunk, random within a chunk

    # Haystack words (with their leading space) until the document is full.
    words = essay_words(essays_dir)
    start = int(rng.integers(len(words)))
    needle_tokens = sum(sizes)
    items: list[tuple[str, int, bool | None]] = []  # (text with leading space, tokens, needle?)
    total, pos = 0, start
    # Decoys: key words as plain haystack words (half of them the question's key), never a needle.
    n_decoys = int(rng.integers(0, spec.max_decoys + 1)) if spec.max_decoys else 0
    decoy_at = sorted(rng.integers(1, max(2, target_tokens - needle_tokens), size=n_decoys).tolist())
    decoy_keys = [key if rng.random() < 0.5 else keys[int(rng.integers(len(keys)))] for _ in range(n_decoys)]
    while total < target_tokens - needle_tokens:
        if decoy_at and total >= decoy_at[0]:
            decoy_at.pop(0)
            w = " " + decoy_keys.pop()
        else:
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
            raise ValueError(f"needle task: {len(needles)} needles do not fit {spec.num_chunks} "
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
    if n_chunks != spec.num_chunks:
        raise RuntimeError(
            f"needle task: built a document of {len(ids)} tokens ({n_chunks} chunks) for {spec}; "
            "the tokenizer does not split on spaces as expected")
    in_order = [needles_in(it[0])[0] for it in items if it[2] is not None]
    offsets = np.cumsum([0] + [it[1] for it in items])[:-1]
    layout = [[k, v, int(o)] for (k, v), o in zip(in_order, (o for o, it in zip(offsets, items)
                                                             if it[2] is not None))]
    offset_of = {it[0][1:]: int(o) for o, it in zip(offsets, items) if it[2] is not None}
    return {"context": context, "ids": ids, "placed": len(needles),
            "needles": [[k, v] for k, v in in_order], "layout": layout,
            "needle_chunks": [offset_of[t] // spec.chunk_size for t, _ in needles],
            "num_chunks": n_chunks, "num_tokens": len(ids)}


def _chunk_of(ids: Sequence[int], chunk_size: int, tokenizer: Any, text: str) -> int | None:
    """Index of the chunk whose decoded text contains `text`, or None."""
    for c in range(0, len(ids), chunk_size):
        if text in tokenizer.decode(ids[c:c + chunk_size]):
            return c // chunk_size
    return None


def layout_key(sample: dict[str, Any]) -> tuple:
    """A document's needle layout: its length and every needle's (key, value, token offset)."""
    return (sample["num_chunks"], *(tuple(n) for n in sample["layout"]))


def generate(spec: NeedleSpec, tokenizer: Encoder, num_docs: int, *, seed: int = 0,
             essays_dir: str = DEFAULT_ESSAYS_DIR, progress: Any = None,
             exclude: set[tuple] | None = None, build: Any = None) -> list[dict[str, Any]]:
    """`num_docs` samples of `spec`; the same (spec, seed, exclude) gives the same samples.

    A document whose `layout_key` is in `exclude` (e.g. the training sets' layouts) is redrawn.
    `progress(n)` (e.g. a tqdm bar's update) is called after each document. `build`: the sample
    builder (default `build_sample`; the multi-value task's is `multivalue.build_sample`).
    """
    build = build or build_sample
    tags = [zlib.crc32(spec.name.encode()), spec.num_chunks, spec.chunk_size]
    rng = np.random.default_rng([int(seed), *tags])
    counter = _TokenCounter(tokenizer)
    keys = task_keys(tokenizer, spec.num_keys)
    out = []
    while len(out) < num_docs:
        sample = build(spec, tokenizer, rng, essays_dir=essays_dir, counter=counter,
                       keys=keys, index=len(out))
        if exclude and layout_key(sample) in exclude:
            continue
        out.append(sample)
        if progress is not None:
            progress(1)
    return out


def tokenizer_corpus(essays_dir: str = DEFAULT_ESSAYS_DIR) -> list[str]:
    """Texts to train the demo tokenizer on: the essays (whose whole-word pieces become the keys)
    and the needle / question / note / answer wording, with every digit as a value."""
    frames = [f"{question_text('')} {needle_text('', v)} {NOTHING} {v} \\boxed{{{v}}}" for v in VALUES]
    return [" ".join(essay_words(essays_dir)), "\n\n".join(frames * 20)]


class NeedleTeacher:
    """The warm start's teacher (`rl.sft.Teacher`). Its memory is one note (`note_text`).

    A careful teacher notes "<key><value>" when a chunk holds the question key's needle and
    otherwise repeats its note; a careless one (a `careless` fraction of documents, chosen by hash
    of the document id) notes the FIRST needle it sees, whatever its key, and keeps it. The final
    answer restates the note and boxes its value (`answer_text`).

    The carelessness is the flaw RL must remove: imitating both, the warm start often notes a
    distractor when one comes before the target, so its sampled groups disagree exactly where
    reading the key pays; the reward (exact match of the boxed answer) teaches it to read."""

    def __init__(self, careless: float = 0.0) -> None:
        if not 0.0 <= careless <= 1.0:
            raise ValueError(f"NeedleTeacher: careless must be in [0, 1], got {careless}")
        self.careless = careless

    def is_careless(self, sample: dict[str, Any]) -> bool:
        return zlib.crc32(str(sample["id"]).encode()) % 10_000 < self.careless * 10_000

    def memory_reply(self, sample: dict[str, Any], chunk_text: str, memory_text: str) -> str:
        if parse_note(memory_text):
            return note_text(*parse_note(memory_text))
        found = needles_in(chunk_text)
        if not self.is_careless(sample):
            found = [(k, v) for k, v in found if k == sample["key"]]
        return note_text(*found[0]) if found else NOTHING

    def final_reply(self, sample: dict[str, Any], memory_text: str) -> str:
        return answer_text(memory_text)


def write_jsonl(samples: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Writes samples one JSON object a line (atomically: a .tmp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The samples of a JSONL file written by `write_jsonl`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"needle task: {path} not found (the demo's data stage writes it)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
