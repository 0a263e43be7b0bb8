"""An exported model carries the agent settings it was trained with (`memagent_agent.json`), and
`answer` / `eval` use them as defaults: flags override them, settings far from them warn once,
folders without the file behave as before, a broken file is one clear error."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import pytest

from memagent_jax import cli
from memagent_jax import eval as ev
from memagent_jax.agent.cli_settings import far_from_training, folder_settings
from memagent_jax.agent.prompts import FINAL_ANSWER_IS_TEMPLATE, builder_from_config
from memagent_jax.agent.settings_file import SETTINGS_FILE, read_agent_settings, write_agent_settings
from memagent_jax.config import AgentSection
from memagent_jax.errors import InputError
from memagent_jax.models import ModelConfig, init_model, save_pretrained
from memagent_jax.tokenizer import load_tokenizer, train_sentencepiece

ESSAYS = Path(__file__).resolve().parent.parent / "memagent_jax" / "data" / "essays"

#: Agent settings unlike every default: the demo's kind (short chunk, small budgets, own templates).
TRAINED = AgentSection(chunk_size=32, max_chunks=3, max_memory_tokens=8, max_final_new_tokens=6,
                       question_budget=40, memory_template="Memory: {memory}\nSection: {chunk}\nUpdate. {prompt}",
                       final_template="Memory: {memory}\nAnswer in \\boxed{}. {prompt}", first_memory="none")


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    """A tiny random model folder (1024 positions) without agent settings: an "old" export."""
    out = tmp_path_factory.mktemp("plain_model")
    tok = train_sentencepiece([(ESSAYS / "avg.txt").read_text()], out, vocab_size=400)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, tie_word_embeddings=True, max_position_embeddings=1024)
    save_pretrained(init_model(cfg, seed=0), out)
    return out


@pytest.fixture()
def agent_dir(plain_dir, tmp_path) -> Path:
    """The same model folder with TRAINED saved in it."""
    out = tmp_path / "agent_model"
    shutil.copytree(plain_dir, out)
    write_agent_settings(out, TRAINED)
    return out


@pytest.fixture()
def doc(plain_dir, tmp_path) -> Path:
    """A document of 3 chunks of 32 tokens of the model's tokenizer."""
    tok = load_tokenizer(plain_dir)
    path = tmp_path / "doc.txt"
    path.write_text(tok.decode(tok.encode((ESSAYS / "avg.txt").read_text())[:96]))
    return path


def answer(model: Path, doc: Path, *flags: str) -> list[str]:
    return ["answer", "--model", str(model), "--doc", str(doc), "--question", "What is the secret code for tell?",
            "--engine", "static", *flags]


# ----------------------------------------------------------------------------- the file


def test_file_round_trips_with_full_templates(tmp_path):
    path = write_agent_settings(tmp_path, TRAINED)
    assert path == tmp_path / SETTINGS_FILE == tmp_path / "memagent_agent.json"
    data = json.loads(path.read_text())
    assert data["format"] == "memagent-jax agent settings" and data["version"] == 1
    assert set(data) - {"format", "version"} == {f.name for f in dataclasses.fields(AgentSection)}
    assert read_agent_settings(tmp_path) == TRAINED
    # the reference templates are written out in full: the file does not depend on the package's defaults
    write_agent_settings(tmp_path, AgentSection(final_style="answer_is"))
    data = json.loads(path.read_text())
    assert data["final_template"] == FINAL_ANSWER_IS_TEMPLATE and data["first_memory"] == "No previous memory"
    assert "<section>" in data["memory_template"]
    assert read_agent_settings(tmp_path / "nowhere") is None


