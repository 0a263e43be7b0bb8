"""A LoRA RL run end to end on a tiny HF base (adapter dropout on): checkpoints hold only the
adapters, a resumed run equals an uninterrupted one bitwise (the dropout masks too), and `export --adapter` writes a PEFT folder that
transformers + peft load on the base with our merged policy's logits."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from test_trainer import _cfg

ESSAYS = Path(__file__).resolve().parent.parent / "memagent_jax" / "data" / "essays"
LORA = ("model.lora.rank=4", "model.lora.alpha=8", "model.lora.dropout=0.1", "rollout.group_size=4", "rl.train_batch_size=2",
        "rl.gen_batch_size=2", "rl.mini_batch_size=1", "rl.filter_groups=false", "optim.lr=0.05",
        "optim.weight_decay=0.0", "rl.kl_coef=0.01", "trainer.save_every=1")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny random Qwen2 HF folder (q/k/v bias, untied head) with a SentencePiece tokenizer."""
    from memagent_jax.models import ModelConfig, init_model, save_pretrained
    from memagent_jax.tokenizer import train_sentencepiece

    base = tmp_path_factory.mktemp("lora_base")
    tok = train_sentencepiece([(ESSAYS / n).read_text() for n in ("avg.txt", "gap.txt")], base,
                              vocab_size=400)
    shape = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=2, num_kv_heads=1, max_position_embeddings=512)
    save_pretrained(init_model(shape, seed=0), base)
    return base


def _trainer(run: Path, base: Path, steps: int):
    from memagent_jax.data.loader import loader_state, make_loader, restore_loader
    from memagent_jax.rl.trainer import Trainer
    from memagent_jax.train_run import load_train_policy, save_run_base

    cfg = _cfg(run, f"model.path={base}", *LORA, f"trainer.total_steps={steps}")
    model, tok = load_train_policy(cfg, seed=cfg.trainer.seed)
    docs = [{"question": f"q{i}?", "context": "abc def ghi " * 3, "answers": ["a"]} for i in range(8)]
    it = make_loader(docs, batch_size=2, seed=5, shuffle=True, shard_index=0, shard_count=1)

    def reward(t):  # rewards answers that start with a vowel-ish id: any signal will do
        ids = tok.encode(t.answer_text)
        r = float(bool(ids) and ids[0] % 3 == 0)
        return r, r

    trainer = Trainer(cfg, model, tok, it, reward_fn=reward,
                      data_state=(lambda: loader_state(it), lambda s: restore_loader(it, s)))
    save_run_base(trainer.model(), tok, run, base_model=str(base), seed=cfg.trainer.seed)
    return trainer


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow  # ~80 s on 2 cores: three short RL runs, an export, torch + peft
def test_lora_run_resumes_exactly_and_exports_a_peft_adapter(base_model, tmp_path):
    whole = _trainer(tmp_path / "whole", base_model, 3)
    base_before = _leaves(whole.frozen)
    assert whole.run() == "done"
    expected = _leaves(whole.state)
    for a, b in zip(base_before, _leaves(whole.frozen)):
        np.testing.assert_array_equal(a, b)  # the base never moves
    whole.close()

    first = _trainer(tmp_path / "run", base_model, 2)
    assert first.run() == "done"
    first.close()
    with pytest.warns(UserWarning, match="other settings"):  # total_steps 2 -> 3
        second = _trainer(tmp_path / "run", base_model, 3)
        assert second.run() == "done" and second.rl_step == 3
    for a, b in zip(expected, _leaves(second.state)):
        np.testing.assert_array_equal(a, b)
    meta = (tmp_path / "run" / "checkpoints" / "3" / "state" / "_METADATA").read_text()
    assert "q_proj_lora_a" in meta and "down_proj_lora_b" in meta
    assert '"embed"' not in meta and "'embed'" not in meta  # only adapters (+ their AdamW state)
    ids = np.asarray(np.random.default_rng(0).integers(3, 390, (2, 16)), np.int32)
    ours = np.asarray(second.model()(ids))
    second.close()

    from memagent_jax.models import from_pretrained
    from memagent_jax.train_run import export_checkpoint

    out = export_checkpoint(tmp_path / "run", tmp_path / "hf", adapter=True)
    np.testing.assert_allclose(np.asarray(from_pretrained(out)(ids)), ours, atol=1e-4)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    assert config["lora_dropout"] == 0.1
    assert config["base_model_name_or_path"] == str(base_model)

    peft = pytest.importorskip("peft", reason="peft is the test-only dependency for this check")
    import torch
    import transformers

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_model, torch_dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(hf_base, out / "adapter").eval()
    with torch.no_grad():
        theirs = adapted(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert float(np.abs(ours - np.asarray(from_pretrained(base_model)(ids))).max()) > 1e-3
