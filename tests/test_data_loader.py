"""Grain loader: deterministic shuffle, sharding, batches of dicts, exact resume (also orbax)."""

from __future__ import annotations

import json

import grain
import orbax.checkpoint as ocp
import pytest

from memagent_jax.data.loader import loader_state, make_loader, restore_loader

SOURCE = [{"id": str(i), "question": f"q{i}", "answers": ["a"] * (i % 3 + 1)} for i in range(23)]


def ids(batches) -> list[str]:
    return [s["id"] for b in batches for s in b]


def take(it, k: int) -> list:
    return [next(it) for _ in range(k)]


def test_batches_are_lists_of_sample_dicts_and_epoch_covers_all():
    it = make_loader(SOURCE, batch_size=4, seed=0, num_epochs=1, shard_index=0, shard_count=1)
    batches = list(it)
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 3]
    assert all(isinstance(s, dict) and isinstance(s["answers"], list) for b in batches for s in b)
    assert sorted(ids(batches), key=int) == [s["id"] for s in SOURCE]
    assert ids(batches) != [s["id"] for s in SOURCE]  # shuffled
    ordered = make_loader(
        SOURCE, batch_size=5, seed=0, shuffle=False, num_epochs=1, shard_index=0, shard_count=1
    )
    assert ids(ordered) == [s["id"] for s in SOURCE]


def test_shuffle_is_deterministic_by_seed_and_reshuffles_each_epoch():
    def first(seed: int, k: int) -> list[str]:
        it = make_loader(SOURCE, batch_size=1, seed=seed, shard_index=0, shard_count=1)
        return ids(take(it, k))

    assert first(5, 23) == first(5, 23)
    assert first(5, 23) != first(6, 23)
    two = first(5, 46)
    assert sorted(two[:23]) == sorted(two[23:]) and two[:23] != two[23:]


def test_shards_are_disjoint_and_cover():
    shards = [
        ids(make_loader(SOURCE, batch_size=2, seed=1, num_epochs=1, shard_index=k, shard_count=3))
        for k in range(3)
    ]
    assert all(shards)
    seen = [i for s in shards for i in s]
    assert len(seen) == len(set(seen)) == len(SOURCE)
    default = make_loader(SOURCE, batch_size=2, seed=1, num_epochs=1)  # jax: process 0 of 1
    assert sorted(ids(default)) == sorted(seen)
    with pytest.raises(ValueError, match="shard_index"):
        make_loader(SOURCE, batch_size=2, seed=1, shard_index=3, shard_count=3)


def test_state_round_trip_gives_identical_next_batches():
    def fresh():
        return make_loader(SOURCE, batch_size=4, seed=7, shard_index=0, shard_count=1)

    it = fresh()
    take(it, 5)  # into the second epoch after the next batch
    state = json.loads(json.dumps(loader_state(it)))
    expected = take(it, 4)
    resumed = restore_loader(fresh(), state)
    assert take(resumed, 4) == expected
    assert take(fresh(), 1) != expected[:1]  # a fresh iterator starts elsewhere


def test_state_round_trip_through_orbax(tmp_path):
    def fresh():
        return make_loader(SOURCE, batch_size=3, seed=2, shard_index=0, shard_count=1)

    it = fresh()
    take(it, 3)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("loader", "loader_json"))
    mngr.save(3, args=ocp.args.Composite(
        loader=grain.checkpoint.CheckpointSave(it),
        loader_json=ocp.args.JsonSave(loader_state(it)),
    ))
    mngr.wait_until_finished()
    expected = take(it, 2)
    via_grain = fresh()
    restored = mngr.restore(3, args=ocp.args.Composite(
        loader=grain.checkpoint.CheckpointRestore(via_grain), loader_json=ocp.args.JsonRestore()))
    assert take(via_grain, 2) == expected
    assert take(restore_loader(fresh(), restored.loader_json), 2) == expected
    mngr.close()
