"""The files of an evaluation (`memagent_jax.eval`): results.json (settings, then every cell with its
per-sample records), results.csv, report.md (accuracy and cost tables in the style of
docs/reference.md section 6) and the PNG plots, written atomically after every cell."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memagent_jax.plots import format_length, plot_accuracy_vs_length, plot_heatmap

RESULTS_JSON, RESULTS_CSV, REPORT_MD = "results.json", "results.csv", "report.md"
PLOTS = ("accuracy_vs_length.png", "heatmap.png")
CSV_FIELDS = ("task", "length", "policy", "accuracy", "n", "seconds_per_sample", "chunks_mean",
              "status", "metric", "doc_tokens_mean")


def load_results(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """out_dir/results.json, or None if there is none yet."""
    path = Path(out_dir) / RESULTS_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write_text(path: Path, text: str) -> None:
    """Atomic write: a killed run never leaves a half-written file behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "N/A" if value is None else f"{value:.{digits}f}"


def _mean(values: Sequence[float | None]) -> float | None:
    nums = [v for v in values if v is not None]
    return sum(nums) / len(nums) if nums else None


def render_report(results: Mapping[str, Any]) -> str:
    """report.md: accuracy tables in the style of docs/reference.md section 6 (rows task/policy,
    columns lengths, then the row average over non-N/A cells), then the cost per sample."""
    cells = list(results["cells"].values())
    s = results.get("settings", {})
    lines = ["# Evaluation report", ""]
    meta = s.get("meta") or {}
    if meta.get("model"):
        lines.append(f"model: `{meta['model']}`  ")
    agent = s.get("agent", {})
    lines += [f"policy: {agent.get('policy')} (chunk_size={agent.get('chunk_size')}, "
              f"max_memory_tokens={agent.get('max_memory_tokens')}, final_style={agent.get('final_style')}); "
              f"baselines: {', '.join(s.get('baselines', [])) or 'none'}  ",
              f"samples per cell: {s.get('num_samples')}, temperature={s.get('temperature')}, "
              f"top_p={s.get('top_p')}, top_k={s.get('top_k')}, seed={s.get('seed')}", ""]
    titles = {"tokens": "RULER synthetic tasks (string_match_all; qa_1: sub_em), length in tokens",
              "docs": "RULER-HotpotQA (sub_em), length in documents"}
    for unit in dict.fromkeys(c["unit"] for c in cells):
        mine = [c for c in cells if c["unit"] == unit]
        lengths = sorted({int(c["length"]) for c in mine})
        tasks = list(dict.fromkeys(c["task"] for c in mine))
        policies = list(dict.fromkeys(c["policy"] for c in mine))
        index = {(c["task"], c["policy"], int(c["length"])): c for c in mine}
        header = "| task | policy | " + " | ".join(format_length(n, unit) for n in lengths) + " | avg |"
        for what, field, digits in (("Accuracy (%)", "accuracy", 2), ("Seconds per sample", "seconds_per_sample", 3)):
            lines += [f"## {what}: {titles.get(unit, unit)}", "", header, "|---" * (len(lengths) + 3) + "|"]
            for task in tasks:
                for policy in policies:
                    row = [index.get((task, policy, n)) for n in lengths]
                    if not any(row):
                        continue
                    vals = [None if c is None or c["status"] != "ok" else c[field] for c in row]
                    shown = ["-" if c is None else _fmt(v, digits) for c, v in zip(row, vals)]
                    lines.append(f"| {task} | {policy} | " + " | ".join(shown) + f" | {_fmt(_mean(vals), digits)} |")
            ruler = tasks if unit == "tokens" else []  # RULER tasks count tokens; hotpotqa documents
            if field == "accuracy" and len(ruler) > 1:
                for policy in policies:
                    per_len = []
                    for n in lengths:
                        cs = [index.get((t, policy, n)) for t in ruler]
                        ok = all(c is not None and c["status"] == "ok" for c in cs)
                        per_len.append(_mean([c["accuracy"] for c in cs]) if ok else None)
                    lines.append(f"| RULER average | {policy} | " + " | ".join(_fmt(v) for v in per_len)
                                 + f" | {_fmt(_mean(per_len))} |")
            lines.append("")
    cut = [c for c in cells if c.get("truncated_to")]
    if cut:
        lines += ["Truncated: in " + ", ".join(
            f"{c['task']} @ {format_length(int(c['length']), c['unit'])} [{c['policy']}]" for c in cut)
            + " the documents were center-truncated to the tokens the context window leaves "
            f"({', '.join(sorted({str(c['truncated_to']) for c in cut}))}).", ""]
    na = [c for c in cells if c["status"] != "ok"]
    if na:
        lines += ["N/A: the document does not fit the baseline's context window "
                  f"({len(na)} cell(s); see results.json for each reason). '-': not evaluated yet.", ""]
    lines += ["Seconds include JIT compilation in the first cells that meet a new prompt shape.", ""]
    return "\n".join(lines)


def write_outputs(results: Mapping[str, Any], out_dir: str | os.PathLike[str], *, plots: bool = True) -> None:
    """Write results.json, results.csv, report.md and (with `plots`) the PNGs into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / RESULTS_JSON, json.dumps(results, indent=1, ensure_ascii=False))
    cells = list(results["cells"].values())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({**c, "accuracy": "" if c["accuracy"] is None else round(c["accuracy"], 4)} for c in cells)
    _write_text(out / RESULTS_CSV, buf.getvalue())
    _write_text(out / REPORT_MD, render_report(results))
    if plots and cells:
        plot_accuracy_vs_length(cells, out / PLOTS[0])
        plot_heatmap(cells, out / PLOTS[1])
