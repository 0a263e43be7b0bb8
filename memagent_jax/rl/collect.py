"""Generation batches on their way to a train batch: scored (`ScoredBatch`), the processes'
parts merged (`merge_results`), and the first train_batch_size kept groups of several batches
assembled (`assemble`) into what the update consumes (`Collected`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from memagent_jax.agent.rollout import RolloutResult
from memagent_jax.rl.advantages import select_groups
from memagent_jax.rl.batching import merge_kept


@dataclasses.dataclass
class Collected:
    batch: RolloutResult
    rewards: np.ndarray
    accuracy: np.ndarray
    gen_batches: int
    groups_seen: int
    rollout_stats: dict[str, Any]


@dataclasses.dataclass
class ScoredBatch:
    """One generation batch, scored: rewards, accuracies and dynamic sampling's keep mask."""

    result: RolloutResult
    rewards: np.ndarray
    accuracy: np.ndarray
    keep: np.ndarray

    @property
    def kept_groups(self) -> int:
        groups = np.array([t.group_id for t in self.result.trajectories])
        return len(set(groups[self.keep].tolist()))


def merge_results(parts: list[RolloutResult]) -> RolloutResult:
    """The processes' rollouts of one generation batch as one (in process order)."""
    res = merge_kept(parts, [np.ones(len(p.trajectories), bool) for p in parts])
    res.stats = merge_stats([p.stats for p in parts])
    return res


def assemble(batches: list[ScoredBatch], train_batch_size: int) -> Collected:
    """The first `train_batch_size` kept groups of the generation batches, as one Collected."""
    keeps = [b.keep for b in batches]
    keep_all = np.concatenate(keeps)
    offsets = np.cumsum([0] + [len(b.result.trajectories) for b in batches])
    gids = np.concatenate([np.array([t.group_id for t in b.result.trajectories]) + 10**7 * i
                           for i, b in enumerate(batches)])
    keep_all = select_groups(keep_all, gids, train_batch_size)
    keeps = [keep_all[offsets[i]:offsets[i + 1]] for i in range(len(batches))]
    merged = merge_kept([b.result for b in batches], keeps)
    reward = np.concatenate([b.rewards for b in batches])[keep_all]
    acc = np.concatenate([b.accuracy for b in batches])
    return Collected(merged, reward, acc, len(batches), len(set(gids.tolist())),
                     merge_stats([b.result.stats for b in batches]))


def merge_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("memory_capped", "finish_length_memory", "finish_length_final", "num_conversations"):
        out[key] = int(sum(s.get(key, 0) for s in stats))
    for key in ("mean_response_length", "mean_memory_response_length"):
        out[key] = float(np.mean([s.get(key, 0.0) for s in stats]))
    out["truncation_rate"] = (out["finish_length_memory"] + out["finish_length_final"]) / max(
        1, out["num_conversations"])
    return out
