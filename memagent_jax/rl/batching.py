"""Host-side batching for the update: merging kept groups, mini-batches, token-budget micro-batches.

Everything here is numpy on the host; the device sees fixed, bucketed shapes only.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from memagent_jax.agent.rollout import RolloutResult
from memagent_jax.rl.loss import aggregation_denominator
from memagent_jax.sampler import bucket
from memagent_jax.types import ConversationBatch


def merge_kept(results: Sequence[RolloutResult], keeps: Sequence[np.ndarray]) -> RolloutResult:
    """One RolloutResult of the kept trajectories of several rollouts, re-indexed densely.

    Group ids become unique across rollouts (rollout r's group g -> a new dense id).
    """
    conversations, trajectories = [], []
    group_map: dict[tuple[int, int], int] = {}
    for r, (res, keep) in enumerate(zip(results, keeps)):
        for t, kept in zip(res.trajectories, keep):
            if not kept:
                continue
            new_t = dataclasses.replace(t, trajectory_id=len(trajectories), conversation_ids=[],
                                        group_id=group_map.setdefault((r, t.group_id), len(group_map)))
            for cid in t.conversation_ids:
                c = res.conversations[cid]
                new_t.conversation_ids.append(len(conversations))
                conversations.append(dataclasses.replace(
                    c, trajectory_id=new_t.trajectory_id, group_id=new_t.group_id))
            trajectories.append(new_t)
    stats = {"num_trajectories": len(trajectories), "num_conversations": len(conversations)}
    pad_id = results[0].pad_id if results else 0
    return RolloutResult(conversations, trajectories, stats, pad_id=pad_id)


def global_denominator(mask: np.ndarray, agg: str) -> float:
    """The loss denominator of a whole mini-batch: `rl.loss.aggregation_denominator`, the one
    definition of the aggregation modes (docs/reference.md section 3)."""
    return float(aggregation_denominator(np.asarray(mask, np.float32), agg))


def group_mini_batches(group_ids: np.ndarray, num_minis: int,
                       rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of `num_minis` mini-batches made of whole groups (rl.mini_batch_size groups
    each): the groups in a random order, cut into equal parts; each mini-batch lists every row of
    its groups (in row order), so a group's conversations are never split between optimizer
    steps."""
    groups = np.unique(group_ids)
    if num_minis < 1 or len(groups) % num_minis:
        raise ValueError(f"{len(groups)} groups cannot be cut into {num_minis} mini-batches of "
                         "whole groups: rl.train_batch_size must be a multiple of rl.mini_batch_size")
    order = rng.permutation(groups)
    return [np.flatnonzero(np.isin(group_ids, part)) for part in np.split(order, num_minis)]


def pack_micro_batches(lengths: np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Splits row indices into micro-batches whose padded size rows * max_len <= token_budget
    (a single row longer than the budget gets its own micro-batch). Longest rows first."""
    order = np.argsort(-lengths, kind="stable")
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * int(lengths[out[-1][0]]) <= token_budget:
            out[-1].append(int(i))
        else:
            out.append([int(i)])
    return [np.asarray(m) for m in out]


def row_bucket(n: int, multiple: int) -> int:
    """Rows of a micro-batch: the smallest multiple * {2^k, 1.5 * 2^k} >= n (<= 33% padding rows,
    vs <= 50% for powers of two; a few more compiled shapes)."""
    size = multiple
    while size < n:
        if size >= 2 * multiple and size * 3 // 2 >= n:
            return size * 3 // 2
        size *= 2
    return size


def micro_batch_arrays(batch: ConversationBatch, rows: np.ndarray, lengths: np.ndarray,
                       row_multiple: int, extra: dict[str, np.ndarray] | None = None
                       ) -> dict[str, np.ndarray]:
    """Arrays of `rows`, padded to bucketed [rows, T] shapes (padding rows have mask 0)."""
    n = row_bucket(len(rows), row_multiple)
    width = bucket(int(lengths[rows].max()))
    fields = {
        "tokens": batch.tokens, "mask": batch.response_mask, "advantages": batch.advantages,
        "sampler_logp": batch.sampler_logps, **(extra or {}),
    }
    out = {}
    for name, src in fields.items():
        arr = np.zeros((n, width), src.dtype)
        take = src[rows, : min(width, src.shape[1])]
        arr[: len(rows), : take.shape[1]] = take
        out[name] = arr
    return out
