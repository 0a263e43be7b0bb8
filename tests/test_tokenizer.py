"""Tokenizer tests: HF parity (chat template text + ids vs transformers), round trips, the
SentencePiece default, logit masking, loading/saving. Tokenizers are built here (no hub access)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jinja2
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from memagent_jax import tokenizer as mt  # noqa: E402

PARAGRAPHS = [
    "The memory agent reads a long document chunk by chunk. After every chunk it overwrites its "
    "memory with what matters for the question, and at the end it answers from the memory alone.",
    "Reinforcement learning with verifiable rewards trains the agent: each trajectory is scored by "
    "exact match against the ground truth, and group-normalized advantages drive the policy "
    "update.",
    "Question: Which city hosted the 1936 Summer Olympics? Answer: Berlin. The 1948 games were "
    "held in London, and the 1952 games in Helsinki.\n\n  Indented lines, tabs\tand numbers "
    "12345 too.",
    "Unicode text: café, naïve, façade, Ελληνικά, 中文文本, 日本語, emoji 🙂🚀, ±∞≠.",
]
CORPUS = PARAGRAPHS * 8
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]
ROUND_TRIP_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Accents é à ü, Chinese 中文 字符, emoji 🙂🎉👍🏽, math ∑∫√.",
    "  leading spaces, trailing spaces   \n\nnew\tlines\r\n and\ttabs\n\n\n",
    "",
    "x",
]
CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [{"role": "system", "content": "You answer in one word."},
                    {"role": "user", "content": "Capital of Italy?"}],
    "multi_turn": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "  Hi there!  "},
                   {"role": "assistant", "content": "Hello. \\boxed{yes}"},
                   {"role": "user", "content": "Unicode é 中文 🙂 and a\nnewline."}],
    "no_system_multi": [{"role": "user", "content": "One"},
                        {"role": "assistant", "content": "Two"},
                        {"role": "user", "content": "Three"}],
}


def _write_hf_dir(path: Path, specials: list[str], config: dict, *, bos: str | None = None,
                  generation_eos: list[str] | None = None, added: list[str] = ()) -> Path:
    """Train a tiny byte-level BPE (specials appended after the merges, as in Qwen) and save it.

    `added` are non-special added tokens (Qwen3's <think> and </think>).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(specials)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if bos is not None:  # like Llama-3: the post-processor prepends BOS when asked to
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}), encoding="utf-8")
    if generation_eos:
        ids = [tok.token_to_id(t) for t in generation_eos]
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    qwen = _write_hf_dir(root / "qwen", QWEN_SPECIALS,
                         {"chat_template": mt.QWEN2_5_TEMPLATE, "eos_token": "<|im_end|>",
                          "pad_token": "<|endoftext|>", "bos_token": None},
                         generation_eos=["<|im_end|>", "<|endoftext|>"])
    llama = _write_hf_dir(root / "llama", LLAMA_SPECIALS,
                          {"chat_template": mt.LLAMA3_TEMPLATE, "bos_token": "<|begin_of_text|>",
                           "eos_token": "<|end_of_text|>"},
                          bos="<|begin_of_text|>", generation_eos=["<|end_of_text|>", "<|eot_id|>"])
    return {"qwen": qwen, "llama": llama}


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory) -> mt.SentencePieceTokenizer:
    return mt.train_sentencepiece(CORPUS, tmp_path_factory.mktemp("sp"), 400)


@pytest.fixture(scope="module")
def reference(hf_dirs):
    """transformers' tokenizers for the same directories (the parity reference)."""
    from transformers import AutoTokenizer

    return {k: AutoTokenizer.from_pretrained(str(d)) for k, d in hf_dirs.items()}


@pytest.mark.parametrize("kind", ["qwen", "llama"])
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(hf_dirs, reference, kind, conv, gen):
    ours, ref = mt.load_tokenizer(hf_dirs[kind]), reference[kind]
    messages = CONVERSATIONS[conv]
    text = ours.apply_chat_template(messages, add_generation_prompt=gen)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    ids = ours.encode_chat(messages, add_generation_prompt=gen)
    assert ids == ref.apply_chat_template(messages, add_generation_prompt=gen, return_dict=False)
    prompt = {"qwen": "<|im_start|>assistant\n",
              "llama": "<|start_header_id|>assistant<|end_header_id|>\n\n"}[kind]
    assert text.endswith(prompt) == gen


