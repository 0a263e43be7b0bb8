"""Agent tests: prompt templates and splicing, memory policies, the multi-conversation rollout.

The policy model is scripted: a memory turn replies "notes:<chunk>", the final turn replies
"\\boxed{<memory>}"; replies longer than max_new_tokens are cut with finish reason "length".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from fake_tokenizer import CharTokenizer
from memagent_jax.agent import (
    PromptBuilder,
    PromptTemplates,
    center_truncate,
    make_policy,
    register_policy,
    rollout,
)
from memagent_jax.agent.memory import OverwritePolicy, strip_reply
from memagent_jax.seeds import derive
from memagent_jax.types import SampleOutput

TOK = CharTokenizer()
EOS = TOK.eos_id


class Scripted:
    """Deterministic generate_fn that records every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, prompts: list[list[int]], *, max_new_tokens: int, seed: int, **sampling: Any) -> SampleOutput:
        self.calls.append({"prompts": prompts, "max_new_tokens": max_new_tokens, "seed": seed, "sampling": sampling})
        tokens, logps, fins = [], [], []
        for p in prompts:
            text = TOK.decode(p, skip_special_tokens=False)
            if "<section>\n" in text:
                reply = "notes:" + text.split("<section>\n")[1].split("\n</section>")[0]
            else:
                reply = "\\boxed{" + text.split("<memory>\n")[1].split("\n</memory>")[0] + "}"
            ids, fin = TOK.encode(reply) + [EOS], "eos"
            if len(ids) > max_new_tokens:
                ids, fin = ids[:max_new_tokens], "length"
            tokens.append(ids)
            logps.append([-(j + 1) / 100 for j in range(len(ids))])
            fins.append(fin)
        return SampleOutput(tokens=tokens, logps=logps, finish_reasons=fins)

    def prompt_texts(self, call: int) -> list[str]:
        return [TOK.decode(p, skip_special_tokens=False) for p in self.calls[call]["prompts"]]


def run(samples: list[dict[str, Any]], policy: Any = None, group_size: int = 1, **kw: Any):
    gen = Scripted()
    builder = PromptBuilder(TOK, kw.pop("templates", None))
    policy = policy or OverwritePolicy(chunk_size=4)
    kw.setdefault("gen_kwargs", {"max_memory_new_tokens": 50, "max_final_new_tokens": 60, "seed": 7})
    res = rollout(samples, policy=policy, builder=builder, tokenizer=TOK, generate_fn=gen,
                  group_size=group_size, training=kw.pop("training", True), **kw)
    return res, gen


# ----------------------------------------------------------------------------- prompts

MEMORY_TEMPLATE = (
    "You are presented with a problem, a section of an article that may contain the answer to the problem, "
    "and a previous memory. Please read the provided section carefully and update the memory with the new "
    "information that helps to answer the problem. Be sure to retain all relevant details from the previous "
    "memory while adding any new, useful information.\n\n<problem> \n{prompt}\n</problem>\n\n<memory>\n{memory}\n"
    "</memory>\n\n<section>\n{chunk}\n</section>\n\nUpdated memory:"
)
FINAL_TEMPLATE = (
    "You are presented with a problem and a previous memory. Please answer the problem based on the previous "
    "memory and put the answer in \\boxed{}.\n\n<problem> \n{prompt}\n</problem>\n\n<memory>\n{memory}\n"
    "</memory>\n\nYour answer:"
)


def test_default_templates_are_byte_identical_to_reference():
    t = PromptTemplates()
    assert t.memory_update == MEMORY_TEMPLATE
    assert t.final == FINAL_TEMPLATE
    assert t.first_memory == "No previous memory"
    ans = PromptTemplates.for_style("answer_is").final
    assert "Therefore, the answer is (insert answer here)" in ans and ans.endswith("</memory>\n\nYour answer:")
    assert "<problem> \n{prompt}\n</problem>" in ans and "\\boxed" not in ans
    assert PromptTemplates.for_style("boxed") == t
    with pytest.raises(ValueError, match="answer_is"):
        PromptTemplates.for_style("nope")


