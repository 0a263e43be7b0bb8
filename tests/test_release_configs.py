"""Checkpoints shaped like real releases: Llama-3.2 (eos ids as a list, "llama3" rope scaling,
tied embeddings) and Qwen2.5 (several eos ids in generation_config.json). Parity with
transformers, jitted generation, the export round trip, and `answer` and `train` end to end with a
list of eos ids in config.json."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from memagent_jax import cli, models, sampler
from memagent_jax.models import ModelConfig, init_model, save_pretrained
from memagent_jax.tokenizer import load_tokenizer, train_sentencepiece

KINDS = ("llama3", "qwen2_5")
ESSAYS = Path(__file__).resolve().parent.parent / "memagent_jax" / "data" / "essays"


@pytest.fixture(scope="module")
def release_checkpoints(tmp_path_factory):
    from hf_models import save_hf_model

    return {kind: (path, save_hf_model(kind, path))
            for kind in KINDS for path in [tmp_path_factory.mktemp(kind)]}


def test_config_keeps_eos_ids_hashable():
    cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                      num_kv_heads=1, eos_token_id=[5, 6])
    assert cfg.eos_token_id == (5, 6) and hash(cfg) == hash(cfg.replace())
    assert cfg.to_hf_dict()["eos_token_id"] == [5, 6]
    assert ModelConfig.from_hf_dict({**cfg.to_hf_dict(), "eos_token_id": 7}).eos_token_id == 7
    with pytest.raises(ValueError, match="eos_token_id='2'.*list of them"):
        ModelConfig.from_hf_dict({**cfg.to_hf_dict(), "eos_token_id": "2"})


@pytest.mark.parametrize("kind", KINDS)
def test_release_shaped_checkpoint_loads_generates_and_round_trips(release_checkpoints, kind,
                                                                   tmp_path):
    path, hf_model = release_checkpoints[kind]
    model = models.from_pretrained(path)
    want_eos = {"llama3": (1, 2, 3), "qwen2_5": 2}[kind]
    assert model.config.eos_token_id == want_eos
    hash(nnx.split(model)[0])  # the graphdef is a static jit argument
    ids = np.random.default_rng(0).integers(0, 96, size=(2, 70))  # past the llama3 scaling's 64
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids, jnp.int32))), theirs, atol=1e-4)
    out = sampler.generate(model, [[5, 6, 7], [8]], max_new_tokens=4, temperature=1.0, seed=3,
                           eos_ids=(1, 2, 3))
    assert len(out.tokens) == 2 and all(1 <= len(t) <= 4 for t in out.tokens)

    exported = models.save_pretrained(model, tmp_path / "export")
    written = json.loads((exported / "config.json").read_text())
    assert written["eos_token_id"] == (list(want_eos) if isinstance(want_eos, tuple) else want_eos)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.tensor(ids)).logits.numpy(), theirs, atol=1e-4)


@pytest.fixture(scope="module")
def list_eos_model_dir(tmp_path_factory):
    """A tiny Llama-3-shaped policy with a SentencePiece tokenizer; config.json and
    generation_config.json list several eos ids, as Llama-3.x releases do."""
    out = tmp_path_factory.mktemp("list_eos")
    text = [(ESSAYS / name).read_text() for name in ("avg.txt", "gap.txt", "wisdom.txt")]
    tok = train_sentencepiece(text, out, vocab_size=400)
    scaling = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
               ("original_max_position_embeddings", 64), ("rope_type", "llama3"))
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, architecture="llama", qkv_bias=False,
                      tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=scaling,
                      max_position_embeddings=1024, bos_token_id=1, eos_token_id=(2, 3))
    save_pretrained(init_model(cfg, seed=0), out)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [2, 3]
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3, 1]}))
    return out


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_answer_with_a_list_of_eos_ids(list_eos_model_dir, tmp_path, capsys, engine):
    assert set(load_tokenizer(list_eos_model_dir).eos_ids) >= {2, 3}
    doc = tmp_path / "doc.txt"
    doc.write_text("The code word is blue. " * 12)
    rc = cli.main(["answer", "--model", str(list_eos_model_dir), "--doc", str(doc), "--question",
                   "What is the code word?", "--chunk-size", "32", "--max-memory-tokens", "4",
                   "--max-answer-tokens", "4", "--temperature", "1.0", "--engine", engine])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert " chunks," in err


def test_train_with_a_list_of_eos_ids(list_eos_model_dir, tmp_path, capsys):
    from memagent_jax.data.memagent_rows import write_rows

    rows = tmp_path / "rows.jsonl"
    write_rows([{"question": f"What is item {i}?", "context": f"Item {i} is blue. " * 4,
                 "answers": ["blue"]} for i in range(2)], rows)
    run = tmp_path / "run"
    rc = cli.main(["train", "memagent", f"model.path={list_eos_model_dir}",
                   "data.source=memagent_rows", f"data.path={rows}", f"trainer.out_dir={run}",
                   "trainer.total_steps=1", "trainer.progress=false", "rollout.group_size=2",
                   "rl.train_batch_size=2", "rl.gen_batch_size=2", "rl.mini_batch_size=1",
                   "rl.filter_groups=false", "agent.chunk_size=32", "agent.max_memory_tokens=4",
                   "agent.max_final_new_tokens=4"])
    assert rc == 0, capsys.readouterr().err
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((run / "hf" / "config.json").read_text())["eos_token_id"] == [2, 3]
