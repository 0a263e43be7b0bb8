"""The DAPO trainer: exact token-mean under accumulation, dynamic sampling with refill,
a short RL run that learns, and kill-and-resume that is bitwise identical."""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_policy import AsciiTokenizer, docs, tiny_model

from memagent_jax.config import load_config
from memagent_jax.rl.train_step import (
    LossSettings,
    accumulate,
    init_train_state,
    make_optimizer,
    micro_batch_grads,
)
from memagent_jax.rl.trainer import DynamicSamplingError, Trainer
from memagent_jax.types import SampleOutput

TOK = AsciiTokenizer()
SHORT = ["agent.memory_template=Q{prompt}M{memory}C{chunk}>", "agent.final_template=Q{prompt}M{memory}>",
         "agent.first_memory=-"]


def _cfg(tmp_path, *extra):
    return load_config(None, [
        *SHORT, "agent.chunk_size=12", "agent.max_chunks=3", "agent.max_memory_tokens=4",
        "agent.max_final_new_tokens=4", "agent.question_budget=64", "rollout.group_size=4",
        "rl.train_batch_size=2", "rl.gen_batch_size=2", "rl.mini_batch_size=2",
        "optim.warmup_steps=1", f"trainer.out_dir={tmp_path}", "trainer.progress=false",
        "trainer.async_checkpoint=false", *extra])


def _stream(n_docs: int, seed0: int = 0):
    i = seed0
    while True:
        yield docs(n_docs, 30, seed=i)
        i += 1



def test_config_overrides_parse_floats_without_a_dot_and_reject_junk():
    cfg = load_config(None, ["optim.lr=1e-3", "rl.eps_high=2e-1", "rl.clip_c=3"])
    assert cfg.optim.lr == 1e-3 and cfg.rl.eps_high == 0.2 and cfg.rl.clip_c == 3.0
    with pytest.raises(ValueError, match="optim.lr"):
        load_config(None, ["optim.lr=fast"])

def test_token_mean_is_exact_under_uneven_micro_batches():
    model = tiny_model()
    graphdef, state = init_train_state(model, make_optimizer(1e-3, 1, 1))
    rng = np.random.default_rng(0)
    n, t = 8, 24
    mask = (rng.random((n, t)) < 0.6).astype(np.float32)
    mask[3] = 0.0  # an empty row
    batch = {"tokens": rng.integers(4, 132, (n, t)).astype(np.int32), "mask": mask,
             "advantages": (rng.normal(size=(n, 1)) * mask).astype(np.float32),
             "sampler_logp": np.zeros((n, t), np.float32),
             "old_logp": rng.normal(-4.0, 0.3, (n, t)).astype(np.float32)}
    settings = LossSettings(eps_low=0.2, eps_high=0.28, clip_c=3.0)
    den = jnp.float32(mask.sum())
    whole, _ = micro_batch_grads(graphdef, state.params, {k: jnp.asarray(v) for k, v in batch.items()},
                                 den, settings)
    def padded(rows):  # a micro-batch padded to 4 rows with mask-0 rows (one compiled shape)
        return {k: jnp.asarray(np.concatenate([v[rows], np.zeros((4 - len(v[rows]),) + v.shape[1:],
                                                                 v.dtype)])) for k, v in batch.items()}

    acc = None
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6), slice(6, 8)):  # uneven micro-batches
        g, _ = micro_batch_grads(graphdef, state.params, padded(rows), den, settings)
        acc = g if acc is None else accumulate(acc, g)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(acc)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # A mean of micro-batch means would differ: check the test can tell.
    g0, _ = micro_batch_grads(graphdef, state.params, padded(slice(0, 1)),
                              jnp.float32(mask[0:1].sum()), settings)
    assert not np.allclose(np.asarray(jax.tree.leaves(g0)[0]), np.asarray(jax.tree.leaves(acc)[0]))


def _scripted_generate(prompts, *, max_new_tokens, seed, **_):
    """Replies 'ab' + EOS to every prompt (deterministic)."""
    ids = TOK.encode("ab") + [TOK.eos_id]
    return SampleOutput(tokens=[ids[:max_new_tokens]] * len(prompts),
                        logps=[[-1.0] * min(3, max_new_tokens)] * len(prompts),
                        finish_reasons=["eos"] * len(prompts))