def test_spliced_ids_equal_rendered_text():
    builder = PromptBuilder(TOK)
    q, m, c = "Who is naïve?", "memo — ✓ {memory}", "chunk with <problem> tags\nand lines"
    ids = builder.memory_prompt(TOK.encode(q), TOK.encode(m), TOK.encode(c))
    content = MEMORY_TEMPLATE.replace("{prompt}", q).replace("{memory}", "MEM").replace("{chunk}", c)
    rendered = TOK.apply_chat_template([{"role": "user", "content": content}]).replace("MEM", m)
    assert TOK.decode(ids, skip_special_tokens=False) == rendered == builder.memory_prompt_text(q, m, c)
    assert ids == TOK.encode(rendered)
    final = builder.final_prompt(TOK.encode(q), TOK.encode(m))
    assert TOK.decode(final, skip_special_tokens=False) == builder.final_prompt_text(q, m)
    assert builder.first_memory_ids == TOK.encode("No previous memory")


def test_splice_finds_slot_order_and_validates_templates():
    t = PromptTemplates(memory_update="C={chunk} Q={prompt} M={memory} Q again={prompt}", final="{memory}|{prompt}")
    b = PromptBuilder(TOK, t)
    ids = b.memory_prompt(TOK.encode("q"), TOK.encode("m"), TOK.encode("c"))
    assert TOK.decode(ids) == "system\nYou are a helpful assistant.\nuser\nC=c Q=q M=m Q again=q\nassistant\n"
    assert TOK.decode(b.final_prompt(TOK.encode("q"), TOK.encode("m"))).endswith("user\nm|q\nassistant\n")
    with pytest.raises(ValueError, match=r"\{chunk\}"):
        PromptBuilder(TOK, PromptTemplates(memory_update="{prompt} {memory}"))


# ----------------------------------------------------------------------------- rollout prompts

TURN_1 = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "You are presented with a problem, a section of an article that may contain the answer to the problem, "
    "and a previous memory. Please read the provided section carefully and update the memory with the new "
    "information that helps to answer the problem. Be sure to retain all relevant details from the previous "
    "memory while adding any new, useful information.\n\n<problem> \nWho wrote it?\n</problem>\n\n"
    "<memory>\nNo previous memory\n</memory>\n\n<section>\nabcd\n</section>\n\nUpdated memory:<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TURN_2 = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "You are presented with a problem, a section of an article that may contain the answer to the problem, "
    "and a previous memory. Please read the provided section carefully and update the memory with the new "
    "information that helps to answer the problem. Be sure to retain all relevant details from the previous "
    "memory while adding any new, useful information.\n\n<problem> \nWho wrote it?\n</problem>\n\n"
    "<memory>\nnotes:abcd\n</memory>\n\n<section>\nefgh\n</section>\n\nUpdated memory:<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TURN_3 = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "You are presented with a problem, a section of an article that may contain the answer to the problem, "
    "and a previous memory. Please read the provided section carefully and update the memory with the new "
    "information that helps to answer the problem. Be sure to retain all relevant details from the previous "
    "memory while adding any new, useful information.\n\n<problem> \nWho wrote it?\n</problem>\n\n"
    "<memory>\nnotes:efgh\n</memory>\n\n<section>\nij\n</section>\n\nUpdated memory:<|im_end|>\n"
    "<|im_start|>assistant\n"
)
FINAL = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "You are presented with a problem and a previous memory. Please answer the problem based on the previous "
    "memory and put the answer in \\boxed{}.\n\n<problem> \nWho wrote it?\n</problem>\n\n"
    "<memory>\nnotes:ij\n</memory>\n\nYour answer:<|im_end|>\n<|im_start|>assistant\n"
)
SAMPLE = {"question": "Who wrote it?", "context": "abcdefghij", "answers": ["ij"]}


def test_exact_prompts_of_a_three_chunk_document():
    res, gen = run([SAMPLE])
    assert [gen.prompt_texts(k) for k in range(4)] == [[TURN_1], [TURN_2], [TURN_3], [FINAL]]
    (t,) = res.trajectories
    assert t.memories == ["notes:abcd", "notes:efgh", "notes:ij"]  # overwrite, not append
    assert t.answer_text == "\\boxed{notes:ij}" and t.ground_truths == ["ij"] and t.num_chunks == 3
    assert [res.conversations[i].turn for i in t.conversation_ids] == [0, 1, 2, 3]
    assert [res.conversations[i].is_final for i in t.conversation_ids] == [False] * 3 + [True]
    assert res.conversations[0].response == TOK.encode("notes:abcd") + [EOS]


