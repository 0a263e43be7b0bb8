"""The embedded default end to end (configs/micro.yaml: every stage, tiny everything), plus the
needle_kv documents and the warm start's teacher transcripts it is built on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memagent_jax.agent.memory import make_policy
from memagent_jax.agent.prompts import PromptBuilder, PromptTemplates
from memagent_jax.data import needle_kv as nk
from memagent_jax.demo import STAGES, load_demo_config, run_demo

MICRO = "micro"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from memagent_jax.tokenizer import train_sentencepiece

    return train_sentencepiece(nk.tokenizer_corpus(), tmp_path_factory.mktemp("tok"), 1024)


def test_needle_documents_have_exact_chunks_and_held_out_keys(tokenizer):
    values = {split: set(nk.split_values(split)) for split in nk.SPLITS}
    keys = {split: set(nk.split_keys(tokenizer, split)) for split in nk.SPLITS}
    for kind in (values, keys):
        assert kind["train"] and kind["eval"] and not kind["train"] & kind["eval"]
    for key in keys["eval"] | keys["train"]:  # one whole-word token each
        assert len(tokenizer.encode(" " + key)) == 1 and key not in ("secret", "code")
        assert nk.needles_in(nk.needle_text(key, "7K")) == [(key, "7K")]
        assert nk.noted_value(nk.note_text(key, "7K")) == "7K" and not nk.noted_value(nk.note_text(key, None))
    for split, chunks in (("train", 1), ("train", 3), ("eval", 7)):
        spec = nk.NeedleSpec(chunk_size=48, num_chunks=chunks, split=split)
        for s in nk.generate(spec, tokenizer, 12, seed=1):
            ids = tokenizer.encode(s["context"])
            assert -(-len(ids) // 48) == chunks == s["num_chunks"]
            target = nk.needle_text(s["key"], s["value"])
            holding = [c for c in range(chunks) if target in tokenizer.decode(ids[48 * c:48 * c + 48])]
            assert holding == [s["needle_chunk"]]  # whole, in exactly one chunk
            assert s["key"] in keys[split] and s["value"] in values[split]
            assert set(s["distractor_keys"]) <= keys[split]
            assert s["answers"] == [s["value"]] and s["question"] == nk.question_text(s["key"])
            assert 1 <= len(s["distractor_keys"]) <= 3 and s["key"] not in s["distractor_keys"]
            found = nk.needles_in(s["context"])
            assert (s["key"], s["value"]) in found and len(found) == 1 + len(s["distractor_keys"])
    seen = nk.generate(nk.NeedleSpec(48, 2, split="eval", key_split="train"), tokenizer, 6, seed=1)
    assert all(s["key"] in keys["train"] and s["value"] in values["eval"] for s in seen)
    a = nk.generate(nk.NeedleSpec(48, 2), tokenizer, 3, seed=5)
    assert a == nk.generate(nk.NeedleSpec(48, 2), tokenizer, 3, seed=5)  # deterministic


@pytest.mark.parametrize("careless", [0.0, 1.0])
def test_teacher_transcripts_follow_the_rollout_prompts(tokenizer, careless):
    from memagent_jax.rl.sft import teacher_transcripts

    spec = nk.NeedleSpec(chunk_size=48, num_chunks=3)
    samples = nk.generate(spec, tokenizer, 6, seed=2)
    policy = make_policy("overwrite", chunk_size=48, max_chunks=3, max_memory_tokens=8)
    builder = PromptBuilder(tokenizer, PromptTemplates(first_memory=nk.NOTHING))
    teacher = nk.NeedleTeacher(careless)
    convs = teacher_transcripts(samples, policy=policy, builder=builder, tokenizer=tokenizer, teacher=teacher)
    assert len(convs) == 6 * (3 + 1)
    ids = [tokenizer.encode(s["context"]) for s in samples]
    for i, s in enumerate(samples):
        turns = convs[4 * i:4 * i + 4]
        chunk_needles = [nk.needles_in(tokenizer.decode(ids[i][48 * c:48 * c + 48])) for c in range(3)]
        if careless:  # the first code seen, whatever its key
            first = min(c for c in range(3) if chunk_needles[c])
            noted = [None if c < first else chunk_needles[first][0][1] for c in range(3)]
        else:
            noted = [s["value"] if c >= s["needle_chunk"] else None for c in range(3)]
        assert teacher.is_careless(s) == bool(careless)
        for k, (prompt, reply, kind) in enumerate(turns[:3]):
            assert reply[-1] == tokenizer.eos_id
            assert tokenizer.decode(reply) == nk.note_text(s["key"], noted[k])
            before = noted[k - 1] if k else None  # the first memory is "none", i.e. nothing noted
            assert kind == ("keep" if noted[k] == before else "write")
        prompt, reply, kind = turns[3]
        assert kind == "final"
        assert tokenizer.decode(reply) == "\\boxed{" + noted[2] + "}"
        memory = tokenizer.encode(nk.note_text(s["key"], noted[2]))
        assert prompt == builder.final_prompt(tokenizer.encode(s["question"]), memory)
    with pytest.raises(ValueError, match="careless"):
        nk.NeedleTeacher(1.5)


def test_sft_lowers_the_response_loss(tokenizer):
    from memagent_jax.models import ModelConfig, init_model
    from memagent_jax.rl.sft import SFTSettings, train_sft

    examples = [(tokenizer.encode("Question: red?"), tokenizer.encode("blue") + [tokenizer.eos_id])] * 4
    model = init_model(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_layers=1, num_heads=2, num_kv_heads=1, tie_word_embeddings=True))
    _, history = train_sft(model, examples, SFTSettings(steps=20, batch_size=4, lr=1e-2, warmup_steps=2))
    assert history[-1]["loss"] < 0.25 * history[0]["loss"]


def test_demo_config_splits_demo_overrides():
    cfg, demo = load_demo_config(MICRO, ["demo.sft_steps=7", "rl.train_batch_size=2", "optim.lr=0.5"])
    assert demo.sft_steps == 7 and cfg.optim.lr == 0.5 and cfg.rl.train_batch_size == 2
    with pytest.raises(KeyError, match="demo.nope"):
        load_demo_config(MICRO, ["demo.nope=1"])


def test_demo_end_to_end_then_resume(tmp_path):
    from memagent_jax import models
    from memagent_jax.tokenizer import load_tokenizer

    out = tmp_path / "demo"
    result = run_demo(out_dir=out, fresh=True, config=MICRO)
    assert result["stages"] == {s: "ran" for s in STAGES}

    for f in ("tokenizer/tokenizer.model", "data/sft.jsonl", "data/rl.jsonl", "data/eval_1x.jsonl",
              "data/eval_2x.jsonl", "data/seen_keys_2x.jsonl", "rl/train_config.yaml",
              "sft/hf/config.json", "sft/metrics.jsonl", "rl/metrics.jsonl",
              "eval/results.json", "hf/config.json", "hf/model.safetensors", "report.md", "summary.json"):
        assert (out / f).is_file(), f
    assert any((out / "rl" / "checkpoints").iterdir())
    for png in ("training_curves.png", "accuracy_vs_length.png", "seconds_per_chunk.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000, png

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["accuracy"]) == {"rl", "warm_start", "no_document"}
    assert set(summary["accuracy_seen_keys"]) == {"rl", "warm_start"}
    for by_len in [*summary["accuracy"].values(), *summary["accuracy_seen_keys"].values()]:
        assert set(by_len) == {"1x", "2x"} and all(0.0 <= v <= 1.0 for v in by_len.values())
    assert summary["train_length_chunks"] == 2 and summary["chunk_size"] == 32
    assert set(STAGES) | {"total"} == set(summary["wall_time_s"])
    assert summary["machine"] and summary["date"]
    assert len([json.loads(ln) for ln in (out / "rl" / "metrics.jsonl").read_text().splitlines()]) == 2

    report = (out / "report.md").read_text()
    assert "| policy | 1x (2 chunks) | 2x (4 chunks) |" in report
    for label in ("RL (DAPO)", "warm start (SFT)", "no document"):
        assert f"| {label} |" in report

    model = models.from_pretrained(out / "hf")  # the exported RL policy serves from its folder
    tok = load_tokenizer(out / "hf")
    logits = np.asarray(model(np.array([tok.encode("What is the secret code of people?")], np.int32)))
    assert logits.shape[-1] == model.config.vocab_size and np.isfinite(logits).all()

    again = run_demo(out_dir=out, config=MICRO)  # everything done: every stage skips
    assert again["stages"] == {s: "skipped" for s in STAGES}
    (out / "eval" / "done.json").unlink()  # a lost stage re-runs, and so does everything after it
    partial = run_demo(out_dir=out, config=MICRO)
    assert partial["stages"] == {**{s: "skipped" for s in STAGES[:4]}, "eval": "ran", "report": "ran"}
