"""`answer` and `eval` fit the chunk to the model's window: the largest chunk by default (printed),
an error naming the real flags for one too large, full_context truncated to the window."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fake_tokenizer import CharTokenizer
from memagent_jax import cli
from memagent_jax import eval as ev
from memagent_jax.agent import PromptBuilder, fit_window
from memagent_jax.agent.window import default_budget, full_context_tokens
from memagent_jax.errors import InputError
from memagent_jax.models import ModelConfig, init_model, save_pretrained
from memagent_jax.tokenizer import load_tokenizer, train_sentencepiece

ESSAYS = Path(__file__).resolve().parent.parent / "memagent_jax" / "data" / "essays"
WINDOW = 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random checkpoint with a 1024-position window and a 400-piece tokenizer."""
    out = tmp_path_factory.mktemp("window_model")
    tok = train_sentencepiece([(ESSAYS / "avg.txt").read_text()], out, vocab_size=400)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, tie_word_embeddings=True,
                      max_position_embeddings=WINDOW)
    save_pretrained(init_model(cfg, seed=0), out)
    return out


def test_fit_window_counts_the_spliced_template():
    tok = CharTokenizer()
    b = PromptBuilder(tok)
    fit = fit_window(b, 4096, question_budget=100, memory_tokens=200, answer_tokens=50)
    template = sum(map(len, b.memory_template.pieces))
    assert fit.chosen and fit.chunk_size == 4096 - template - 100 - 2 * 200
    assert fit.memory_turn == 4096 and fit.final_turn <= 4096
    # the fitted chunk really fits: the longest memory prompt + reply is the window
    prompt = b.memory_prompt([7] * 100, [7] * 200, [7] * fit.chunk_size)
    assert len(prompt) + 200 == 4096
    assert fit_window(b, 4096, question_budget=100, memory_tokens=200, answer_tokens=50,
                      chunk_size=fit.chunk_size).chunk_size == fit.chunk_size
    with pytest.raises(InputError, match=r"agent.chunk_size \d+ does not fit .*use agent.chunk_size "
                                         rf"{fit.chunk_size} or less"):
        fit_window(b, 4096, question_budget=100, memory_tokens=200, answer_tokens=50,
                   chunk_size=fit.chunk_size + 1)
    with pytest.raises(InputError, match="the final turn needs .* lower agent.max_final_new_tokens"):
        fit_window(b, 1024, question_budget=100, memory_tokens=200, answer_tokens=900)
    with pytest.raises(InputError, match="no room for a chunk"):
        fit_window(b, 1024, question_budget=100, memory_tokens=400, answer_tokens=10)
    assert [default_budget(w) for w in (512, 4096, 8192, 32768)] == [64, 512, 1024, 1024]
    final = sum(map(len, b.final_template.pieces))
    assert full_context_tokens(b, 4096, question_tokens=10, answer_tokens=100) == 4096 - final - 110



def test_engine_length_counts_the_memory_slot_as_the_fit_does():
    """A memory budget smaller than the first memory ("No previous memory"): the engine's KV
    length holds the turns `fit_window` allowed (it counted the budget alone and a prompt of the
    fitted size overflowed the engine)."""
    from memagent_jax.agent.window import engine_max_len

    b = PromptBuilder(CharTokenizer())
    assert len(b.first_memory_ids) > 4
    template = sum(map(len, b.memory_template.pieces))
    chunk = 1024 - (template + 10 + 4 + 4)  # the budgets alone fill a 1024-position bucket exactly
    fit = fit_window(b, 4096, question_budget=10, memory_tokens=4, answer_tokens=4, chunk_size=chunk)
    length = engine_max_len(b, 4096, question_budget=10, memory_tokens=4, chunk_size=chunk,
                            answer_tokens=4)
    assert length >= max(fit.memory_turn, fit.final_turn)
    first_turn = b.memory_prompt([7] * 10, list(b.first_memory_ids), [7] * chunk)
    assert len(first_turn) + 4 <= length

def _answer(model_dir: Path, doc: Path, *extra: str) -> list[str]:
    return ["answer", "--model", str(model_dir), "--doc", str(doc), "--question", "What is it about?",
            "--max-memory-tokens", "4", "--max-answer-tokens", "4", *extra]


def test_answer_default_chunk_is_the_largest_that_fits(model_dir, tmp_path, capsys):
    tok = load_tokenizer(model_dir)
    doc = tmp_path / "doc.txt"
    doc.write_text((ESSAYS / "avg.txt").read_text()[:6000])
    assert cli.main(_answer(model_dir, doc)) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("chunk "))
    chunk = int(line.split()[1])
    q = len(tok.encode("What is it about?"))
    expected = fit_window(PromptBuilder(tok), WINDOW, question_budget=q, memory_tokens=4, answer_tokens=4)
    assert chunk == expected.chunk_size > 500 and "(the largest that fits)" in line
    assert f"of the {WINDOW}-token window" in line
    n_chunks = int(err.split(" chunks,")[0].split()[-1])
    assert n_chunks == -(-len(tok.encode(doc.read_text())) // chunk)


def test_answer_chunk_too_large_names_the_real_flags(model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("A short document.")
    assert cli.main(_answer(model_dir, doc, "--chunk-size", "5000")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memagent-jax answer: error: --chunk-size 5000 does not fit the model's "
                          f"{WINDOW}-token window")
    assert f"({model_dir / 'config.json'}): use --chunk-size " in err
    assert "--max-memory-tokens or --question-budget" in err and "max_prompt_len" not in err
    assert cli.main(_answer(model_dir, doc, "--max-answer-tokens", "2000")) == 2
    assert "lower --max-answer-tokens" in capsys.readouterr().err


def test_answer_full_context_truncates_to_the_window(model_dir, tmp_path, capsys):
    doc = tmp_path / "long.txt"
    doc.write_text((ESSAYS / "avg.txt").read_text())  # far more than 1024 tokens
    assert cli.main(_answer(model_dir, doc, "--policy", "full_context")) == 0
    err = capsys.readouterr().err
    assert "full_context: up to " in err and "0 chunks" in err


def test_eval_fits_the_chunk_and_names_its_flags(model_dir, tmp_path, capsys):
    parser = ev.add_eval_arguments(argparse.ArgumentParser())
    tok = load_tokenizer(model_dir)
    args = parser.parse_args(["--model", str(model_dir), "--tasks", "vt", "--lengths", "100",
                              "--out", str(tmp_path)])
    agent = ev.fit_agent_to_window(args, tok, WINDOW)
    assert (agent.question_budget, agent.max_memory_tokens, agent.max_final_new_tokens) == (128,) * 3
    assert agent.chunk_size > 100 and "(the largest that fits)" in capsys.readouterr().err
    args.chunk_size = agent.chunk_size + 1
    with pytest.raises(InputError, match=f"--chunk-size {args.chunk_size} does not fit .* use "
                                         f"--chunk-size {agent.chunk_size} or less"):
        ev.fit_agent_to_window(args, tok, WINDOW)
