"""MemAgent's released row format (parquet or jsonl), read into and written from sample dicts.

One row per question (docs/reference.md section 5)::

    data_source:  "hotpotqa"
    prompt:       [{"role": "user", "content": question}]
    context:      the rendered document
    reward_model: {"ground_truth": [answer, ...], "style": "rule"}
    extra_info:   {"index": int, "question": str, "num_docs": int}

A sample dict is {"id", "question", "answers", "context", "num_docs"} (as in `hotpotqa`).
The file format follows the suffix: ``.parquet`` (pyarrow) or ``.jsonl`` / ``.json`` lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

REQUIRED_COLUMNS: tuple[str, ...] = ("context", "reward_model")
EXPECTED_SCHEMA = (
    "expected MemAgent rows with columns data_source, prompt=[{role, content}], context, "
    "reward_model={ground_truth: [answers], style}, extra_info={index, question, num_docs}"
)


class RowFormatError(ValueError):
    """A row file lacks a column (or field) that MemAgent rows must have."""


def _format_of(path: str) -> str:
    lower = path.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".jsonl", ".json")):
        return "jsonl"
    raise ValueError(f"{path!r}: unknown row file type; use a .parquet or .jsonl file")


def sample_to_row(
    sample: dict[str, Any], index: int, data_source: str = "hotpotqa"
) -> dict[str, Any]:
    """One sample dict as a MemAgent row."""
    question = str(sample["question"])
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": question}],
        "context": str(sample["context"]),
        "reward_model": {"ground_truth": [str(a) for a in sample["answers"]], "style": "rule"},
        "extra_info": {
            "index": int(index),
            "question": question,
            "num_docs": int(sample.get("num_docs", 0) or 0),
        },
    }


def row_to_sample(row: dict[str, Any], n: int, source: str = "<rows>") -> dict[str, Any]:
    """One MemAgent row as a sample dict; `n` (the row number) is the id without extra_info."""
    for col in REQUIRED_COLUMNS:
        if col not in row or row[col] is None:
            raise RowFormatError(f"{source}: row {n} has no column {col!r}; {EXPECTED_SCHEMA}")
    reward = row["reward_model"]
    if not isinstance(reward, dict) or "ground_truth" not in reward:
        raise RowFormatError(
            f"{source}: row {n} column 'reward_model' has no field 'ground_truth'; "
            f"{EXPECTED_SCHEMA}"
        )
    truth = reward["ground_truth"]
    answers = [str(truth)] if isinstance(truth, str) else [str(a) for a in truth]
    extra = row.get("extra_info") or {}
    question = extra.get("question")
    if question is None:
        prompt = row.get("prompt") or []
        users = [
            m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"
        ]
        if not users:
            raise RowFormatError(
                f"{source}: row {n} has neither 'extra_info.question' nor a user message in "
                f"'prompt'; {EXPECTED_SCHEMA}"
            )
        question = users[-1]
    index = extra.get("index", n)
    return {
        "id": str(index if index is not None else n),
        "question": str(question),
        "answers": answers,
        "context": str(row["context"]),
        "num_docs": int(extra.get("num_docs") or 0),
    }


def write_rows(
    samples: Iterable[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    data_source: str = "hotpotqa",
) -> str:
    """Write samples as MemAgent rows (format from the suffix); returns the path."""
    path = os.fspath(path)
    fmt = _format_of(path)
    rows = [sample_to_row(s, i, data_source) for i, s in enumerate(samples)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a MemAgent row file (parquet or jsonl) into sample dicts."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"row file {path!r} not found")
    fmt = _format_of(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for col in REQUIRED_COLUMNS:
            if col not in table.column_names:
                raise RowFormatError(
                    f"{path}: no column {col!r} (columns: {table.column_names}); {EXPECTED_SCHEMA}"
                )
        rows = table.to_pylist()
    else:
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise RowFormatError(f"{path}:{line_no}: not a JSON object ({e})") from e
    return [row_to_sample(row, n, source=path) for n, row in enumerate(rows)]
