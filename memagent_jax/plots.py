"""PNG plots of an evaluation (see `memagent_jax.eval`): accuracy vs length and a heatmap.

Both functions take the evaluation's *cells*: dicts with at least "task", "length", "policy",
"unit" ("tokens" | "docs"), "status" ("ok" | "n/a") and "accuracy" (percent, None when N/A).
Figures are drawn on the Agg canvas directly (no pyplot), so plotting never touches the
interactive backend or global pyplot state of the calling process.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

UNIT_LABELS: dict[str, str] = {
    "tokens": "document length (tokens)",
    "docs": "document length (number of HotpotQA documents)",
}
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def format_length(n: int, unit: str = "tokens") -> str:
    """Column label of a length: 8192 -> "8K", 1048576 -> "1M", 50 docs -> "50 docs"."""
    n = int(n)
    if unit == "docs":
        return f"{n} docs"
    for size, suffix in ((1 << 20, "M"), (1 << 10, "K")):
        if n >= size and n % (size // 4) == 0:
            return f"{n / size:g}{suffix}"
    return str(n)


def _order(values: Iterable[Any]) -> list[Any]:
    """Unique values in first-seen order."""
    return list(dict.fromkeys(values))


def _accuracy(cell: Mapping[str, Any] | None) -> float:
    """The cell's accuracy, or NaN when missing or N/A."""
    if cell is None or cell.get("status") != "ok" or cell.get("accuracy") is None:
        return math.nan
    return float(cell["accuracy"])


def _save(fig: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_accuracy_vs_length(cells: Sequence[Mapping[str, Any]], path: str | Path,
                            title: str = "Accuracy vs document length") -> Path:
    """Line plot: one line per (task, policy), log-scaled length axis, one panel per length unit.

    Colors tell tasks apart, line styles and markers tell policies apart; N/A cells are gaps.
    """
    units = _order(c["unit"] for c in cells) or ["tokens"]
    tasks = _order(c["task"] for c in cells)
    policies = _order(c["policy"] for c in cells)
    colors = colormaps["tab10" if len(tasks) <= 10 else "tab20"]
    fig = Figure(figsize=(6.5 * len(units) + 2.5, 4.8), layout="constrained")
    axes = fig.subplots(1, len(units), squeeze=False)[0]
    for ax, unit in zip(axes, units):
        mine = [c for c in cells if c["unit"] == unit]
        lengths = sorted({int(c["length"]) for c in mine})
        by_key = {(c["task"], c["policy"], int(c["length"])): c for c in mine}
        for ti, task in enumerate(tasks):
            for pi, policy in enumerate(policies):
                if not any((task, policy, n) in by_key for n in lengths):
                    continue
                y = np.array([_accuracy(by_key.get((task, policy, n))) for n in lengths])
                ax.plot(lengths, y, color=colors(ti % colors.N), linestyle=_LINESTYLES[pi % len(_LINESTYLES)],
                        marker=_MARKERS[pi % len(_MARKERS)], markersize=5, linewidth=1.6,
                        label=f"{task} / {policy}")
        if len(lengths) > 1 and lengths[0] > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [format_length(n, unit).replace(" docs", "") for n in lengths])
        ax.minorticks_off()
        ax.set_ylim(-3, 103)
        ax.set_xlabel(UNIT_LABELS.get(unit, unit))
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.set_title(title if len(units) == 1 else f"{title} ({unit})")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        more_h, more_l = ax.get_legend_handles_labels()
        handles, labels = handles + more_h, labels + more_l
    if handles:
        fig.legend(handles, labels, loc="outside right upper", title="task / policy", fontsize=8)
    return _save(fig, path)