def _scripted_reward(t):
    """Documents whose question index is even are all-correct groups; odd ones are mixed."""
    q = int(t.ground_truths[0][1:])
    r = 1.0 if q % 2 == 0 else float(t.trajectory_id % 2)
    return r, r


def _numbered_docs():
    i = 0
    while True:
        batch = docs(2, 30, seed=i)
        for j, d in enumerate(batch):
            d["answers"] = [f"a{2 * i + j}"]  # doc 2i is all-correct, 2i+1 is mixed
        yield batch
        i += 1


def test_dynamic_sampling_refills_to_exact_train_batch(tmp_path):
    cfg = _cfg(tmp_path, "rl.train_batch_size=3", "rl.gen_batch_size=2", "rl.mini_batch_size=3")
    trainer = Trainer(cfg, tiny_model(), TOK, _numbered_docs(), reward_fn=_scripted_reward,
                      generate_fn=_scripted_generate)
    collected = trainer.collect()
    # Each generation batch holds one mixed group: 3 batches are needed for 3 groups.
    assert collected.gen_batches == 3 and collected.groups_seen == 6
    trajs = collected.batch.trajectories
    groups = sorted({t.group_id for t in trajs})
    assert groups == [0, 1, 2] and len(trajs) == 3 * 4
    for g in groups:  # every kept group is mixed
        assert len({float(t.trajectory_id % 2 == 0) for t in trajs if t.group_id == g}) >= 1
    acc_by_group = {g: [r for t, r in zip(trajs, collected.rewards) if t.group_id == g] for g in groups}
    assert all(0 < np.mean(v) < 1 for v in acc_by_group.values())
    # Every conversation of a kept trajectory comes along (chunks of 30 chars / 12 = 3 + final).
    assert len(collected.batch.conversations) == 12 * 4
    metrics = trainer.update(collected)
    assert metrics["batch/trajectories"] == 12
    # the off-policy correction's metrics (rl/off_policy.py), token fractions; both corrections off
    assert metrics["actor/mis_masked"] == 0 and metrics["actor/tis_clipped"] == 0
    assert metrics["actor/logp_gap"] > 0
    trainer.close()


def test_dynamic_sampling_errors_when_gen_batches_exhausted(tmp_path):
    cfg = _cfg(tmp_path, "rl.train_batch_size=3", "rl.gen_batch_size=2", "rl.mini_batch_size=3",
               "rl.max_num_gen_batches=2")
    trainer = Trainer(cfg, tiny_model(), TOK, _numbered_docs(), reward_fn=_scripted_reward,
                      generate_fn=_scripted_generate)
    with pytest.raises(DynamicSamplingError, match="max_num_gen_batches=2"):
        trainer.collect()
    trainer.close()


TARGET = set(TOK.encode("xyzw"))


def _target_reward(t):
    ids = TOK.encode(t.answer_text)
    r = sum(i in TARGET for i in ids) / 4.0
    return r, r


def test_short_rl_run_raises_reward(tmp_path):
    cfg = _cfg(tmp_path, "rollout.group_size=8", "rl.train_batch_size=4", "rl.gen_batch_size=4",
               "rl.mini_batch_size=4", "rl.filter_groups=false", "optim.lr=0.01",
               "optim.weight_decay=0.0", "trainer.total_steps=24", "trainer.save_every=100")
    trainer = Trainer(cfg, tiny_model(), TOK, _stream(4), reward_fn=_target_reward)
    rewards = [trainer.train_step()["reward/mean"] for _ in range(24)]
    trainer.close()
    first, last = np.mean(rewards[:6]), np.mean(rewards[-6:])
    assert last > first + 0.15 and last > 0.25, rewards


def _params(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)]


