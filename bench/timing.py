"""Interleaved timing for the benches (a verdict that holds on a noisy shared CPU), and the
machine a figure comes from.

Each side of a comparison is warmed up once (compiles), then timed in `repeats` rounds; in each
round every side runs in turn (the order alternates between rounds), enough calls that its share
of the round lasts at least `min_seconds`. Both sides so see the same background load, and one
noisy second moves one round's ratio, not the median. The ratio is taken per round and reported as
the median with its spread (min, max).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """Cores this process may run on (respects taskset / cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int = 5, min_seconds: float = 10.0,
                block: Callable[[Any], Any] = lambda out: out) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds per call of each side, one entry per round, and each side's last output.

    `block(out)` waits for a call's result (e.g. `jax.block_until_ready`). The number of calls per
    round is fixed per side from its warm-up + one timed call, so all rounds do the same work.
    """
    outputs: dict[str, Any] = {}
    calls_per_round: dict[str, int] = {}
    for name, fn in calls.items():
        block(fn())  # warm-up: compiles every shape
        t0 = time.perf_counter()
        outputs[name] = block(fn())
        once = max(time.perf_counter() - t0, 1e-6)
        calls_per_round[name] = max(1, int(-(-min_seconds // once)))
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            n = calls_per_round[name]
            t0 = time.perf_counter()
            for _ in range(n):
                outputs[name] = block(calls[name]())
            times[name].append((time.perf_counter() - t0) / n)
    return times, outputs


def spread(values: list[float], digits: int = 4) -> dict[str, Any]:
    """Median, min and max of a list (rounded), plus the values themselves."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "values": [round(v, digits) for v in values]}


def ratio_spread(numerator: list[float], denominator: list[float], digits: int = 3) -> dict[str, Any]:
    """Per-round ratios numerator[i] / denominator[i]: median and spread (e.g. peer s / ours s)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("ratio_spread needs two equally long, non-empty lists of round times")
    return spread([a / b for a, b in zip(numerator, denominator)], digits)
