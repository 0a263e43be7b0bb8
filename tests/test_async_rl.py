"""Asynchronous RL (rollout.mode: async, rl/async_trainer.py): strictly on-policy async equals
sync, bounded staleness and its bookkeeping, the timeline, resume, and config errors."""

from __future__ import annotations

import json
import os
import signal

import jax
import numpy as np
import pytest
from tiny_policy import AsciiTokenizer, docs, letters_reward, tiny_model

from memagent_jax.config import load_config, validate_config
from memagent_jax.errors import InputError
from memagent_jax.rl.async_trainer import (
    AsyncTrainer,
    busy_fraction,
    split_devices,
    staleness_histogram,
)
from memagent_jax.rl.trainer import Trainer

TOK = AsciiTokenizer()
SHORT = ["agent.memory_template=Q{prompt}M{memory}C{chunk}>", "agent.final_template=Q{prompt}M{memory}>",
         "agent.first_memory=-"]


def _cfg(out, *extra):
    return load_config(None, [
        *SHORT, "agent.chunk_size=12", "agent.max_chunks=3", "agent.max_memory_tokens=4",
        "agent.max_final_new_tokens=4", "agent.question_budget=64", "rollout.group_size=4",
        "rollout.engine=static", "rl.train_batch_size=2", "rl.gen_batch_size=2",
        "rl.mini_batch_size=1", "rl.filter_groups=false", "optim.lr=0.01", "optim.warmup_steps=1",
        "trainer.total_steps=3", "trainer.save_every=100", f"trainer.out_dir={out}",
        "trainer.progress=false", "trainer.async_checkpoint=false", *extra])

_reward = letters_reward


def _make(cls, out, *extra, reward_fn=_reward):
    from memagent_jax.data.loader import loader_state, make_loader, restore_loader

    it = make_loader(docs(16, 30, seed=3), batch_size=2, seed=5, shuffle=True, shard_index=0, shard_count=1)
    return cls(_cfg(out, *extra), tiny_model(), TOK, it, reward_fn=reward_fn,
               data_state=(lambda: loader_state(it), lambda s: restore_loader(it, s)))