@pytest.mark.parametrize("content,what", [
    ("{not json", "the agent settings file is not valid JSON"),
    ('{"chunk_size": 32}', 'lacks "format": "memagent-jax agent settings"'),
    ('{"format": "memagent-jax agent settings", "version": 9}', "agent settings version 9"),
    ('{"format": "memagent-jax agent settings", "version": 1, "chunk": 32}', "unknown agent setting(s) ['chunk']"),
    ('{"format": "memagent-jax agent settings", "version": 1, "chunk_size": 0}',
     "agent setting 'chunk_size' is 0, not a positive integer"),
    ('{"format": "memagent-jax agent settings", "version": 1, "enable_thinking": "no"}',
     "agent setting 'enable_thinking' is 'no', not true or false"),
])
def test_a_broken_file_is_one_clear_error(agent_dir, doc, content, what, capsys):
    (agent_dir / SETTINGS_FILE).write_text(content)
    with pytest.raises(InputError, match="re-export the model"):
        read_agent_settings(agent_dir)
    assert cli.main(answer(agent_dir, doc)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memagent-jax answer: error: ") and what in err and str(agent_dir / SETTINGS_FILE) in err
    assert len(err.splitlines()) == 1


def test_export_writes_the_file_beside_single_and_sharded_weights(plain_dir, tmp_path):
    """Only `memagent_agent.json` is added; the weights, config.json and tokenizer are unchanged."""
    from memagent_jax.models import from_pretrained
    from memagent_jax.train_run import export_model

    model, tok = from_pretrained(plain_dir), load_tokenizer(plain_dir)
    bare = export_model(model, tok, tmp_path / "bare")
    single = export_model(model, tok, tmp_path / "single", agent=TRAINED)
    sharded = export_model(model, tok, tmp_path / "sharded", agent=TRAINED, max_shard_bytes=20_000)
    assert not (bare / SETTINGS_FILE).exists()
    names = {p.name for p in bare.iterdir()}
    assert {p.name for p in single.iterdir()} == names | {SETTINGS_FILE}
    assert "model.safetensors.index.json" in {p.name for p in sharded.iterdir()}
    for folder in (single, sharded):
        assert read_agent_settings(folder) == TRAINED
    for name in names:  # nothing else in the folder changes
        assert (single / name).read_bytes() == (bare / name).read_bytes(), name


# ----------------------------------------------------------------------------- answer


def test_answer_uses_the_saved_settings(agent_dir, doc, capsys):
    assert cli.main(answer(agent_dir, doc, "--show-memory")) == 0
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("agent settings from "))
    assert line == (f"agent settings from {agent_dir / SETTINGS_FILE}: policy overwrite, chunk 32, memory 8, "
                    "answer 6, question budget at least 40, final style boxed, templates and first memory 'none', "
                    "thinking off")
    template = sum(map(len, builder_from_config(load_tokenizer(agent_dir), TRAINED).memory_template.pieces))
    assert f"chunk 32 tokens (as trained): a memory turn is {template + 40 + 8 + 32 + 8} " in err
    assert "memory after chunk 3/3" in err and "other agent settings" not in err


def test_answer_flags_override_the_saved_settings(agent_dir, doc, capsys):
    assert cli.main(answer(agent_dir, doc, "--chunk-size", "48", "--max-memory-tokens", "12",
                           "--question-budget", "50")) == 0
    err = capsys.readouterr().err
    assert "memory 8" not in err and "answer 6" in err
    assert "(given: --chunk-size, --max-memory-tokens, --question-budget)" in err
    assert "chunk 48 tokens (as given)" in err and "question 50 + memory 12 + chunk 48" in err
    assert "memory after chunk" not in err and "other agent settings" not in err  # 1.5x the chunk: close