def test_chat_template_formats(hf_dirs):
    qwen, llama = mt.load_tokenizer(hf_dirs["qwen"]), mt.load_tokenizer(hf_dirs["llama"])
    assert qwen.apply_chat_template(CONVERSATIONS["user"]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert qwen.apply_chat_template(CONVERSATIONS["system_user"], add_generation_prompt=False) == (
        "<|im_start|>system\nYou answer in one word.<|im_end|>\n"
        "<|im_start|>user\nCapital of Italy?<|im_end|>\n")
    assert llama.apply_chat_template(CONVERSATIONS["multi_turn"][:2]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("kind", ["qwen", "llama"])
def test_encode_matches_transformers(hf_dirs, reference, kind):
    ours, ref = mt.load_tokenizer(hf_dirs[kind]), reference[kind]
    texts = ROUND_TRIP_TEXTS + PARAGRAPHS + ["<|im_start|>user\nhi<|im_end|><|eot_id|> tail"]
    for text in texts:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
    assert ours.vocab_size == len(ref)


def test_no_bos_added(hf_dirs):
    ours = mt.load_tokenizer(hf_dirs["llama"])
    bos = ours.token_to_id("<|begin_of_text|>")
    # the raw tokenizers object would prepend BOS: our encode must not
    assert ours._tok.encode("hi").ids[0] == bos
    assert bos not in ours.encode("hi")
    ids = ours.encode_chat(CONVERSATIONS["multi_turn"])
    assert ids[0] == bos and ids.count(bos) == 1


def test_hf_special_ids(hf_dirs, reference):
    qwen, llama = mt.load_tokenizer(hf_dirs["qwen"]), mt.load_tokenizer(hf_dirs["llama"])
    assert isinstance(qwen, mt.HFTokenizer) and isinstance(qwen, mt.Tokenizer)
    im_end, eot = qwen.token_to_id("<|im_end|>"), llama.token_to_id("<|eot_id|>")
    assert qwen.eos_id == im_end
    assert qwen.eos_ids == (im_end, qwen.token_to_id("<|endoftext|>"))
    assert qwen.pad_id == qwen.token_to_id("<|endoftext|>")
    assert llama.eos_id == eot  # the chat end wins over eos_token <|end_of_text|>
    assert llama.eos_ids == (eot, llama.token_to_id("<|end_of_text|>"))
    assert llama.pad_id == eot  # no pad token: falls back to the eos id
    assert qwen.vocab_size == max(qwen._tok.get_vocab().values()) + 1 == 423
    assert qwen.eos_id == reference["qwen"].convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS + PARAGRAPHS)
def test_round_trip(hf_dirs, sp_tok, text):
    for tok in (mt.load_tokenizer(hf_dirs["qwen"]), mt.load_tokenizer(hf_dirs["llama"]), sp_tok):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_decode_skips_special_tokens(hf_dirs, sp_tok):
    text = "<|im_start|>user\nhi é<|im_end|>\n<|endoftext|>"
    for tok in (mt.load_tokenizer(hf_dirs["qwen"]), sp_tok):
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids) == "user\nhi é\n"


def test_chat_template_jinja_file_wins(hf_dirs, tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    for f in hf_dirs["qwen"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "chat_template.jinja").write_text(mt.chatml_template("From the jinja file."))
    text = mt.load_tokenizer(d).apply_chat_template(CONVERSATIONS["user"])
    assert text.startswith("<|im_start|>system\nFrom the jinja file.<|im_end|>\n")


def test_renderer_matches_transformers_features(hf_dirs, reference):
    """trim/lstrip blocks, tojson without HTML escaping, namespace, loopcontrols, generation tag,
    strftime_now, special-token variables, None-valued keys dropped."""
    template = (
        "{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "    {% if m.role == 'stop' %}{% break %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "    {% generation %}[{{ m.role }}]{{ m | tojson }}{% endgeneration %}\n"
        "    {{ 'extra' if m.extra is defined else '' }}\n"
        "{% endfor %}\n"
        "n={{ ns.n }} eos={{ eos_token }} pad={{ pad_token }} year={{ strftime_now('%Y') }}\n"
        "{% if add_generation_prompt %}GEN{% endif %}"
    )
    messages = [{"role": "user", "content": "<b>&'\"é</b>", "extra": None},
                {"role": "assistant", "content": "x", "extra": 1},
                {"role": "stop", "content": ""}, {"role": "user", "content": "never"}]
    ours = mt.load_tokenizer(hf_dirs["qwen"])
    text = mt.render_chat_template(template, messages, special_tokens=ours.special_tokens_map)
    expected = reference["qwen"].apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert text == expected
    assert '"<b>&\'\\"é</b>"' in text and "n=2 eos=<|im_end|> pad=<|endoftext|>" in text


def test_template_errors(hf_dirs):
    ours = mt.load_tokenizer(hf_dirs["qwen"])
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])
    with pytest.raises(jinja2.exceptions.TemplateError, match="only user"):
        mt.render_chat_template("{{ raise_exception('only user') }}", [{"role": "x"}])
    with pytest.raises(jinja2.exceptions.SecurityError):  # sandboxed: no mutation of inputs
        mt.render_chat_template("{{ messages.append(1) }}", [{"role": "x"}])