def _params(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_async_equals_sync_and_resumes(tmp_path):
    """rl.max_staleness=0: the rollout thread makes each batch on request with the sync seeds, so
    the samples and every update equal sync mode's, bit for bit (one device, shared mesh). SIGTERM
    during such a run saves; the resumed run ends with the same weights (queued batches are
    dropped and their documents come again)."""
    steps = ("trainer.total_steps=4",)
    sync = _make(Trainer, tmp_path / "sync", *steps)
    assert sync.run() == "done"
    expected, sync_rows = _params(sync), _metrics(tmp_path / "sync")
    sync.close()
    extra = ("rollout.mode=async", "rl.max_staleness=0", *steps)
    a = _make(AsyncTrainer, tmp_path / "async", *extra)
    assert a.run() == "done"
    rows = _metrics(tmp_path / "async")
    for x, y in zip(expected, _params(a)):
        np.testing.assert_array_equal(x, y)
    a.close()
    for s, r in zip(sync_rows, rows):
        for key in ("reward/mean", "actor/pg_loss", "actor/grad_norm", "batch/tokens"):
            assert s[key] == r[key], key
        assert r["async/staleness_max"] == 0 and r["async/dropped_batches"] == 0

    calls = {"n": 0}

    def killing_reward(t):  # SIGTERM during step 2's rollout (8 trajectories per step)
        calls["n"] += 1
        if calls["n"] == 8 * 2 + 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return _reward(t)

    first = _make(AsyncTrainer, tmp_path / "resumed", *extra, reward_fn=killing_reward)
    assert first.run() == "interrupted"
    first.close()
    second = _make(AsyncTrainer, tmp_path / "resumed", *extra)
    assert second.run() == "done" and second.rl_step == 4
    for x, y in zip(expected, _params(second)):
        np.testing.assert_array_equal(x, y)
    second.close()


def test_stale_batches_are_bounded_and_versions_recorded(tmp_path):
    """rl.max_staleness=1: the rollout runs ahead by at most one update; every kept batch's oldest
    token is at most one version old, the tokens carry their versions, the timeline has both lanes."""
    out = tmp_path / "run"
    a = _make(AsyncTrainer, out, "rollout.mode=async", "rl.max_staleness=1", "trainer.total_steps=4",
              "rl.async_queue=2")
    seen: list[tuple[int, list[int]]] = []
    original = a.update

    def spy(collected):
        seen.append((a.rl_step, [c.policy_version for c in collected.batch.conversations]))
        return original(collected)

    a.update = spy
    assert a.run() == "done"
    a.close()
    for step, versions in seen:
        assert all(step - 1 <= v <= step for v in versions), (step, sorted(set(versions)))
    rows = _metrics(out)
    assert len(rows) == 4
    for r in rows:
        assert 0 <= r["async/staleness_max"] <= 1
        assert r["time/weight_sync"] >= 0 and 0 <= r["async/rollout_busy"] <= 1
        lags = [k for k in r if k.startswith("async/rollout_logprob_abs_diff_lag")]
        assert lags, r
        if "async/rollout_logprob_abs_diff_lag0" in r:  # sampled by the weights being updated
            assert r["async/rollout_logprob_abs_diff_lag0"] < 1e-4
        if "async/rollout_logprob_abs_diff_lag1" in r:  # by the previous weights
            assert r["async/rollout_logprob_abs_diff_lag1"] > 1e-4
        hist = sum(r[f"async/staleness_{k}"] for k in ("0", "1", "2", "3+"))
        assert hist == r["dynamic/gen_batches"]
    lanes = {json.loads(line)["lane"] for line in (out / "timeline.jsonl").read_text().splitlines()}
    assert lanes == {"rollout", "train", "sync"}
    assert (out / "timeline.png").stat().st_size > 1000  # the lanes, drawn


def test_rollout_thread_errors_reach_the_trainer(tmp_path):
    def broken(t):
        raise ZeroDivisionError("reward function bug")

    a = _make(AsyncTrainer, tmp_path, "rollout.mode=async", reward_fn=broken)
    with pytest.raises(RuntimeError, match="rollout thread failed.*reward function bug"):
        a.run()
    a.close()


def test_weight_broker_hands_the_rollout_its_own_copy():
    """A publish on a shared mesh: the rollout's weights equal the source and are not its buffers
    (the train state is donated to the next update); versions advance."""
    from flax import nnx

    from memagent_jax.models import MeshConfig, make_mesh, shard_state
    from memagent_jax.rl.async_trainer import WeightBroker

    mesh = make_mesh(MeshConfig(1, 1, 1))
    model = shard_state(tiny_model(), mesh)
    broker = WeightBroker(mesh)
    assert broker.latest() == (-1, None)
    broker.publish(model, 3)
    version, rolled = broker.latest()
    src = dict(nnx.to_flat_state(nnx.state(model)))
    for k, v in nnx.to_flat_state(nnx.state(rolled)):
        a, b = src[k].get_value(), v.get_value()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a is not b and a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
    assert version == 3


def test_bookkeeping_helpers():
    assert staleness_histogram([0, 0, 1, 5, 3]) == {
        "async/staleness_0": 2, "async/staleness_1": 1, "async/staleness_2": 0, "async/staleness_3+": 2}
    assert busy_fraction([(0.0, 1.0), (2.0, 3.0)], 0.0, 4.0) == 0.5
    assert busy_fraction([(0.0, 10.0)], 2.0, 4.0) == 1.0
    cfg = load_config(None, ["mesh.rollout_devices=0.25"])
    devices = list(range(8))
    assert split_devices(cfg, devices) == ([0, 1], [2, 3, 4, 5, 6, 7])
    assert split_devices(load_config(None, ["mesh.rollout_devices=3"]), devices)[0] == [0, 1, 2]
    assert split_devices(load_config(None, []), devices) == (devices, devices)
    with pytest.raises(ValueError, match="both meshes need at least one device"):
        split_devices(load_config(None, ["mesh.rollout_devices=8"]), devices)


@pytest.mark.slow  # ~45 s: a subprocess with 2 devices (the in-process tests cover the logic)
def test_split_meshes_on_two_devices(tmp_path):
    """tests/multidevice/async_checks.py with 2 CPU devices: 1 rollout + 1 train device."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "multidevice" / "async_checks.py"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["train_devices"] == [1] and r["rollout_devices"] == [0]
    assert r["reshard_equal"] and r["reshard_on_rollout_device"]
    assert r["on_policy_max_diff"] == 0.0  # async on split meshes == sync on the train device
    assert r["staleness_max"] <= 1 and r["steps"] == 4


@pytest.mark.slow  # ~45 s: two processes with gloo collectives
def test_two_processes_train_together_while_each_samples_alone(tmp_path):
    """tests/multidevice/async_multihost_worker.py in 2 processes x 2 CPU devices (gloo): each
    process's rollout mesh is its own device, the train mesh spans both processes' other device;
    3 steps at max_staleness 1, then save and restore. Both processes agree on every decision."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).resolve().parent / "multidevice" / "async_multihost_worker.py"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path), str(i), "2", port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    a, b = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    assert a["status"] == b["status"] == "done" and a["meta_step"] == 3
    assert a["restore_equal"] and b["restore_equal"] and a["moved"] > 1e-5
    assert a["versions"] == b["versions"] and a["digest"] == b["digest"]  # one decision, one model
    for step, versions, kept in a["versions"]:  # 2 groups of 4, at most one update old
        assert kept == 8 and all(step - 1 <= v <= step for v in versions)
    assert a["train_devices"] == b["train_devices"] and len(a["train_devices"]) == 2
    assert len(a["rollout_devices"]) == 1 and a["rollout_devices"] != b["rollout_devices"]
    assert not set(a["rollout_devices"]) & set(a["train_devices"])


@pytest.mark.parametrize("override,match", [
    ("rollout.mode=later", "rollout.mode"), ("rl.max_staleness=-1", "rl.max_staleness"),
    ("mesh.rollout_devices=1.5", "mesh.rollout_devices"), ("rl.async_queue=0", "rl.async_queue")])
def test_bad_async_settings_are_one_clear_error(override, match):
    with pytest.raises(InputError, match=match):
        validate_config(load_config(None, [override]), overrides=[override])