@pytest.mark.parametrize("flags,why", [
    (["--chunk-size", "128"], "chunk 128 tokens vs 32 trained (4x)"),
    (["--final-style", "answer_is"], "final template other than the saved one"),
    (["--max-memory-tokens", "4"], "memory 4 tokens vs 8 trained"),
])
def test_answer_warns_once_far_from_training(agent_dir, doc, flags, why, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(answer(agent_dir, doc, *flags)) == 0
    far = [str(w.message) for w in caught if "other agent settings" in str(w.message)]
    assert len(far) == 1 and why in far[0] and str(agent_dir / SETTINGS_FILE) in far[0]


def test_answer_without_the_file_behaves_as_before(plain_dir, doc, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(answer(plain_dir, doc, "--max-memory-tokens", "8", "--max-answer-tokens", "6")) == 0
    err = capsys.readouterr().err
    assert "agent settings from" not in err and "(the largest that fits)" in err
    assert not [w for w in caught if "other agent settings" in str(w.message)]
    template = sum(map(len, builder_from_config(load_tokenizer(plain_dir), AgentSection()).memory_template.pieces))
    assert f"= template {template} + " in err  # MemAgent's reference templates


def test_a_longer_question_than_trained_is_read_whole_with_a_warning(agent_dir, doc, capsys):
    long_q = "What is the secret code for tell, the one the essay hides among its many other words? " * 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main([*answer(agent_dir, doc)[:-4], "--question", long_q, "--engine", "static"]) == 0
    assert any("over the trained budget 40" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- eval


def eval_args(model: Path, tmp_path: Path, *flags: str) -> argparse.Namespace:
    parser = ev.add_eval_arguments(argparse.ArgumentParser())
    return parser.parse_args(["--model", str(model), "--tasks", "vt", "--lengths", "100", "--out", str(tmp_path),
                              *flags])


def test_eval_uses_the_saved_settings_and_flags_override(agent_dir, plain_dir, tmp_path, capsys):
    tok = load_tokenizer(agent_dir)
    agent = ev.fit_agent_to_window(eval_args(agent_dir, tmp_path), tok, 1024)
    # the saved question budget is a lower bound: the window's default 128 is larger
    assert agent == dataclasses.replace(read_agent_settings(agent_dir), question_budget=128)
    err = capsys.readouterr().err
    assert f"agent settings from {agent_dir / SETTINGS_FILE}: policy overwrite, chunk 32" in err
    assert "chunk 32 tokens (as trained)" in err

    with pytest.warns(UserWarning, match="final template other than the saved one"):
        agent = ev.fit_agent_to_window(eval_args(agent_dir, tmp_path, "--max-final-new-tokens", "9",
                                                 "--final-style", "answer_is"), tok, 1024)
    assert (agent.chunk_size, agent.max_memory_tokens, agent.max_final_new_tokens) == (32, 8, 9)
    assert agent.final_template == FINAL_ANSWER_IS_TEMPLATE and agent.memory_template == TRAINED.memory_template
    assert "(given: --max-final-new-tokens, --final-style)" in capsys.readouterr().err

    old = ev.fit_agent_to_window(eval_args(plain_dir, tmp_path), tok, 1024)  # no file: as before
    assert (old.question_budget, old.max_memory_tokens, old.max_final_new_tokens) == (128,) * 3
    assert old.memory_template == "" and old.chunk_size > 100
    assert "agent settings from" not in capsys.readouterr().err


def test_eval_runs_with_the_saved_settings(agent_dir, tmp_path, capsys):
    """`memagent-jax eval` end to end: results.json records the saved agent settings."""
    argv = ["eval", "--model", str(agent_dir), "--tasks", "vt", "--lengths", "256", "--num-samples", "1",
            "--out", str(tmp_path / "ev"), "--baselines", "none", "--engine", "static", "--no-progress"]
    assert cli.main(argv) == 0
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())["settings"]["agent"]
    assert {k: saved[k] for k in ("chunk_size", "max_memory_tokens", "first_memory", "memory_template")} == {
        "chunk_size": 32, "max_memory_tokens": 8, "first_memory": "none", "memory_template": TRAINED.memory_template}


def test_far_from_training_names_each_departure():
    used = dataclasses.replace(TRAINED, chunk_size=8, max_final_new_tokens=2, enable_thinking=True,
                               first_memory="No previous memory")
    found = far_from_training(TRAINED, used, question_tokens=41)
    assert found == ["chunk 8 tokens vs 32 trained (0.25x)", "answer budget 2 tokens vs 6 trained",
                     "the question is 41 tokens, over the trained budget 40",
                     "first memory other than the saved one", "thinking on vs off trained"]
    assert far_from_training(TRAINED, dataclasses.replace(TRAINED, policy="full_context")) == [
        "policy full_context vs overwrite trained"]
    assert far_from_training(None, used) == [] and far_from_training(TRAINED, TRAINED) == []


def test_folder_settings_keep_policy_kwargs_only_for_the_saved_policy(tmp_path):
    write_agent_settings(tmp_path, dataclasses.replace(TRAINED, policy_kwargs={"keep": 3}))
    assert folder_settings(tmp_path, {}).agent.policy_kwargs == {"keep": 3}
    assert folder_settings(tmp_path, {"policy": "full_context"}).agent.policy_kwargs == {}
    with pytest.raises(TypeError, match="unknown settings"):
        folder_settings(tmp_path, {"chunk": 3})
