"""RULER synthetic tasks: length fitting, needle depth, answers and metrics, errors, TFDS build."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest

from memagent_jax.data import ruler_synthetic as rs
from memagent_jax.data import tfds_builders as tb
from memagent_jax.rl.rewards import string_match_all, sub_em

SQUAD = Path(__file__).parent / "data" / "squad_dev_2articles.json"
LENGTHS = {500: 0.25, 1500: 0.75}  # target tokens -> requested depth


class WordTokenizer:
    """Test tokenizer: one id per word or punctuation mark (a growing vocabulary)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r"\w+|[^\w\s]", text)]

    def decode(self, ids: list[int]) -> str:
        inv = {i: w for w, i in self.vocab.items()}
        return " ".join(inv[i] for i in ids)


TOK = WordTokenizer()


def _squad_gold(question: str) -> tuple[str, list[str]]:
    """The SQuAD paragraph holding `question`, and all paragraphs."""
    paras = [p for a in json.loads(SQUAD.read_text())["data"] for p in a["paragraphs"]]
    gold = next(p["context"] for p in paras if any(q["question"] == question for q in p["qas"]))
    return gold, [p["context"] for p in paras]


def _check_answers_in_context(task: str, s: dict) -> None:
    """The answers are the ones the context supports (not just self-consistent)."""
    ctx, answers = s["context"], s["answers"]
    if task.startswith("niah"):
        pattern = r"What (?:is|are all) the special magic \w+ for (.+) mentioned in the provided text"
        keys = re.fullmatch(pattern + r"\?", s["question"])[1]
        keys = re.split(r", | and ", keys)
        found = [
            v for k in keys
            for v in re.findall(rf"special magic \w+ for {re.escape(k)} is: (\S+)\.", ctx)
        ]
        assert sorted(found) == sorted(answers)
        n_values = 4 if task == "niah_multivalue" else 1
        assert len(answers) == (4 if task == "niah_multiquery" else n_values)
    elif task == "vt":
        value = re.search(r"value (\d+)", s["question"])[1]
        assert f"VAR {answers[0]} = {value}." in ctx
        for prev, cur in zip(answers, answers[1:]):
            assert f"VAR {cur} = VAR {prev}." in ctx
        assert len(re.findall(r"VAR [A-Z]{5} =", ctx)) == 5
    elif task == "fwe":
        top = collections.Counter(ctx.split()).most_common(4)
        assert {w for w, _ in top[:3]} == set(answers) and top[2][1] > top[3][1]
    else:
        gold, _ = _squad_gold(s["question"])
        assert gold in ctx and all(a in gold for a in answers)


def _primary_fraction(task: str, s: dict) -> tuple[float, float]:
    """(character fraction of the primary needle's start, allowed deviation from the depth)."""
    ctx = s["context"]
    if task == "qa_1":
        gold, paras = _squad_gold(s["question"])
        start = ctx.index(gold)
        longest = max(len(p) for p in paras if p in ctx and p != gold)
        body = len(ctx) - len(gold)
        return start / body, 0.5 * longest / body + 0.03  # snapped to a document boundary
    start = ctx.index(s["answers"][0])
    return start / len(ctx), 0.05  # snapped to a sentence boundary


@pytest.mark.parametrize("target", sorted(LENGTHS))
@pytest.mark.parametrize("task", list(rs.TASKS))
def test_task_length_depth_and_metric(task, target):
    depth = LENGTHS[target]
    s = rs.generate(task, target, TOK, seed=11, depth=depth, squad_path=str(SQUAD))
    assert set(s) == {"id", "task", "question", "answers", "context", "depth", "num_tokens"}
    assert s["task"] == task and s["answers"]
    assert all(isinstance(a, str) and a for a in s["answers"])
    assert s["num_tokens"] == len(TOK.encode(s["context"]))
    assert abs(s["num_tokens"] - target) <= 0.02 * target, s["num_tokens"]
    _check_answers_in_context(task, s)
    if task == "fwe":
        assert s["depth"] == -1.0
    else:
        assert s["depth"] == depth
        frac, tol = _primary_fraction(task, s)
        assert abs(frac - depth) <= tol, (frac, depth)
    metric = {"string_match_all": string_match_all, "sub_em": sub_em}[rs.metric_for(task)]
    oracle = " ".join(s["answers"]) if metric is string_match_all else s["answers"][0]
    assert metric(oracle, s["answers"]) == 1.0
    assert metric("", s["answers"]) == 0.0
    assert metric("I do not know.", s["answers"]) == 0.0


def test_deterministic_and_seeded():
    a = rs.generate("niah_multikey_1", 800, TOK, seed=3)
    b = rs.generate("niah_multikey_1", 800, TOK, seed=3)
    c = rs.generate("niah_multikey_1", 800, TOK, seed=4)
    assert a == b
    assert a["context"] != c["context"] and a["answers"] != c["answers"]
    assert 0.0 <= a["depth"] <= 1.0  # random depth when none is given
    many = rs.generate_many("vt", 300, TOK, 3, seed=1)
    assert len({m["id"] for m in many}) == 3
    assert many[0] == rs.generate("vt", 300, TOK, seed=1_000_003)


def test_metric_for_and_registry():
    assert len(rs.TASKS) == 11
    assert {rs.metric_for(t) for t in rs.TASKS if t != "qa_1"} == {"string_match_all"}
    assert rs.metric_for("qa_1") == "sub_em"


def test_bad_inputs():
    msg = r"unknown RULER task 'niah_9'; known tasks: niah_single_1.*qa_1"
    with pytest.raises(ValueError, match=msg):
        rs.generate("niah_9", 500, TOK, seed=0)
    with pytest.raises(rs.TargetTooShortError, match="target_tokens=10 is shorter"):
        rs.generate("niah_single_2", 10, TOK, seed=0)
    with pytest.raises(rs.TargetTooShortError, match="shorter"):
        rs.generate("qa_1", 50, TOK, seed=0, squad_path=str(SQUAD))
    with pytest.raises(ValueError, match="squad_path"):
        rs.generate("qa_1", 500, TOK, seed=0)
    with pytest.raises(ValueError, match="depth"):
        rs.generate("vt", 500, TOK, seed=0, depth=1.5)


def test_tfds_ruler_synthetic(tmp_path):
    path = tb.build_dataset("ruler_synthetic", "niah_single_3_400_s2_k3", tmp_path, tokenizer=TOK)
    assert path.endswith("niah_single_3_400_s2_k3/1.0.0")
    src = tb.load_dataset("ruler_synthetic", "niah_single_3_400_s2_k3", tmp_path)
    want = rs.generate_many("niah_single_3", 400, TOK, 3, seed=2)
    got = [src[i] for i in range(len(src))]
    assert [g["context"] for g in got] == [w["context"] for w in want]
    assert [g["answers"] for g in got] == [w["answers"] for w in want]
    assert got[0]["depth"] == pytest.approx(want[0]["depth"], abs=1e-6)
    assert "niah_single_1_8192" in tb.RulerSynthetic.builder_configs
    with pytest.raises(ValueError, match="unknown RULER task"):
        tb.build_dataset("ruler_synthetic", "nope_500", tmp_path, tokenizer=TOK)