def test_memory_strip_and_cap():
    reply = TOK.encode("ab") + [TOK.pad_id] + TOK.encode("cdefg") + [EOS]
    assert OverwritePolicy(max_memory_tokens=7).update([], reply, TOK) == (TOK.encode("abcdefg"), False)
    assert OverwritePolicy(max_memory_tokens=5).update([], reply, TOK) == (TOK.encode("abcde"), True)
    assert strip_reply([5, TOK.vocab_size + 3, 3], TOK) == [5]  # unknown id and <|endoftext|> dropped
    res, gen = run([SAMPLE], policy=OverwritePolicy(chunk_size=4, max_memory_tokens=5))
    assert res.trajectories[0].memories == ["notes"] * 3 and res.trajectories[0].memory_capped_turns == 3
    assert res.stats["memory_capped"] == 3 and "<memory>\nnotes\n</memory>" in gen.prompt_texts(3)[0]


def test_thinking_never_reaches_the_memory():
    """The overwrite policy cuts <think>...</think> from a reply (text path: the char tokenizer has
    no single-token markers); the trained conversation keeps the whole reply."""
    upd = OverwritePolicy(max_memory_tokens=100).update
    for reply, memory in [("<think>\nwhich fact?\n</think>\n\nthe key is 7", "the key is 7"),
                          ("<think>a</think>x<think>b</think> y", "y"),  # the last block ends it
                          ("no thinking here", "no thinking here"),
                          ("kept <think>ran out of tokens while thin", "kept")]:
        assert upd([], TOK.encode(reply) + [EOS], TOK) == (TOK.encode(memory), False), reply

    class Thinking(Scripted):
        def __call__(self, prompts, **kw):
            out = super().__call__(prompts, **kw)
            tokens = [TOK.encode("<think>\nhmm\n</think>\n\n") + t for t in out.tokens]
            return SampleOutput(tokens=tokens, logps=[[0.0] * len(t) for t in tokens],
                                finish_reasons=out.finish_reasons)

    gen = Thinking()
    res = rollout([SAMPLE], policy=OverwritePolicy(chunk_size=4), builder=PromptBuilder(TOK),
                  tokenizer=TOK, generate_fn=gen, gen_kwargs={"max_memory_new_tokens": 50,
                                                              "max_final_new_tokens": 60})
    assert res.trajectories[0].memories == ["notes:abcd", "notes:efgh", "notes:ij"]
    assert TOK.decode(res.conversations[0].response).startswith("<think>\nhmm\n</think>")


def test_prompt_builder_passes_enable_thinking():
    seen = []

    class Recording(CharTokenizer):
        def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
            seen.append(kwargs)
            return super().apply_chat_template(messages, add_generation_prompt)

    PromptBuilder(Recording())
    PromptBuilder(Recording(), enable_thinking=True)
    PromptBuilder(Recording(), enable_thinking=None)
    assert seen == [{"enable_thinking": False}] * 2 + [{"enable_thinking": True}] * 2 + [{}] * 2


def test_length_finish_reason_is_recorded():
    res, _ = run([SAMPLE], gen_kwargs={"max_memory_new_tokens": 6, "max_final_new_tokens": 60})
    assert [c.finish_reason for c in res.conversations] == ["length"] * 3 + ["eos"]
    assert res.trajectories[0].memories == ["notes:"] * 3
    assert res.stats["finish_length_memory"] == 3 and res.stats["finish_length_final"] == 0


