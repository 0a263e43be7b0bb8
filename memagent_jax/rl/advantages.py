"""Per-trajectory advantages, dynamic-sampling filters and overlong shaping (docs/reference.md 2-3).

Everything here is plain numpy on host: it runs between the rollout and the train step, on one
value per trajectory (or per response for `overlong_penalty`). Advantages are computed per
TRAJECTORY, then `broadcast_to_conversations` hands each of its conversations the same value.

Groups are identified by arbitrary integer ids (a group = the n rollouts of one prompt); they need
not be contiguous or sorted.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _group_index(group_ids: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(unique ids in order of first appearance, inverse index of each row into them)."""
    ids = np.asarray(group_ids).reshape(-1)
    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique ids by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return uniq[order], rank[inverse.reshape(-1)]


def group_advantages(
    rewards: ArrayLike, group_ids: ArrayLike, *, norm_std: bool, eps: float = 1e-6
) -> np.ndarray:
    """A_i = R_i - mean_group(R), optionally divided by (unbiased group std + eps).

    A group of size 1 is taken as mean 0, std 1, so its advantage is R_i (or R_i / (1 + eps)).
    Returns float32 [N] in the order of `rewards`.
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    _, idx = _group_index(group_ids)
    if idx.shape != r.shape:
        raise ValueError(f"rewards has {r.size} entries but group_ids has {idx.size}")
    n_groups = int(idx.max()) + 1 if idx.size else 0
    count = np.bincount(idx, minlength=n_groups).astype(np.float64)
    mean = np.bincount(idx, weights=r, minlength=n_groups) / np.maximum(count, 1)
    sq = np.bincount(idx, weights=(r - mean[idx]) ** 2, minlength=n_groups)
    std = np.sqrt(sq / np.maximum(count - 1, 1))  # unbiased (ddof = 1)
    single = count <= 1
    mean = np.where(single, 0.0, mean)
    std = np.where(single, 1.0, std)
    adv = r - mean[idx]
    if norm_std:
        adv = adv / (std[idx] + eps)
    return adv.astype(np.float32)


def broadcast_to_conversations(
    traj_advantages: ArrayLike, conversation_trajectory_ids: ArrayLike
) -> np.ndarray:
    """Advantage of each conversation = the advantage of its trajectory.

    `conversation_trajectory_ids[j]` is the index of conversation j's trajectory in
    `traj_advantages`. Returns float32 [num_conversations].
    """
    adv = np.asarray(traj_advantages, dtype=np.float32).reshape(-1)
    tid = np.asarray(conversation_trajectory_ids).reshape(-1).astype(np.int64)
    if tid.size and (tid.min() < 0 or tid.max() >= adv.size):
        raise ValueError(
            f"conversation_trajectory_ids must index the {adv.size} trajectory advantages; "
            f"got ids in [{tid.min()}, {tid.max()}]"
        )
    return adv[tid]


def overlong_penalty(
    lengths: ArrayLike, *, max_len: int, cache_len: int, factor: float
) -> np.ndarray:
    """DAPO soft overlong punishment on response lengths in TOKENS (EOS included).

    expected = max_len - cache_len; 0 when len <= expected; linear (expected - len) / cache_len *
    factor on (expected, max_len]; -factor beyond max_len. Returns float32 [N].
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(
            f"overlong shaping needs 0 < cache_len <= max_len; got cache_len={cache_len}, "
            f"max_len={max_len}"
        )
    n = np.asarray(lengths, dtype=np.float64)
    expected = max_len - cache_len
    ramp = (expected - n) / cache_len * factor
    out = np.where(n <= expected, 0.0, np.where(n <= max_len, ramp, -factor))
    return out.astype(np.float32)


def filter_groups(metric: ArrayLike, group_ids: ArrayLike) -> np.ndarray:
    """Dynamic-sampling keep mask: drop groups whose metric has zero population std.

    A group with zero std has all members equal (all right or all wrong) and gives no learning
    signal. Tested as max == min, which is exact where a float std can be a tiny non-zero.
    Groups of size 1 are always kept. Returns bool [N].
    """
    m = np.asarray(metric, dtype=np.float64).reshape(-1)
    _, idx = _group_index(group_ids)
    if idx.shape != m.shape:
        raise ValueError(f"metric has {m.size} entries but group_ids has {idx.size}")
    n_groups = int(idx.max()) + 1 if idx.size else 0
    gmax = np.full(n_groups, -np.inf)
    gmin = np.full(n_groups, np.inf)
    np.maximum.at(gmax, idx, m)
    np.minimum.at(gmin, idx, m)
    count = np.bincount(idx, minlength=n_groups)
    keep_group = (gmax > gmin) | (count == 1)
    return keep_group[idx]


def select_groups(keep_mask: ArrayLike, group_ids: ArrayLike, num_groups: int) -> np.ndarray:
    """Truncate a keep mask to exactly the first `num_groups` kept groups (first appearance).

    Raises ValueError when fewer than `num_groups` groups are kept: the caller must generate
    more batches first (dynamic sampling refills rather than training on fewer groups).
    """
    keep = np.asarray(keep_mask, dtype=bool).reshape(-1)
    ids = np.asarray(group_ids).reshape(-1)
    if keep.shape != ids.shape:
        raise ValueError(f"keep_mask has {keep.size} entries but group_ids has {ids.size}")
    kept_ids, _ = _group_index(ids[keep])
    if len(kept_ids) < num_groups:
        raise ValueError(
            f"only {len(kept_ids)} groups are kept but num_groups={num_groups} were requested; "
            "generate more batches before selecting"
        )
    return keep & np.isin(ids, kept_ids[:num_groups])