def plot_heatmap(cells: Sequence[Mapping[str, Any]], path: str | Path,
                 title: str = "Accuracy (%) by task and length") -> Path:
    """Task x length heatmap of accuracy, one panel per policy (stacked), values written in the cells.

    N/A cells read "N/A" on grey; cells not evaluated stay blank.
    """
    tasks = _order(c["task"] for c in cells)
    policies = _order(c["policy"] for c in cells) or ["-"]
    lengths = sorted({int(c["length"]) for c in cells})
    units = _order(c["unit"] for c in cells)
    unit_of = {c["task"]: c["unit"] for c in cells}
    if len(units) == 1:
        col_labels = [format_length(n, units[0]) for n in lengths]
        xlabel = UNIT_LABELS.get(units[0], units[0])
    else:
        col_labels = [str(n) for n in lengths]
        xlabel = "document length (tokens; hotpotqa: documents)"
    row_labels = [t if len(units) == 1 else f"{t} [{unit_of[t]}]" for t in tasks]
    cmap = colormaps["RdYlGn"].with_extremes(bad="#d9d9d9")
    width = max(4.0, 0.9 * len(lengths) + 2.6)
    height = max(2.2, 0.45 * len(tasks) + 1.4)
    fig = Figure(figsize=(width + 1.2, height * len(policies) + 0.4), layout="constrained")
    axes = fig.subplots(len(policies), 1, squeeze=False)[:, 0]
    index = {(c["task"], c["policy"], int(c["length"])): c for c in cells}
    image = None
    for ax, policy in zip(axes, policies):
        grid = np.full((len(tasks), len(lengths)), np.nan)
        for i, task in enumerate(tasks):
            for j, n in enumerate(lengths):
                cell = index.get((task, policy, n))
                grid[i, j] = _accuracy(cell)
                if cell is None:
                    text = ""
                elif cell.get("status") != "ok" or cell.get("accuracy") is None:
                    text = "N/A"
                else:
                    text = f"{cell['accuracy']:.1f}"
                dark = not np.isnan(grid[i, j]) and not 15 <= grid[i, j] <= 85  # the colormap's dark ends
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(lengths)), col_labels, rotation=45 if len(lengths) > 6 else 0)
        ax.set_yticks(range(len(tasks)), row_labels)
        ax.set_xlabel(xlabel)
        ax.set_title(f"policy: {policy}")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="accuracy (%)", shrink=0.9)
    fig.suptitle(title)
    return _save(fig, path)


def plot_timeline(events: Sequence[Mapping[str, Any]], path: str | Path, *, last_steps: int = 12,
                  title: str = "Async RL: when each lane was busy") -> Path:
    """Gantt-like strips of async RL's lanes (rollout / train / weight sync) over the last
    `last_steps` RL steps; `events` are `timeline.jsonl`'s rows {lane, step, start, end}."""
    lanes = ("rollout", "train", "sync")
    colors = {"rollout": "tab:blue", "train": "tab:orange", "sync": "tab:green"}
    steps = sorted({int(e["step"]) for e in events if e["lane"] == "train"})
    keep = set(steps[-last_steps:])
    t0 = min((e["start"] for e in events if e["lane"] == "train" and e["step"] in keep), default=0.0)
    fig = Figure(figsize=(10, 2.4))
    ax = fig.add_subplot(1, 1, 1)
    for row, lane in enumerate(lanes):
        spans = [(e["start"] - t0, e["end"] - e["start"]) for e in events
                 if e["lane"] == lane and e["end"] >= t0 and (lane == "rollout" or e["step"] in keep)]
        ax.broken_barh(spans, (row - 0.35, 0.7), facecolors=colors[lane])
    for e in events:  # step boundaries: the end of each update
        if e["lane"] == "train" and e["step"] in keep:
            ax.axvline(e["end"] - t0, color="0.6", lw=0.5)
    ax.set_yticks(range(len(lanes)), ["rollout", "update", "weight sync"])
    ax.set(xlabel="seconds", title=title, ylim=(-0.6, len(lanes) - 0.4))
    ax.set_xlim(left=0)
    fig.tight_layout()
    return _save(fig, path)