def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path):
    from memagent_jax.data.loader import loader_state, make_loader, restore_loader

    source = docs(16, 30, seed=3)
    extra = ("rollout.group_size=4", "rl.train_batch_size=2", "rl.gen_batch_size=2",
             "rl.mini_batch_size=1", "rl.filter_groups=false", "optim.lr=0.01",
             "trainer.total_steps=4", "trainer.save_every=100")

    def make(out, reward_fn):
        it = make_loader(source, batch_size=2, seed=5, shuffle=True, shard_index=0, shard_count=1)
        trainer = Trainer(_cfg(out, *extra), tiny_model(), TOK, it, reward_fn=reward_fn,
                          data_state=(lambda: loader_state(it), lambda s: restore_loader(it, s)))
        return trainer

    full = make(tmp_path / "full", _target_reward)
    assert full.run() == "done"
    expected = _params(full)
    full.close()

    calls = {"n": 0}

    def killing_reward(t):  # SIGTERM arrives during step 2's rollout
        calls["n"] += 1
        if calls["n"] == 8 * 1 + 1:  # first reward of step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return _target_reward(t)

    first = make(tmp_path / "resumed", killing_reward)
    assert first.run() == "interrupted" and first.rl_step == 2
    first.close()
    second = make(tmp_path / "resumed", _target_reward)
    assert second.run() == "done" and second.rl_step == 4
    for a, b in zip(expected, _params(second)):
        np.testing.assert_array_equal(a, b)
    second.close()


def test_mini_batches_hold_whole_groups(tmp_path, monkeypatch):
    """rl.mini_batch_size counts groups: 4 groups, 2 per optimizer step -> 2 updates, each over
    every conversation of its 2 groups (none split between steps)."""
    import memagent_jax.rl.trainer as trainer_module

    cfg = _cfg(tmp_path, "rl.train_batch_size=4", "rl.gen_batch_size=4", "rl.mini_batch_size=2",
               "rl.filter_groups=false", "rl.micro_batch_tokens=64")
    trainer = Trainer(cfg, tiny_model(), TOK, _numbered_docs_of(4), reward_fn=_scripted_reward,
                      generate_fn=_scripted_generate)
    collected = trainer.collect()
    group_of = np.array([c.group_id for c in collected.batch.conversations])
    steps: list[list[int]] = [[]]
    arrays, apply = trainer_module.micro_batch_arrays, trainer.apply_update

    def record_rows(batch, rows, lengths, multiple, extra=None):
        if extra is not None:  # the update's micro-batches (the log-prob pass passes no extra)
            steps[-1].extend(rows.tolist())
        return arrays(batch, rows, lengths, multiple, extra)

    def record_step(*args):
        steps.append([])
        return apply(*args)

    monkeypatch.setattr(trainer_module, "micro_batch_arrays", record_rows)
    trainer.apply_update = record_step
    trainer.update(collected)
    trainer.close()
    steps = [s for s in steps if s]
    assert len(steps) == 2 and sorted(sum(steps, [])) == list(range(len(group_of)))
    for rows in steps:
        groups = set(group_of[rows].tolist())
        assert len(groups) == 2
        assert sorted(rows) == np.flatnonzero(np.isin(group_of, list(groups))).tolist()


def _numbered_docs_of(n: int):
    i = 0
    while True:
        batch = docs(n, 30, seed=i)
        for j, d in enumerate(batch):
            d["answers"] = [f"a{n * i + j}"]
        yield batch
        i += 1


@pytest.mark.parametrize("metric", ["accuracy", "reward"])
def test_filter_metric_chooses_what_dynamic_sampling_filters_on(tmp_path, metric):
    """The reward spreads within even documents' groups, the accuracy within odd ones': the
    kept groups follow rl.filter_metric. The trajectories carry both values."""
    def reward_fn(t):
        doc, member = int(t.ground_truths[0][1:]), t.trajectory_id % 2
        return (float(member), 1.0) if doc % 2 == 0 else (0.5, float(member))

    cfg = _cfg(tmp_path, "rl.train_batch_size=1", "rl.gen_batch_size=2", "rl.mini_batch_size=1",
               f"rl.filter_metric={metric}")
    trainer = Trainer(cfg, tiny_model(), TOK, _numbered_docs(), reward_fn=reward_fn,
                      generate_fn=_scripted_generate)
    collected = trainer.collect()
    trainer.close()
    kept_docs = {int(t.ground_truths[0][1:]) % 2 for t in collected.batch.trajectories}
    assert kept_docs == ({1} if metric == "accuracy" else {0})
    for t in collected.batch.trajectories:
        assert (t.reward, t.accuracy) == reward_fn(t)


def test_unknown_filter_metric_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path, "rl.filter_metric=acc")
    with pytest.raises(ValueError, match=r"rl.filter_metric='acc'.*\('accuracy', 'reward'\)"):
        Trainer(cfg, tiny_model(), TOK, _numbered_docs(), generate_fn=_scripted_generate)
