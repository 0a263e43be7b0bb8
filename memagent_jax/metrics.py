"""Per-step metrics to metrics.jsonl and TensorBoard, written by process 0 only."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import jax


class MetricsWriter:
    """Appends one JSON line per step and mirrors scalars to TensorBoard (if tensorboardX exists)."""

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter

                    self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
                except ImportError:  # optional
                    self._tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def truncate_after(self, step: int) -> None:
        """Drops lines of steps > `step` (after resuming from an earlier checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        # A torn last line (the process died mid-write) is dropped here, so the next line
        # appended starts on a line of its own.
        rows = [r for r in _read_rows(self.path) if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "size", 2) == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """All lines of a run's metrics.jsonl."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return _read_rows(path)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of `path`; a torn (non-JSON) last line is skipped with a warning.

    A bad line before the last is not a torn write: a ValueError naming the file and line.
    """
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rows = []
    for i, ln in enumerate(lines):
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise ValueError(f"line {i + 1} of {path} is not JSON ({e.msg}): "
                                 "repair or delete the line") from e
            warnings.warn(f"{path}: skipped a torn last line (an interrupted write): {ln[:60]!r}",
                          stacklevel=3)
    return rows