def test_batch_by_group_with_different_chunk_counts():
    samples = [dict(SAMPLE, context=c) for c in ("abcd", "abcdefghij", "abcdefg")]  # 1, 3, 2 chunks
    res, gen = run(samples, group_size=2,
                   gen_kwargs={"max_memory_new_tokens": 50, "max_final_new_tokens": 60, "seed": 7, "temperature": 0.7})
    assert [len(c["prompts"]) for c in gen.calls] == [6, 4, 2, 6] == res.stats["rows_per_call"]
    # turn k's key folds k into the seed's key (seeds.derive), never seed + k
    assert [c["seed"].tolist() for c in gen.calls] == [derive(7, k).tolist() for k in range(4)]
    assert [c["max_new_tokens"] for c in gen.calls] == [50, 50, 50, 60]
    assert all(c["sampling"] == {"temperature": 0.7} for c in gen.calls)
    assert [t.group_id for t in res.trajectories] == [0, 0, 1, 1, 2, 2]
    assert [len(t.conversation_ids) for t in res.trajectories] == [2, 2, 4, 4, 3, 3]
    assert res.stats["num_calls"] == 4 and res.stats["chunks_per_doc"] == [1, 3, 2]
    assert sum(len(t.conversation_ids) for t in res.trajectories) == len(res.conversations) == 18
    assert gen.prompt_texts(2) == [TURN_3, TURN_3]  # only document 1's two members reach step 2
    for t in res.trajectories:
        convs = [res.conversations[i] for i in t.conversation_ids]
        assert [c.turn for c in convs] == list(range(t.num_chunks + 1))
        assert all(c.trajectory_id == t.trajectory_id and c.group_id == t.group_id for c in convs)


def test_empty_document_answers_from_first_memory():
    with pytest.warns(UserWarning, match="sample 0: empty document"):
        res, gen = run([dict(SAMPLE, context="")])
    assert len(gen.calls) == 1 and res.trajectories[0].num_chunks == 0
    assert "<memory>\nNo previous memory\n</memory>" in gen.prompt_texts(0)[0]
    assert res.trajectories[0].answer_text == "\\boxed{No previous memory}" and res.stats["empty_documents"] == 1


def test_question_over_budget_is_an_error():
    with pytest.raises(ValueError, match=r"question is 6 tokens, over question_budget=5"):
        run([dict(SAMPLE, question="x" * 6)], question_budget=5)
    run([dict(SAMPLE, question="x" * 5)], question_budget=5)


def test_center_truncation_with_max_chunks():
    assert center_truncate([0, 1, 2, 3, 4], 3) == [0, 1, 4] and center_truncate([0, 1, 2, 3, 4], 4) == [0, 1, 3, 4]
    assert center_truncate([0, 1], 1) == [0] and center_truncate([0, 1], 5) == [0, 1]
    pol = OverwritePolicy(chunk_size=2, max_chunks=3)
    doc = TOK.encode("aabbccddee")
    assert [TOK.decode(c) for c in pol.split(doc, training=True)] == ["aa", "bb", "ee"]
    assert len(pol.split(doc, training=False)) == 5  # evaluation reads everything
    res, gen = run([dict(SAMPLE, context="aabbccddee")], policy=pol)
    assert res.trajectories[0].memories == ["notes:aa", "notes:bb", "notes:ee"] and len(gen.calls) == 4
    res, gen = run([dict(SAMPLE, context="aabbccddee")], policy=pol, training=False)
    assert res.trajectories[0].num_chunks == 5 and len(gen.calls) == 6


def test_full_context_baseline(caplog):
    with caplog.at_level(logging.WARNING):
        res, gen = run([SAMPLE], policy=make_policy("full_context", max_context_tokens=6))
    assert "center-truncated" in caplog.text
    assert len(gen.calls) == 1 and res.trajectories[0].num_chunks == 0
    assert "<memory>\nabchij\n</memory>\n\nYour answer:" in gen.prompt_texts(0)[0]


def test_truncation_is_one_warning_per_policy_not_one_per_document(caplog):
    policy = make_policy("full_context", max_context_tokens=6)
    with caplog.at_level(logging.DEBUG, logger="memagent_jax.agent.memory"):
        run([SAMPLE] * 5, policy=policy)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "center-truncated" in r.message]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "center-truncated" in r.message]
    assert len(warnings) == 1 and "further truncations" in warnings[0].message and len(debug) == 4


def test_same_seed_same_rollout():
    def rand_gen(prompts, *, max_new_tokens, seed, **_):
        rng = np.random.default_rng(seed)
        toks = [list(rng.integers(70, 90, size=3)) for _ in prompts]
        return SampleOutput(toks, [[-1.0] * 3 for _ in prompts], ["length"] * len(prompts))

    def go(seed):
        r = rollout([SAMPLE], policy=OverwritePolicy(chunk_size=4), builder=PromptBuilder(TOK), tokenizer=TOK,
                    generate_fn=rand_gen, group_size=2, gen_kwargs={"seed": seed})
        return [c.response for c in r.conversations]

    assert go(3) == go(3) and go(3) != go(4)


