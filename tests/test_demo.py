"""The embedded default end to end (configs/micro.yaml: every stage, tiny everything), plus the
needle task's documents, the base model's lookup sequences and the warm start's teacher transcripts."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from memagent_jax.agent.memory import make_policy
from memagent_jax.agent.prompts import PromptBuilder, PromptTemplates
from memagent_jax.demo import STAGES, load_demo_config, run_demo
from memagent_jax.demo import task as T

MICRO = "micro"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from memagent_jax.tokenizer import train_sentencepiece

    return train_sentencepiece(T.tokenizer_corpus(), tmp_path_factory.mktemp("tok"), 1024)


def test_needle_documents_have_exact_chunks_and_unseen_layouts(tokenizer):
    keys = T.task_keys(tokenizer, 8)
    assert len(set(keys)) == 8 and T.task_keys(tokenizer, 8) == keys
    for key in keys:  # one whole-word token each, the same token in the needle and in the note
        assert len(tokenizer.encode(" " + key)) == 1 and key not in ("secret", "code")
        assert T.needles_in(T.needle_text(key, "7")) == [(key, "7")]
        assert tokenizer.encode(" " + T.needle_text(key, "7"))[-3:-1] == tokenizer.encode(T.note_text(key, "7"))
        assert T.parse_note(T.note_text(key, "7")) == (key, "7") and T.parse_note(T.note_text(key, None)) is None
        assert T.answer_text(T.note_text(key, "7")) == f" {key}7 \\boxed{{7}}"
    assert T.answer_text("none") == "none \\boxed{none}"
    for chunks in (1, 3, 7):
        spec = T.NeedleSpec(chunk_size=48, num_chunks=chunks)
        for s in T.generate(spec, tokenizer, 12, seed=1):
            ids = tokenizer.encode(s["context"])
            assert -(-len(ids) // 48) == chunks == s["num_chunks"]
            target = T.needle_text(s["key"], s["value"])
            holding = [c for c in range(chunks) if target in tokenizer.decode(ids[48 * c:48 * c + 48])]
            assert holding == [s["needle_chunk"]]  # whole, in exactly one chunk
            assert s["key"] in keys and s["value"] in T.VALUES and set(s["distractor_keys"]) <= set(keys)
            assert s["answers"] == [s["value"]] and s["question"] == T.question_text(s["key"])
            assert 1 <= len(s["distractor_keys"]) <= 3 and s["key"] not in s["distractor_keys"]
            found = T.needles_in(s["context"])
            assert found == [tuple(n) for n in s["needles"]] and (s["key"], s["value"]) in found
            assert [tuple(n[:2]) for n in s["layout"]] == found
            assert all(tokenizer.encode(s["context"])[o + 4] == tokenizer.encode(" " + k)[0]
                       for k, _, o in s["layout"])  # offsets point at the needles
    a = T.generate(T.NeedleSpec(48, 2), tokenizer, 3, seed=5)
    assert a == T.generate(T.NeedleSpec(48, 2), tokenizer, 3, seed=5)  # deterministic
    train = T.generate(T.NeedleSpec(32, 1, min_distractors=0, max_distractors=0, num_keys=2), tokenizer, 200, seed=1)
    seen = {T.layout_key(s) for s in train}
    fresh = T.generate(T.NeedleSpec(32, 1, min_distractors=0, max_distractors=0, num_keys=2, name="eval"),
                       tokenizer, 50, seed=2, exclude=seen)
    assert len(fresh) == 50 and not {T.layout_key(s) for s in fresh} & seen


@pytest.mark.parametrize("careless", [0.0, 1.0])
def test_teacher_transcripts_follow_the_rollout_prompts(tokenizer, careless):
    from memagent_jax.rl.sft import teacher_transcripts

    spec = T.NeedleSpec(chunk_size=48, num_chunks=3)
    samples = T.generate(spec, tokenizer, 6, seed=2)
    policy = make_policy("overwrite", chunk_size=48, max_chunks=3, max_memory_tokens=8)
    builder = PromptBuilder(tokenizer, PromptTemplates(first_memory=T.NOTHING))
    teacher = T.NeedleTeacher(careless)
    convs = teacher_transcripts(samples, policy=policy, builder=builder, tokenizer=tokenizer, teacher=teacher)
    assert len(convs) == 6 * (3 + 1)
    ids = [tokenizer.encode(s["context"]) for s in samples]
    for i, s in enumerate(samples):
        turns = convs[4 * i:4 * i + 4]
        chunk_needles = [T.needles_in(tokenizer.decode(ids[i][48 * c:48 * c + 48])) for c in range(3)]
        if careless:  # the first needle seen, whatever its key
            first = min(c for c in range(3) if chunk_needles[c])
            noted = [None if c < first else chunk_needles[first][0] for c in range(3)]
        else:
            noted = [(s["key"], s["value"]) if c >= s["needle_chunk"] else None for c in range(3)]
        assert teacher.is_careless(s) == bool(careless)
        for k, (prompt, reply, kind) in enumerate(turns[:3]):
            assert reply[-1] == tokenizer.eos_id
            assert tokenizer.decode(reply[:-1]).strip() == T.note_text(*(noted[k] or (None, None))).strip()
            before = noted[k - 1] if k else None  # the first memory is "none", i.e. nothing noted
            assert kind == ("keep" if noted[k] == before else "write")
        prompt, reply, kind = turns[3]
        assert kind == "final"
        assert tokenizer.decode(reply[:-1]).strip() == f"{noted[2][0]}{noted[2][1]} \\boxed{{{noted[2][1]}}}"
        memory = tokenizer.encode(T.note_text(*noted[2]))
        assert prompt == builder.final_prompt(tokenizer.encode(s["question"]), memory)
    with pytest.raises(ValueError, match="careless"):
        T.NeedleTeacher(1.5)


def test_lookup_sequences_ask_every_needle_and_train_only_the_answers(tokenizer):
    from memagent_jax.demo.pretrain import lookup_corpus

    builder = PromptBuilder(tokenizer, PromptTemplates(final="Memory: {memory}\nProblem: {prompt}\nAnswer:",
                                                       first_memory=T.NOTHING))
    seqs = lookup_corpus(tokenizer, builder, num_docs=12, chunk_size=32, max_chunks=3, num_keys=8, seed=0,
                         absent_share=0.5)
    assert len(seqs) == 12
    for seq in seqs:
        assert len(seq.tokens) == len(seq.mask)
        answers, run = [], []  # contiguous trained spans, each one answer ending in EOS
        for t, m in zip(seq.tokens + [None], seq.mask + [0.0]):
            if m:
                run.append(t)
            elif run:
                assert run[-1] == tokenizer.eos_id
                answers.append(tokenizer.decode(run[:-1]))
                run = []
        text = tokenizer.decode(seq.tokens)
        doc_needles = T.needles_in(text)
        asked = [q for q in text.split("Problem: ")[1:]]
        assert len(asked) >= len(doc_needles) >= 1
        for q in asked:  # every question's answer follows it: the key's needle or none
            key = q.split("code for ")[1].split("?")[0]
            value = dict(doc_needles).get(key)
            assert T.answer_text(T.note_text(key, value)).strip() in q
        assert len([a for a in answers if "boxed" in a]) == len(asked)
        first_q = text.split("Problem: ")[1].split("code for ")[1].split("?")[0]
        assert first_q in dict(doc_needles)  # the first question (the baseline's format) has an answer


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
              "data/eval_2x.jsonl", "rl/train_config.yaml", "pretrain/hf/config.json", "pretrain/metrics.jsonl",
              "sft/hf/config.json", "sft/metrics.jsonl", "rl/metrics.jsonl",
              "eval/results.json", "hf/config.json", "hf/model.safetensors", "report.md", "summary.json"):
        assert (out / f).is_file(), f
    assert any((out / "rl" / "checkpoints").iterdir())
    for png in ("training_curves.png", "accuracy_vs_length.png", "seconds_per_chunk.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000, png

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["accuracy"]) == {"rl", "warm_start", "full_context", "no_document"}
    for policy, by_len in summary["accuracy"].items():
        assert set(by_len) == {"1x", "2x"} and all(0.0 <= v <= 1.0 for v in by_len.values())
        for k, (lo, hi) in summary["interval_95"][policy].items():
            assert 0.0 <= lo <= by_len[k] <= hi <= 1.0 and hi - lo > 0.2  # 2 documents: wide
    assert summary["eval_docs_per_length"] == 2 and "rl_vs_warm_start_1x" in summary["targets"]
    assert summary["train_length_chunks"] == 2 and summary["chunk_size"] == 32
    assert set(STAGES) | {"total"} == set(summary["wall_time_s"])
    assert summary["machine"] and summary["date"]
    assert len([json.loads(ln) for ln in (out / "rl" / "metrics.jsonl").read_text().splitlines()]) == 2

    report = (out / "report.md").read_text()
    assert "| policy | 1x (2 chunks) | 2x (4 chunks) |" in report
    for label in ("RL (DAPO)", "warm start (SFT)", "full context (base, window)", "no document"):
        assert f"| {label} |" in report

    from memagent_jax.agent.settings_file import read_agent_settings

    cfg, _ = load_demo_config(MICRO)  # the RL policy and the warm start carry their agent settings
    assert read_agent_settings(out / "hf") == dataclasses.replace(cfg.agent, max_chunks=2)
    assert read_agent_settings(out / "sft" / "hf").chunk_size == 32
    assert read_agent_settings(out / "pretrain" / "hf") is None  # the base is no agent
    model = models.from_pretrained(out / "hf")  # the exported RL policy serves from its folder
    tok = load_tokenizer(out / "hf")
    logits = np.asarray(model(np.array([tok.encode("What is the secret code of people?")], np.int32)))
    assert logits.shape[-1] == model.config.vocab_size and np.isfinite(logits).all()

    again = run_demo(out_dir=out, config=MICRO)  # everything done: every stage skips
    assert again["stages"] == {s: "skipped" for s in STAGES}
    (out / "eval" / "done.json").unlink()  # a lost stage re-runs, and so does everything after it
    partial = run_demo(out_dir=out, config=MICRO)
    assert partial["stages"] == {**{s: "skipped" for s in STAGES[:5]}, "eval": "ran", "report": "ran"}


def test_default_demo_starts_from_the_shipped_base(tmp_path):
    """Without --from-scratch the tokenizer and the base model are the shipped ones (with their
    provenance), and the data and warm start build on them."""
    from memagent_jax.demo import base
    from memagent_jax.tokenizer import load_tokenizer

    prov = base.provenance()
    assert {"command", "seed", "pretrain_wall_time_s", "machine", "date"} <= set(prov)
    out = tmp_path / "demo"
    result = run_demo(out_dir=out, fresh=True, config=MICRO, overrides=["demo.from_scratch=false"], until="sft")
    assert result["stages"] == {"tokenizer": "ran", "data": "ran", "pretrain": "ran", "sft": "ran"}
    shipped, copied = load_tokenizer(base.BASE_DIR), load_tokenizer(out / "tokenizer")
    text = "What is the secret code for people?"
    assert copied.encode(text) == shipped.encode(text) and copied.vocab_size == shipped.vocab_size
    assert (out / "pretrain" / "hf" / "model.safetensors").read_bytes() == (base.BASE_DIR / "model.safetensors").read_bytes()
    done = json.loads((out / "pretrain" / "done.json").read_text())
    assert done["provenance"] == prov and done["seconds"] < 60  # copied, not trained
    assert (out / "sft" / "hf" / "config.json").is_file()
    with pytest.raises(ValueError, match="--from-scratch"):
        run_demo(out_dir=tmp_path / "x", config=MICRO, ship_base=True)


def test_demo_sft_stage_on_lora_adapters(tmp_path):
    """With model.lora the warm start trains adapters over the frozen base: the merged sft/hf
    differs from the base only in the targeted projections, and sft/adapter is its PEFT adapter."""
    from safetensors.numpy import load_file

    out = tmp_path / "demo"
    lora = ["demo.from_scratch=false", "model.lora.rank=4", "model.lora.targets=[q,up]",
            "model.lora.dropout=0.05", "demo.sft_lr=0.01"]
    run_demo(out_dir=out, fresh=True, config=MICRO, overrides=lora, until="sft")
    base = load_file(out / "pretrain" / "hf" / "model.safetensors")
    warm = load_file(out / "sft" / "hf" / "model.safetensors")
    assert set(base) == set(warm)
    moved = {k for k in base if not np.array_equal(base[k], warm[k])}
    assert moved and all(".q_proj." in k or ".up_proj." in k for k in moved), sorted(moved)
    config = json.loads((out / "sft" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "up_proj"]
    assert config["base_model_name_or_path"] == str(out / "pretrain" / "hf")
    assert json.loads((out / "sft" / "done.json").read_text())["lora_rank"] == 4


def test_wilson_interval_holds_its_proportion_at_the_edges():
    """A perfect (or zero) score's interval ends exactly at it: the report's error bars need
    non-negative lengths (200/200 once rounded the upper bound below 1.0)."""
    from memagent_jax.demo.evaluation import wilson_interval

    for successes, n in ((200, 200), (0, 200), (199, 200), (1, 3), (7, 7)):
        lo, hi = wilson_interval(successes, n)
        assert 0.0 <= lo <= successes / n <= hi <= 1.0
    assert wilson_interval(200, 200)[1] == 1.0 and wilson_interval(0, 200)[0] == 0.0
    assert 0.98 < wilson_interval(200, 200)[0] < 0.99
