"""The memory agent through the real sampler on a tiny random Qwen2 checkpoint, and the README's
custom-policy example through a rollout and a training step."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tiny_policy import AsciiTokenizer, docs, tiny_model

from memagent_jax import models
from memagent_jax.agent.memory import make_policy
from memagent_jax.agent.prompts import PromptBuilder, PromptTemplates
from memagent_jax.agent.rollout import rollout, sampler_generate_fn
from memagent_jax.config import load_config
from memagent_jax.rl.trainer import Trainer

TOK = AsciiTokenizer()
README = Path(__file__).resolve().parent.parent / "README.md"


def test_rollout_with_real_sampler_on_tiny_qwen2_checkpoint(tmp_path):
    models.save_pretrained(tiny_model(seed=3), tmp_path)
    model = models.from_pretrained(tmp_path)
    assert model.config.architecture == "qwen2" and model.config.qkv_bias
    policy = make_policy("overwrite", chunk_size=16, max_chunks=8, max_memory_tokens=6)
    builder = PromptBuilder(TOK, PromptTemplates(memory_update="Q{prompt}M{memory}C{chunk}>",
                                                 final="Q{prompt}M{memory}>"))
    samples = [dict(d, context=d["context"][: n]) for d, n in zip(docs(3, 60, seed=2), (60, 20, 40))]
    gen = sampler_generate_fn(model, TOK, temperature=1.0)
    res = rollout(samples, policy=policy, builder=builder, tokenizer=TOK, generate_fn=gen,
                  group_size=2, training=True, gen_kwargs=dict(max_memory_new_tokens=6,
                                                               max_final_new_tokens=5, seed=1))
    chunks = [4, 2, 3]  # 60, 20, 40 characters in chunks of 16
    assert res.stats["rows_per_call"] == [6, 6, 4, 2, 6]
    for t in res.trajectories:
        assert t.num_chunks == chunks[t.group_id] and len(t.conversation_ids) == t.num_chunks + 1
        finals = [res.conversations[c] for c in t.conversation_ids if res.conversations[c].is_final]
        assert len(finals) == 1 and 1 <= len(finals[0].response) <= 5
    for c in res.conversations:
        assert len(c.sampler_logps) == len(c.response)
        assert all(lp <= 0 for lp in c.sampler_logps)
        assert max(c.response) < TOK.vocab_size
    # Spliced prompts equal encoding the rendered text (the char tokenizer has no merges).
    first = res.conversations[0]
    text = builder.memory_prompt_text(samples[0]["question"], "No previous memory",
                                      samples[0]["context"][:16])
    assert first.prompt == TOK.encode(text)


def _readme_policy_block() -> str:
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block and "register_policy" in block.group(1)
    return block.group(1)


def test_readme_custom_policy_runs_through_rollout_and_training(tmp_path):
    namespace: dict = {}
    exec(_readme_policy_block(), namespace)  # registers "keep_tail"
    cfg = load_config(None, [
        "agent.policy=keep_tail", "agent.policy_kwargs={keep: 10, chunk_size: 12, max_memory_tokens: 4}",
        "agent.memory_template=Q{prompt}M{memory}C{chunk}>", "agent.final_template=Q{prompt}M{memory}>",
        "agent.max_memory_tokens=4", "agent.max_final_new_tokens=4", "rollout.group_size=2",
        "rl.train_batch_size=2", "rl.gen_batch_size=2", "rl.mini_batch_size=2",
        "rl.filter_groups=false", f"trainer.out_dir={tmp_path}", "trainer.progress=false"])

    def stream():
        while True:
            yield docs(2, 36, seed=0)

    trainer = Trainer(cfg, tiny_model(), TOK, stream(), reward_fn=lambda t: (float(t.trajectory_id % 2), 0.0))
    assert type(trainer.policy).__name__ == "KeepTailPolicy" and trainer.policy.keep == 10
    collected = trainer.collect()
    convs = collected.batch.conversations
    for t in collected.batch.trajectories:
        assert t.num_chunks == 3
        memory = TOK.encode(cfg.agent.first_memory or "No previous memory")
        for k, cid in enumerate(t.conversation_ids[:-1]):  # replay the append rule
            reply = [i for i in convs[cid].response if i not in TOK.eos_ids and i != TOK.pad_id]
            memory = (memory + reply)[-10:]
            assert t.memories[k] == TOK.decode(memory)
    metrics = trainer.update(collected)
    assert np.isfinite(metrics["actor/grad_norm"]) and metrics["batch/trajectories"] == 4
    trainer.close()
