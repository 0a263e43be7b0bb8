"""Training sources by name: `data.source` in the config -> a random-access list of samples.

Built-ins: ruler_hotpotqa (a local HotpotQA file, `data.num_docs` documents per sample),
memagent_rows (MemAgent's released parquet/jsonl rows), jsonl (one sample a line with question,
context and answers: what the demo writes). `register_source(name)` adds one.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

SourceFactory = Callable[[Any], Sequence[dict]]
_SOURCES: dict[str, SourceFactory] = {}


def register_source(name: str) -> Callable[[SourceFactory], SourceFactory]:
    def deco(fn: SourceFactory) -> SourceFactory:
        _SOURCES[name] = fn
        return fn
    return deco


def _need_path(data: Any) -> str:
    if not data.path:
        raise ValueError(f"data.source={data.source!r} needs data.path=FILE")
    return data.path


@register_source("ruler_hotpotqa")
def _hotpotqa(data: Any) -> Sequence[dict]:
    from memagent_jax.data.hotpotqa import generate

    return generate(_need_path(data), data.num_docs, seed=data.seed, **data.options)


@register_source("memagent_rows")
def _rows(data: Any) -> Sequence[dict]:
    from memagent_jax.data.memagent_rows import read_rows

    return read_rows(_need_path(data))


@register_source("jsonl")
def _jsonl(data: Any) -> Sequence[dict]:
    import json
    from pathlib import Path

    path = Path(_need_path(data))
    if not path.is_file():
        raise FileNotFoundError(f"data.path={path} not found (data.source=jsonl reads one JSON sample a line)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object ({e.msg}); fix or remove that line") from None
        missing = [k for k in ("question", "context", "answers") if k not in row]
        if missing:
            raise ValueError(f"{path}:{n}: sample lacks {missing}; each line needs question, context, answers")
        rows.append(row)
    return rows


def training_source(data: Any) -> Sequence[dict]:
    """The samples of `data.source` (a DataSection)."""
    if data.source not in _SOURCES:
        raise ValueError(f"unknown data.source {data.source!r}; known: {sorted(_SOURCES)}")
    return _SOURCES[data.source](data)
