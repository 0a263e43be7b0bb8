"""Training sources by name: `data.source` in the config -> a random-access list of samples.

Built-ins: ruler_hotpotqa (a local HotpotQA file, `data.num_docs` documents per sample),
memagent_rows (MemAgent's released parquet/jsonl rows), needle_kv (the tiny default's synthetic
key-value needles). `register_source(name)` adds one.
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


def training_source(data: Any) -> Sequence[dict]:
    """The samples of `data.source` (a DataSection)."""
    if data.source == "needle_kv":
        import memagent_jax.data.needle_kv  # noqa: F401  (registers itself)
    if data.source not in _SOURCES:
        raise ValueError(f"unknown data.source {data.source!r}; known: {sorted(_SOURCES) + ['needle_kv']}")
    return _SOURCES[data.source](data)