def test_to_batch_aligns_tokens_mask_advantages_and_logps():
    res, _ = run([dict(SAMPLE, context="abcdef")], group_size=2)
    batch = res.to_batch([1.5, -2.0], pad_to_multiple=8)
    n, width = batch.tokens.shape
    assert n == len(res.conversations) == 6 and width % 8 == 0
    for i, c in enumerate(res.conversations):
        p, r = len(c.prompt), len(c.response)
        assert batch.tokens[i, : p + r].tolist() == c.prompt + c.response
        assert (batch.tokens[i, p + r :] == TOK.pad_id).all()
        assert batch.response_mask[i].sum() == r and batch.response_mask[i, p : p + r].all()
        np.testing.assert_allclose(batch.sampler_logps[i, p : p + r], c.sampler_logps)
        assert batch.advantages[i, p : p + r].tolist() == [[1.5, -2.0][c.trajectory_id]] * r
        assert batch.advantages[i, :p].sum() == 0 and batch.sampler_logps[i, :p].sum() == 0
    assert batch.is_final.tolist() == [c.is_final for c in res.conversations]
    with pytest.raises(ValueError, match="3 advantages for 2 trajectories"):
        res.to_batch([1.0, 2.0, 3.0])


# ----------------------------------------------------------------------------- custom policies


@register_policy("test_append")
class AppendPolicy:
    """A fork's policy: memory = last `keep` tokens of (memory + reply)."""

    def __init__(self, keep: int = 12, chunk_size: int = 4) -> None:
        self.keep, self.chunk_size = keep, chunk_size

    def split(self, doc_ids: Sequence[int], *, training: bool) -> list[list[int]]:
        return [list(doc_ids[i : i + self.chunk_size]) for i in range(0, len(doc_ids), self.chunk_size)]

    def initial_memory(self, builder: PromptBuilder, doc_ids: Sequence[int] = ()) -> list[int]:
        return list(builder.first_memory_ids)

    def update(self, memory_ids: list[int], reply_ids: Sequence[int], tokenizer: Any) -> tuple[list[int], bool]:
        merged = memory_ids + strip_reply(reply_ids, tokenizer)
        return merged[-self.keep :], len(merged) > self.keep

    def turn_prompt(self, builder, question_ids, memory_ids, chunk_ids) -> list[int]:
        return builder.memory_prompt(question_ids, memory_ids, chunk_ids)

    def final_prompt(self, builder, question_ids, memory_ids) -> list[int]:
        return builder.final_prompt(question_ids, memory_ids)


@pytest.mark.parametrize("name", ["test_append", f"{__name__}:AppendPolicy"])
def test_custom_policy_runs_through_rollout(name):
    res, gen = run([SAMPLE], policy=make_policy(name, keep=12))
    assert res.trajectories[0].memories == ["rynotes:abcd", "cdnotes:efgh", "efghnotes:ij"]
    assert res.trajectories[0].answer_text == "\\boxed{efghnotes:ij}"


def test_unknown_policy_lists_known_ones():
    with pytest.raises(ValueError, match="known: .*full_context.*overwrite"):
        make_policy("nope")
    with pytest.raises(ValueError, match="cannot load memory policy"):
        make_policy("memagent_jax.agent.memory:Missing")


def test_sampler_generate_fn_adapts_the_sampler(monkeypatch):
    import sys
    import types

    import memagent_jax
    from memagent_jax.agent import sampler_generate_fn

    seen = {}

    def fake_generate(model, prompts, **kw):
        seen.update(kw, model=model)
        return SampleOutput([[EOS] for _ in prompts], [[0.0] for _ in prompts], ["eos"] * len(prompts))

    fake = types.SimpleNamespace(generate=fake_generate)
    monkeypatch.setitem(sys.modules, "memagent_jax.sampler", fake)
    monkeypatch.setattr(memagent_jax, "sampler", fake, raising=False)
    fn = sampler_generate_fn("M", TOK, temperature=1.0, top_p=0.7)
    out = fn([[5, 6]], max_new_tokens=4, seed=9, top_p=0.9, top_k=None)
    assert out.tokens == [[EOS]]
    assert seen == {"model": "M", "max_new_tokens": 4, "seed": 9, "eos_ids": (1, 3), "vocab_limit": TOK.vocab_size,
                    "temperature": 1.0, "top_p": 0.9}
