"""One source of truth for the rollout's size: `rollout.max_rows_per_call` is the engine's slots and
the static path's rows per call in the running trainer, and `plan` (and `compile`, which takes its
shapes from plan.rollout_rows / rollout_lengths) sizes exactly that program."""

from __future__ import annotations

import pytest
from tiny_policy import AsciiTokenizer, docs, tiny_model

from memagent_jax.config import load_config, turn_rows
from memagent_jax.plan import plan, rollout_lengths, rollout_rows
from memagent_jax.rl.trainer import Trainer

TOK = AsciiTokenizer()


def _cfg(tmp_path, *extra):
    return load_config(None, [
        "agent.memory_template=Q{prompt}M{memory}C{chunk}>", "agent.final_template=Q{prompt}M{memory}>",
        "agent.first_memory=-", "agent.chunk_size=12", "agent.max_chunks=3", "agent.max_memory_tokens=4",
        "agent.max_final_new_tokens=4", "agent.question_budget=64", "rollout.group_size=4",
        "rl.train_batch_size=2", "rl.gen_batch_size=6", "rl.mini_batch_size=2",
        f"trainer.out_dir={tmp_path}", "trainer.progress=false", "trainer.async_checkpoint=false",
        "model.vocab_size=132", *extra])


@pytest.mark.parametrize("rows,expected", [("5", 8), ("16", 16), ("0", 32)])  # 0: a turn's 6 x 4 = 24
def test_engine_slots_are_the_rows_plan_counts(tmp_path, rows, expected):
    cfg = _cfg(tmp_path, f"rollout.max_rows_per_call={rows}", "rollout.engine_max_len=256")
    trainer = Trainer(cfg, tiny_model(), TOK, iter([docs(6, 30)]))
    engine = trainer.generate_fn().make_engine()
    assert engine.num_slots == expected == rollout_rows(cfg, (1, 1, 1))
    assert engine.max_len == rollout_lengths(cfg)[2] == 256
    report = plan(cfg, 1, 80.0, mesh=(1, 1, 1), suggest=False)
    assert report.rollout_shape["rows"] == engine.num_slots
    assert report.rollout_shape["cache_length"] == engine.max_len


def test_static_path_calls_hold_at_most_the_planned_rows(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "rollout.engine=static", "rollout.max_rows_per_call=8")
    trainer = Trainer(cfg, tiny_model(), TOK, iter([docs(6, 30)]))
    calls = []
    import memagent_jax.sampler as sampler

    real = sampler.generate

    def spy(model, prompts, **kw):
        calls.append(len(prompts))
        return real(model, prompts, **kw)

    monkeypatch.setattr(sampler, "generate", spy)
    generate = trainer.generate_fn()
    generate([[1, 2, 3]] * 20, max_new_tokens=2, seed=0)
    assert calls == [8, 8, 4] and max(calls) == turn_rows(cfg) == 8
    assert plan(cfg, 1, 80.0, mesh=(1, 1, 1), suggest=False).rollout_shape["rows"] == 8


def test_engine_slots_key_is_removed_with_a_pointer(tmp_path):
    with pytest.raises(KeyError, match="rollout.engine_slots.*was removed.*max_rows_per_call"):
        _cfg(tmp_path, "rollout.engine_slots=8")