def test_sentencepiece_default(sp_tok, tmp_path):
    assert isinstance(sp_tok, mt.Tokenizer)
    ids = {t: sp_tok.encode(t) for t in mt.SPECIAL_TOKENS}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert sp_tok.eos_id == ids["<|im_end|>"][0] and sp_tok.eos_ids == (sp_tok.eos_id,)
    assert sp_tok.pad_id == ids["<|endoftext|>"][0]
    assert sp_tok.vocab_size == 400
    # symbols inside text stay single ids
    enc = sp_tok.encode("a<|im_start|>b<|im_end|>")
    assert ids["<|im_start|>"][0] in enc and ids["<|im_end|>"][0] in enc
    messages = [{"role": "user", "content": "Where is the needle?"}]
    assert sp_tok.apply_chat_template(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhere is the needle?<|im_end|>\n<|im_start|>assistant\n")
    chat_ids = sp_tok.encode_chat(messages)
    assert chat_ids[0] == ids["<|im_start|>"][0] and chat_ids.count(sp_tok.eos_id) == 2
    rendered = sp_tok.apply_chat_template(messages)
    assert sp_tok.decode(chat_ids, skip_special_tokens=False) == rendered
    # deterministic: the same corpus gives byte-identical models
    again = mt.train_sentencepiece(CORPUS, tmp_path, 400)
    assert again.model_file.read_bytes() == sp_tok.model_file.read_bytes()


def test_sentencepiece_custom_template(tmp_path):
    template = mt.chatml_template("You're \"careful\" — é.")
    tok = mt.train_sentencepiece(CORPUS, tmp_path, 350, model_type="unigram",
                                 chat_template=template)
    loaded = mt.load_tokenizer(tmp_path)  # reads the template back from tokenizer_config.json
    assert isinstance(loaded, mt.SentencePieceTokenizer)
    messages = [{"role": "user", "content": "q"}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nYou're \"careful\" — é.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n")
    assert loaded.encode("naïve 🙂") == tok.encode("naïve 🙂")
    assert mt.chatml_template(None).count("system") == 0
    with pytest.raises(ValueError, match="vocab_size"):
        mt.train_sentencepiece(CORPUS, tmp_path / "small", 100)


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_mask_unknown_ids(backend):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 10)).astype(np.float32)
    x = logits
    if backend == "jax":
        import jax.numpy as jnp

        x = jnp.asarray(logits)
    out = np.asarray(mt.mask_unknown_ids(x, 7))
    np.testing.assert_array_equal(out[..., :7], logits[..., :7])
    assert np.all(out[..., 7:] == np.float32(-1e30)) and np.all(np.isfinite(out))
    assert mt.mask_unknown_ids(x, 10) is x and mt.mask_unknown_ids(x, 12) is x
    half = mt.mask_unknown_ids(x.astype(np.float16), 7)
    assert np.all(np.asarray(half)[..., 7:] == np.finfo(np.float16).min)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        masked = jax.jit(mt.mask_unknown_ids, static_argnums=1)(x.astype(jnp.bfloat16), 7)
        assert masked.dtype == jnp.bfloat16 and int(jnp.argmax(masked[0, 0])) < 7
        assert float(masked[0, 0, 9]) < -1e29


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*tokenizer.model") as err:
        mt.load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mt.load_tokenizer(tmp_path / "missing")


