"""The second demo task (demo/multivalue.py): documents with several values of one key in
distinct chunks, the reward and digit F1 on hand-computed cases, the teacher's two habits, and the
`append` memory policy's update rule."""

from __future__ import annotations

import pytest
from fake_tokenizer import CharTokenizer

from memagent_jax.agent.memory import AppendPolicy, make_policy
from memagent_jax.agent.prompts import PromptBuilder, PromptTemplates
from memagent_jax.demo import multivalue as M
from memagent_jax.demo import task as T
from memagent_jax.rl.rewards import verify


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from memagent_jax.tokenizer import train_sentencepiece

    return train_sentencepiece(T.tokenizer_corpus(), tmp_path_factory.mktemp("tok"), 1024)


def test_values_sit_whole_in_distinct_chunks_and_eval_layouts_are_unseen(tokenizer):
    keys = T.task_keys(tokenizer, 8)
    for chunks in (2, 3, 8):
        spec = M.MultiValueSpec(chunk_size=32, num_chunks=chunks, max_decoys=2)
        for s in T.generate(spec, tokenizer, 15, seed=1, build=M.build_sample):
            ids = tokenizer.encode(s["context"])
            assert -(-len(ids) // 32) == chunks == s["num_chunks"]
            assert 2 <= len(s["values"]) <= min(3, chunks) and len(set(s["values"])) == len(s["values"])
            holding = []
            for v in s["values"]:  # every value's needle whole in exactly one chunk
                text = T.needle_text(s["key"], v)
                where = [c for c in range(chunks) if text in tokenizer.decode(ids[32 * c:32 * c + 32])]
                assert len(where) == 1, (text, where)
                holding += where
            assert holding == s["value_chunks"] and len(set(holding)) == len(holding)
            assert holding == sorted(holding)  # values are listed in document order
            found = T.needles_in(s["context"])
            assert found == [tuple(n) for n in s["needles"]]
            assert [v for k, v in found if k == s["key"]] == s["values"]
            assert s["answers"] == ["".join(s["values"])] and s["question"] == M.question_text(s["key"])
            assert s["key"] in keys and s["key"] not in s["distractor_keys"]
    spec = M.MultiValueSpec(chunk_size=32, num_chunks=3)
    a = T.generate(spec, tokenizer, 4, seed=5, build=M.build_sample)
    assert a == T.generate(spec, tokenizer, 4, seed=5, build=M.build_sample)  # deterministic
    train = T.generate(spec, tokenizer, 100, seed=1, build=M.build_sample)
    seen = {T.layout_key(s) for s in train}
    fresh = T.generate(M.MultiValueSpec(chunk_size=32, num_chunks=3, name="eval"), tokenizer, 40,
                       seed=2, exclude=seen, build=M.build_sample)
    assert not {T.layout_key(s) for s in fresh} & seen
    with pytest.raises(ValueError, match="distinct digits"):
        M.MultiValueSpec(max_values=5, max_distractors=6, num_keys=8)


def test_reward_is_the_whole_set_in_order_and_f1_gives_partial_credit():
    # exact match of the boxed digits (the training verifier), hand-computed cases
    assert verify(" idea7 idea3 \\boxed{73}", ["73"]) == 1.0
    assert verify(" idea3 idea7 \\boxed{37}", ["73"]) == 0.0  # wrong order
    assert verify(" idea7 \\boxed{7}", ["73"]) == 0.0  # a value lost
    assert verify("\\boxed{735}", ["73"]) == 0.0  # one too many
    assert M.digit_f1(" idea7 idea3 \\boxed{73}", "73") == 1.0
    assert M.digit_f1("\\boxed{37}", "73") == 1.0  # order ignored
    assert M.digit_f1(" idea7 \\boxed{7}", "73") == pytest.approx(2 / 3)  # p 1, r 1/2
    assert M.digit_f1("\\boxed{735}", "73") == pytest.approx(0.8)  # p 2/3, r 1
    assert M.digit_f1("\\boxed{1}", "73") == 0.0 and M.digit_f1("73", "73") == 0.0  # no box
    assert M.digit_f1("\\boxed{none}", "735") == 0.0


def test_notes_and_the_teachers_two_habits():
    assert M.parse_notes(" idea7 disc3 idea5") == [("idea", "7"), ("disc", "3"), ("idea", "5")]
    assert M.notes_text([]) == "none" and M.parse_notes("none") == []
    assert M.answer_text(" idea7 disc3 idea5", "idea") == " idea7 disc3 idea5 \\boxed{75}"
    assert M.answer_text("none", "idea") == "none \\boxed{none}"
    sample = {"id": "x", "key": "idea"}
    chunks = [f"a {T.needle_text('idea', '7')} b {T.needle_text('disc', '2')}", "c d",
              f"e {T.needle_text('idea', '3')}", f"{T.needle_text('idea', '5')} f"]

    def read(teacher):
        memory, memories = "none", []
        for c in chunks:
            memory = teacher.memory_reply(sample, c, memory)
            memories.append(memory)
        return memories, teacher.final_reply(sample, memory)

    careful, careless = M.MultiValueTeacher(0.0), M.MultiValueTeacher(1.0)
    assert read(careful) == ([" idea7", " idea7", " idea7 idea3", " idea7 idea3 idea5"],
                             " idea7 idea3 idea5 \\boxed{735}")
    assert read(careless) == ([" idea7", " idea7", " idea3", " idea5"], " idea5 \\boxed{5}")
    half = M.MultiValueTeacher(0.5)
    shares = [half.is_careless({"id": f"doc-{i}"}) for i in range(2000)]
    assert 0.45 < sum(shares) / len(shares) < 0.55


def test_append_policy_adds_replies_and_keeps_the_last_tokens():
    tok = CharTokenizer()
    builder = PromptBuilder(tok, PromptTemplates(first_memory="none"))
    policy = make_policy("append", chunk_size=4, max_chunks=None, max_memory_tokens=6)
    assert isinstance(policy, AppendPolicy)
    memory = policy.initial_memory(builder)
    assert memory == tok.encode("none")
    memory, capped = policy.update(memory, tok.encode("ab"), tok)  # the placeholder goes
    assert (memory, capped) == (tok.encode("ab"), False)
    memory, capped = policy.update(memory, tok.encode("cd") + [tok.eos_id], tok)
    assert (memory, capped) == (tok.encode("abcd"), False)
    assert policy.update(memory, [tok.eos_id], tok) == (tok.encode("abcd"), False)  # empty reply
    memory, capped = policy.update(memory, tok.encode("efg"), tok)  # 7 > 6: the oldest falls out
    assert (memory, capped) == (tok.encode("bcdefg"), True)
    assert policy.split(list(range(10)), training=True) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_micro_multivalue_demo_end_to_end(tmp_path):
    """configs/micro_multivalue.yaml through every stage: multi-value documents, the memory
    policies compared (overwrite and append with the RL and warm-start models), digit F1, the
    task's targets and report."""
    import json

    from memagent_jax.demo import STAGES, run_demo

    out = tmp_path / "demo"
    result = run_demo(out_dir=out, fresh=True, config="micro_multivalue")
    assert result["stages"] == {s: "ran" for s in STAGES}
    rl_docs = [json.loads(ln) for ln in (out / "data" / "rl.jsonl").read_text().splitlines()]
    assert all(d["id"].startswith("multivalue-") and len(d["values"]) >= 2 for d in rl_docs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "multivalue"
    policies = {"rl", "warm_start", "rl_append", "warm_start_append", "full_context", "no_document"}
    assert set(summary["accuracy"]) == policies and set(summary["digit_f1"]) == policies
    for by_len in summary["digit_f1"].values():
        assert set(by_len) == {"1x", "2x"} and all(0.0 <= v <= 1.0 for v in by_len.values())
    assert {"rl_vs_warm_start_1x", "memory_policies_differ"} <= set(summary["targets"])
    report = (out / "report.md").read_text()
    assert "What are all the secret codes" in report and "| RL model, append memory |" in report
    assert "Digit F1" in report


def test_a_forks_policy_gets_named_rows():
    from memagent_jax.demo.evaluation import compared_name
    from memagent_jax.demo.report import label, policies

    assert compared_name("append") == "append"
    assert compared_name("my_pkg.policies:MyPolicy") == "MyPolicy"
    assert label("rl_MyPolicy") == "RL model, MyPolicy memory"
    assert label("warm_start_append") == "warm-start model, append memory"
    results = {"accuracy": dict.fromkeys(["no_document", "rl", "warm_start_append", "full_context",
                                          "warm_start", "rl_append"])}
    assert policies(results) == ("rl", "warm_start", "warm_start_append", "rl_append",
                                 "full_context", "no_document")


def test_demo_task_flag_picks_the_task_and_its_config(tmp_path):
    import yaml

    from memagent_jax.cli import main

    assert main(["demo", "--task", "multivalue", "--out", str(tmp_path / "a"), "--until", "tokenizer"]) == 0
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["demo"]["task"] == "multivalue" and saved["agent"]["max_final_new_tokens"] == 20
    assert main(["demo", "--task", "multivalue", "--config", "micro", "--out", str(tmp_path / "b"),
                 "--until", "tokenizer"]) == 0  # a named config, the task's documents
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert saved["demo"]["task"] == "multivalue" and saved["demo"]["eval_multiples"] == [1, 2]
    with pytest.raises(ValueError, match="known tasks are needle, multivalue"):
        from memagent_jax.demo import load_demo_config

        load_demo_config("micro", ["demo.task=nope"])


def test_rl_documents_mix_the_training_length_with_longer_ones(tmp_path):
    """demo.rl_max_chunks with demo.rl_short_share: that share of RL documents at train_chunks,
    the rest spread over train_chunks..rl_max_chunks."""
    import json

    from memagent_jax.demo import run_demo

    out = tmp_path / "demo"
    run_demo(out_dir=out, fresh=True, config="micro_multivalue", until="data",
             overrides=["demo.rl_max_chunks=6", "demo.rl_short_share=0.5", "demo.rl_docs=200"])
    chunks = [json.loads(ln)["num_chunks"] for ln in (out / "data" / "rl.jsonl").read_text().splitlines()]
    train = min(chunks)  # demo.train_chunks
    at_train = sum(c == train for c in chunks) / len(chunks)
    # 50% placed at 1x plus the uniform half's own 1/(6 - train + 1) share of it
    assert 0.5 < at_train < 0.5 + 0.5 / (6 - train + 1) + 0.1, at_train
    assert max(chunks) == 6 and len(set(chunks)) == 6 - train + 1
