"""Random streams derive from one seed by fold_in (memagent_jax.seeds): the trainer's generation
batches, the rollout's turns and the sampler's rows each fold their index into the key, so no two
streams of a run coincide (the old integer sums (seed * 1_000_003 + step * 1009 + batch) * 4096 +
turn did, e.g. step 0 batch 1009 and step 1 batch 0)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from tiny_policy import AsciiTokenizer, docs, tiny_model

from memagent_jax import sampler
from memagent_jax.config import load_config
from memagent_jax.rl.trainer import Trainer
from memagent_jax.seeds import as_key, derive
from memagent_jax.types import SampleOutput

TOK = AsciiTokenizer()


def test_derive_folds_each_index_into_the_key():
    key = jax.random.PRNGKey(5)
    want = jax.random.fold_in(jax.random.fold_in(key, 3), 8)
    assert derive(5, 3, 8).tolist() == np.asarray(want).tolist()
    assert derive(derive(5, 3), 8).tolist() == derive(5, 3, 8).tolist()  # keys compose
    assert derive(5).tolist() == as_key(5).tolist() == np.asarray(key).tolist()
    streams = {tuple(derive(s, a, b).tolist()) for s in range(3) for a in range(20) for b in range(20)}
    assert len(streams) == 3 * 20 * 20
    with pytest.raises(ValueError, match=r"seed=-1 must be in \[0, 2\*\*32\)"):
        as_key(-1)
    with pytest.raises(ValueError, match="an int or a PRNG key's uint32"):
        as_key(np.zeros(3, np.float32))


def test_sampler_takes_a_derived_key_as_its_seed():
    model = tiny_model()
    prompts = [[5, 6, 7], [8, 9]]
    kw = dict(max_new_tokens=6, temperature=1.0)
    by_int = sampler.generate(model, prompts, seed=7, **kw)
    assert sampler.generate(model, prompts, seed=as_key(7), **kw).tokens == by_int.tokens
    assert sampler.generate(model, prompts, seed=derive(7, 1), **kw).tokens != by_int.tokens


def _cfg(tmp_path):
    return load_config(None, [
        "agent.memory_template=Q{prompt}M{memory}C{chunk}>", "agent.final_template=Q{prompt}M{memory}>",
        "agent.first_memory=-", "agent.chunk_size=12", "agent.max_chunks=3",
        "agent.max_memory_tokens=4", "agent.max_final_new_tokens=4", "agent.question_budget=64",
        "rollout.group_size=2", "rl.train_batch_size=2", "rl.gen_batch_size=2",
        "rl.mini_batch_size=1", "trainer.seed=3", f"trainer.out_dir={tmp_path}",
        "trainer.progress=false", "trainer.async_checkpoint=false"])


def test_trainer_streams_fold_in_step_batch_and_turn(tmp_path):
    """Two RL steps of 2 generation batches each (one mixed group per batch): turn k of batch b at
    step s samples from derive(trainer.seed, s, b, k); all 16 streams differ."""
    seen: list[list[int]] = []

    def generate(prompts, *, max_new_tokens, seed, **_):
        seen.append(np.asarray(seed).tolist())
        ids = TOK.encode("ab") + [TOK.eos_id]
        return SampleOutput([ids] * len(prompts), [[-1.0] * 3] * len(prompts), ["eos"] * len(prompts))

    def reward(t):  # even documents all right (filtered out), odd ones mixed
        r = 1.0 if int(t.ground_truths[0][1:]) % 2 == 0 else float(t.trajectory_id % 2)
        return r, r

    def batches():
        for i in range(100):
            batch = docs(2, 30, seed=i)  # 30 characters: 3 chunks of 12
            for j, d in enumerate(batch):
                d["answers"] = [f"a{2 * i + j}"]
            yield batch

    trainer = Trainer(_cfg(tmp_path), tiny_model(), TOK, batches(), reward_fn=reward,
                      generate_fn=generate)
    for step in range(2):
        trainer.rl_step = step
        assert trainer.collect().gen_batches == 2
    trainer.close()
    want = [derive(3, s, b, k).tolist() for s in range(2) for b in range(2) for k in range(4)]
    assert seen == want
    assert len({tuple(x) for x in seen}) == 16


def test_sliced_sampler_calls_sample_what_the_whole_call_samples(tmp_path):
    """rollout.max_rows_per_call splits a turn into slices; each slice's rows keep the keys of the
    whole call (seed, row), so the cap bounds memory without changing the samples."""
    prompts = [[5 + i, 6, 7][: 1 + i % 3] for i in range(5)]
    outs = []
    for cap in (0, 2):
        cfg = load_config(None, ["rollout.engine=static", "rollout.temperature=1.0",
                                 f"rollout.max_rows_per_call={cap}", f"trainer.out_dir={tmp_path}"])
        trainer = Trainer(cfg, tiny_model(), TOK, iter([]), reward_fn=lambda t: (0.0, 0.0))
        outs.append(trainer.generate_fn()(prompts, max_new_tokens=5, seed=derive(3, 1)))
        trainer.close()
    assert outs[0].tokens == outs[1].tokens
    np.testing.assert_allclose(np.concatenate(outs[0].logps), np.concatenate(outs[1].logps), atol=1e-5)


def test_derive_rows_equals_derive_row_by_row():
    """The engine's rollout takes its requests' keys from one batched call: the same bits."""
    from memagent_jax.seeds import derive, derive_rows

    key = derive(7, 3)
    rows = np.array([0, 5, 2**32 - 1, 17, 9])
    got = derive_rows(key, rows)
    assert got.shape == (5, 2) and got.dtype == np.uint32
    for r, k in zip(rows, got):
        np.testing.assert_array_equal(k, derive(key, int(r)))
    assert derive_rows(11, np.arange(0)).shape == (0, 2)
    with pytest.raises(ValueError, match="stream indices"):
        derive_rows(key, np.array([-1]))