def test_save_tokenizer(hf_dirs, sp_tok, tmp_path):
    for name, tok in (("qwen", mt.load_tokenizer(hf_dirs["qwen"])), ("sp", sp_tok)):
        out = tmp_path / name
        copied = mt.save_tokenizer(tok, out)
        assert copied and all(p.parent == out for p in copied)
        again = mt.load_tokenizer(out)
        assert type(again) is type(tok)
        assert (again.eos_ids, again.pad_id, again.vocab_size) == (tok.eos_ids, tok.pad_id,
                                                                  tok.vocab_size)
        conv = CONVERSATIONS["multi_turn"]
        assert again.encode_chat(conv) == tok.encode_chat(conv)
    assert (tmp_path / "qwen" / "generation_config.json").is_file()


# ----------------------------------------------------------------------------- Qwen3 thinking

QWEN3_CONVERSATIONS = {
    **CONVERSATIONS,
    "thinking_history": [
        {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nOne."},
        {"role": "user", "content": "Second?"},
        {"role": "assistant", "content": "<think>\nnew thoughts\n</think>\n\nTwo."},
    ],
    "reasoning_field": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because.", "reasoning_content": "\nsome reason\n"},
        {"role": "assistant", "content": "\nAlso this."},
    ],
}


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    return _write_hf_dir(tmp_path_factory.mktemp("hf") / "qwen3", QWEN_SPECIALS,
                         {"chat_template": mt.QWEN3_TEMPLATE, "eos_token": "<|im_end|>",
                          "pad_token": "<|endoftext|>", "bos_token": None},
                         added=["<think>", "</think>"])


@pytest.mark.parametrize("conv", sorted(QWEN3_CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("thinking", [None, True, False])
def test_qwen3_template_thinking_matches_transformers(qwen3_dir, conv, gen, thinking):
    """enable_thinking reaches the template as in transformers (None: not passed at all)."""
    from transformers import AutoTokenizer

    ours, ref = mt.load_tokenizer(qwen3_dir), AutoTokenizer.from_pretrained(str(qwen3_dir))
    messages, kwargs = QWEN3_CONVERSATIONS[conv], ({} if thinking is None else {"enable_thinking": thinking})
    text = ours.apply_chat_template(messages, add_generation_prompt=gen, **kwargs)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kwargs)
    assert ours.encode_chat(messages, gen, **kwargs) == ref.apply_chat_template(
        messages, add_generation_prompt=gen, return_dict=False, **kwargs)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") == (gen and thinking is False)


def test_qwen3_template_format(qwen3_dir):
    tok = mt.load_tokenizer(qwen3_dir)
    assert tok.apply_chat_template(QWEN3_CONVERSATIONS["thinking_history"], add_generation_prompt=False) == (
        "<|im_start|>user\nFirst?<|im_end|>\n<|im_start|>assistant\nOne.<|im_end|>\n"  # old thinking dropped
        "<|im_start|>user\nSecond?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nnew thoughts\n</think>\n\nTwo.<|im_end|>\n")
    assert tok.apply_chat_template(CONVERSATIONS["user"], enable_thinking=False) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_memory_workflow_renders_non_thinking_and_strips_thinking(qwen3_dir):
    """Default memory prompts are non-thinking; a thinking reply is cut on ids (single-token
    markers) before it becomes the memory."""
    from memagent_jax.agent import OverwritePolicy, PromptBuilder

    tok = mt.load_tokenizer(qwen3_dir)
    default, thinking = PromptBuilder(tok), PromptBuilder(tok, enable_thinking=True)
    q, m, c = tok.encode("Q?"), tok.encode("none"), tok.encode("some text")
    assert tok.decode(default.memory_prompt(q, m, c), skip_special_tokens=False).endswith(
        "Updated memory:<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(thinking.final_prompt(q, m), skip_special_tokens=False).endswith(
        "Your answer:<|im_end|>\n<|im_start|>assistant\n")
    open_id, close_id = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    assert open_id is not None and close_id is not None
    reply = tok.encode("<think>\nThe section says 7.\n</think>\n\nThe key is 7.") + [tok.eos_id]
    assert close_id in reply
    memory, capped = OverwritePolicy(max_memory_tokens=64).update([], reply, tok)
    assert tok.decode(memory) == "The key is 7." and not capped
    cut = tok.encode("Kept. <think>\nstill thinking")
    assert tok.decode(OverwritePolicy().update([], cut, tok)[0]) == "Kept."
