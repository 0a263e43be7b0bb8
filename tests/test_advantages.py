"""Tests for memagent_jax.rl.advantages against plain-Python references of docs/reference.md 2-3."""

from __future__ import annotations

import math

import numpy as np
import pytest

from memagent_jax.rl import advantages as A


def _ref_group_adv(rewards, gids, norm_std, eps):
    """Independent per-trajectory loop: mean / unbiased std over the members of each group."""
    out = []
    for i, r in enumerate(rewards):
        members = [rewards[j] for j in range(len(rewards)) if gids[j] == gids[i]]
        n = len(members)
        if n == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(members) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in members) / (n - 1))
        a = r - mean
        out.append(a / (std + eps) if norm_std else a)
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("norm_std", [False, True])
def test_group_advantages_parity(seed, norm_std):
    rng = np.random.default_rng(seed)
    n = 40
    gids = rng.choice([7, -3, 100, 5, 42, 9], size=n)  # arbitrary, unsorted ids
    gids[0] = 12345  # a size-1 group
    rewards = rng.choice([0.0, 1.0], size=n) + rng.normal(0, 0.1, size=n) * (seed % 2)
    got = A.group_advantages(rewards, gids, norm_std=norm_std, eps=1e-6)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, _ref_group_adv(rewards, gids, norm_std, 1e-6), rtol=1e-5,
                               atol=1e-5)


def test_group_advantages_concrete():
    rewards = [1.0, 0.0, 0.0, 0.0, 5.0, 2.0, 2.0]
    gids = [3, 3, 3, 3, 8, 1, 1]
    got = A.group_advantages(rewards, gids, norm_std=False)
    np.testing.assert_allclose(got, [0.75, -0.25, -0.25, -0.25, 5.0, 0.0, 0.0], atol=1e-7)
    got = A.group_advantages(rewards, gids, norm_std=True, eps=1e-6)
    std = 0.5  # unbiased std of [1, 0, 0, 0]
    np.testing.assert_allclose(
        got, [0.75 / (std + 1e-6), -0.25 / (std + 1e-6), -0.25 / (std + 1e-6),
              -0.25 / (std + 1e-6), 5.0 / (1 + 1e-6), 0.0, 0.0], rtol=1e-6)  # fmt: skip


def test_broadcast_to_conversations():
    traj = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    conv_tids = [0, 0, 0, 1, 2, 2, 1]
    got = A.broadcast_to_conversations(traj, conv_tids)
    np.testing.assert_array_equal(got, [0.5, 0.5, 0.5, -1.0, 2.0, 2.0, -1.0])
    assert got.dtype == np.float32
    with pytest.raises(ValueError, match="conversation_trajectory_ids"):
        A.broadcast_to_conversations(traj, [0, 3])


def _ref_overlong(length, max_len, cache_len, factor):
    expected = max_len - cache_len
    if length <= expected:
        return 0.0
    if length <= max_len:
        return (expected - length) / cache_len * factor
    return -factor


def test_overlong_penalty():
    lengths = [0, 10, 16, 17, 18, 20, 21, 100]
    got = A.overlong_penalty(lengths, max_len=20, cache_len=4, factor=1.0)
    ref = [_ref_overlong(n, 20, 4, 1.0) for n in lengths]
    np.testing.assert_allclose(got, ref, atol=1e-7)
    np.testing.assert_allclose(got, [0, 0, 0, -0.25, -0.5, -1.0, -1.0, -1.0], atol=1e-7)
    got2 = A.overlong_penalty(np.array([20479, 20480, 20481, 16384, 16385]), max_len=20480,
                              cache_len=4096, factor=0.5)
    ref2 = [_ref_overlong(n, 20480, 4096, 0.5) for n in [20479, 20480, 20481, 16384, 16385]]
    np.testing.assert_allclose(got2, ref2, rtol=1e-6)
    with pytest.raises(ValueError, match="cache_len"):
        A.overlong_penalty([1], max_len=10, cache_len=0, factor=1.0)


def test_filter_groups():
    metric = [1, 1, 1, 0, 1, 0, 0, 0.5, 0.3, 0.3]
    gids = [4, 4, 4, 2, 2, 9, 9, 6, 1, 1]
    got = A.filter_groups(metric, gids)
    # group 4 all-1 dropped, group 2 mixed kept, group 9 all-0 dropped, group 6 size 1 kept,
    # group 1 all equal dropped
    np.testing.assert_array_equal(got, [0, 0, 0, 1, 1, 0, 0, 1, 0, 0])
    assert got.dtype == bool


def test_filter_groups_float_equal_values():
    # Values whose float mean differs from them (np.std could be ~1e-17): still all equal.
    metric = [0.1, 0.1, 0.1, 0.7, 0.7, 0.7]
    assert not A.filter_groups(metric, [0, 0, 0, 1, 1, 1]).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filter_groups_parity(seed):
    rng = np.random.default_rng(seed)
    gids = rng.integers(0, 12, size=60) * 3 - 5
    metric = rng.choice([0.0, 1.0], size=60, p=[0.7, 0.3])
    got = A.filter_groups(metric, gids)
    ref = []
    for i in range(60):
        members = [metric[j] for j in range(60) if gids[j] == gids[i]]
        ref.append(len(members) == 1 or float(np.std(members)) > 0)
    np.testing.assert_array_equal(got, ref)


def test_select_groups():
    gids = np.array([5, 5, 3, 3, 8, 8, 1, 1, 5])
    keep = np.array([1, 1, 0, 0, 1, 1, 1, 1, 1], dtype=bool)
    # kept groups by first appearance: 5, 8, 1
    np.testing.assert_array_equal(A.select_groups(keep, gids, 2), [1, 1, 0, 0, 1, 1, 0, 0, 1])
    np.testing.assert_array_equal(A.select_groups(keep, gids, 1), [1, 1, 0, 0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(A.select_groups(keep, gids, 3), keep)
    np.testing.assert_array_equal(A.select_groups(keep, gids, 0), np.zeros(9, bool))
    with pytest.raises(ValueError, match="num_groups=4"):
        A.select_groups(keep, gids, 4)
