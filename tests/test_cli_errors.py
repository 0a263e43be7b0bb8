"""Bad input gets one clear error: `memagent-jax <command>: error: <what> (<file>): <fix>`, exit
status 2, no traceback (unless --debug), and nothing written. Runs the CLI in-process (fast)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from memagent_jax import cli
from memagent_jax.errors import InputError
from memagent_jax.models import ModelConfig, init_model, save_pretrained
from memagent_jax.tokenizer import train_sentencepiece

ESSAYS = Path(__file__).resolve().parent.parent / "memagent_jax" / "data" / "essays"


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    """A tiny random checkpoint (vocabulary = the tokenizer's 400 ids)."""
    out = tmp_path_factory.mktemp("good")
    tok = train_sentencepiece([(ESSAYS / "avg.txt").read_text()], out, vocab_size=400)
    save_pretrained(init_model(_config(tok.vocab_size), seed=0), out)
    return out


def _config(vocab: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                       num_kv_heads=1, tie_word_embeddings=True, max_position_embeddings=512)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def error_of(argv: list[str], capsys) -> str:
    """Run the CLI; assert exit status 2 and one error line without a traceback; return it."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    command = next(a for a in argv if not a.startswith("-"))
    lines = [x for x in err.splitlines() if x.startswith(f"memagent-jax {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0].split(": error: ", 1)[1]


def answer(model: Path, doc: Path, question: str = "What is it about?") -> list[str]:
    return ["answer", "--model", str(model), "--doc", str(doc), "--question", question,
            "--max-memory-tokens", "4", "--max-answer-tokens", "4"]


@pytest.fixture
def doc(tmp_path) -> Path:
    p = tmp_path / "doc.txt"
    p.write_text("The code is 42.")
    return p


# ----------------------------------------------------------------------------- plan


@pytest.mark.parametrize("flags, message", [
    (["--devices", "0", "--hbm-gib", "80"],
     "--devices 0 is not a number of accelerators: pass --devices N with N >= 1 (e.g. --devices 8)"),
    (["--devices", "-2", "--hbm-gib", "80"],
     "--devices -2 is not a number of accelerators: pass --devices N with N >= 1 (e.g. --devices 8)"),
    (["--devices", "8", "--hbm-gib", "0"],
     "--hbm-gib 0.0 is not an amount of memory: pass the GiB of one accelerator, e.g. --hbm-gib 80"),
    (["--devices", "8", "--hbm-gib", "-80"],
     "--hbm-gib -80.0 is not an amount of memory: pass the GiB of one accelerator, e.g. --hbm-gib 80"),
    (["--devices", "8", "--hbm-gib", "nan"],
     "--hbm-gib nan is not an amount of memory: pass the GiB of one accelerator, e.g. --hbm-gib 80"),
])
def test_plan_devices_and_memory_must_be_positive(flags, message, capsys):
    assert error_of(["plan", "qwen3_4b_memagent", *flags], capsys) == message


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("override, message", [
    ("trainer.save_every=0", "trainer.save_every=0 is not a positive number of steps between "
                             "checkpoints (command line): set trainer.save_every >= 1 (default 10)"),
    ("trainer.total_steps=-1", "trainer.total_steps=-1 is not a positive number of RL steps to run "
                               "(command line): set trainer.total_steps >= 1 (default 200)"),
    ("trainer.total_steps=0", "trainer.total_steps=0 is not a positive number of RL steps to run "
                              "(command line): set trainer.total_steps >= 1 (default 200)"),
])
def test_train_numeric_knobs_are_checked_before_anything_runs(override, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert error_of(["train", "memagent", override, f"trainer.out_dir={out}"], capsys) == message
    assert not out.exists()


def test_a_bad_knob_in_a_file_names_the_file(tmp_path, capsys):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("base: memagent.yaml\ntrainer:\n  save_every: 0\n")
    assert error_of(["train", str(cfg)], capsys) == (
        f"trainer.save_every=0 is not a positive number of steps between checkpoints ({cfg}): "
        "set trainer.save_every >= 1 (default 10)")


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("trainer:\n  total_steps: 3\n  out_dir: [runs/x\n")
    msg = error_of(["plan", str(cfg), "--devices", "8", "--hbm-gib", "80"], capsys)
    assert msg.startswith("invalid YAML: ") and " at line " in msg and ", column " in msg
    assert msg.endswith(f"({cfg}): fix the syntax (indentation, 'key: value' pairs)")


def test_base_cycle_and_missing_base_name_the_file(tmp_path, capsys):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    assert error_of(["train", str(a)], capsys) == (
        f"base: cycle a.yaml -> b.yaml -> a.yaml ({a}): remove the base: entry that leads back")
    b.write_text("base: nowhere.yaml\n")
    msg = error_of(["train", str(a)], capsys)
    assert msg.startswith(f"base config 'nowhere.yaml' not found ({b}): fix the base: entry")
    b.write_text("- just\n- a list\n")
    assert error_of(["train", str(b)], capsys).startswith(
        f"a config is a mapping of sections (model:, agent:, ...), got a list ({b})")


# ----------------------------------------------------------------------------- answer inputs


@pytest.mark.parametrize("question", ["", "   ", "\n\t"])
def test_empty_question(question, good_model, doc, capsys):
    assert error_of(answer(good_model, doc, question), capsys) == (
        '--question is empty: ask a question, e.g. --question "Who wrote it?"')


def test_doc_must_be_a_file(good_model, tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    assert error_of(answer(good_model, folder), capsys) == (
        f"--doc is a directory, not a text file ({folder}): pass one text file "
        f"(--doc {folder / 'document.txt'})")
    missing = tmp_path / "missing.txt"
    assert error_of(answer(good_model, missing), capsys) == (
        f"--doc: no such file ({missing}): pass an existing text file to --doc")


def test_numeric_flags_must_be_positive(good_model, doc, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*answer(good_model, doc), "--chunk-size", "0"])
    assert e.value.code == 2
    assert "argument --chunk-size: 0 is not a positive number" in capsys.readouterr().err


def test_doc_that_is_not_utf8_names_the_file(good_model, tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Le code secret est 42, déjà noté. ".encode("latin-1") * 3)
    assert error_of(answer(good_model, latin1), capsys) == (
        f"--doc is not UTF-8 text (invalid continuation byte at byte 24; 9 undecodable bytes or "
        f"sequences) ({latin1}): convert it to UTF-8, e.g. iconv -f latin1 -t utf-8 {latin1} > "
        "latin1.utf8.txt")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    assert error_of(answer(good_model, binary), capsys).startswith(f"--doc is not UTF-8 text (invalid start byte at byte 128")


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "argument --temperature: -1.0 is below 0: pass 0 (greedy) or more"),
    (["--top-p", "0"], "argument --top-p: 0.0 is not in (0, 1]"),
    (["--top-p", "1.5"], "argument --top-p: 1.5 is not in (0, 1]"),
])
def test_sampling_flags_out_of_range_are_errors_not_silent_greedy(flags, message, good_model, doc, capsys):
    for argv in ([*answer(good_model, doc), *flags],
                 ["eval", "--model", str(good_model), "--tasks", "vt", "--lengths", "100", "--out", "x", *flags]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_eval_lengths_must_be_positive(good_model, tmp_path, capsys):
    msg = error_of(["eval", "--model", str(good_model), "--tasks", "vt", "--lengths", "8K,0",
                    "--out", str(tmp_path / "eval")], capsys)
    assert msg.startswith("bad length '0' in --lengths '8K,0': lengths are positive")
    assert not (tmp_path / "eval").exists()


def test_engine_requests_check_sampling_settings():
    from memagent_jax.engine import Request

    for kwargs, message in (({"temperature": -0.5}, "temperature must be >= 0"),
                            ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
                            ({"top_k": -1}, "top_k must be >= 0")):
        with pytest.raises(ValueError, match=message):
            Request(prompt=[1], max_new_tokens=1, key=None, **kwargs)


# ----------------------------------------------------------------------------- model files


def test_tokenizer_larger_than_the_vocabulary_is_an_error_at_load(good_model, tmp_path, doc, capsys):
    model = _copy(good_model, tmp_path / "small_vocab")
    save_pretrained(init_model(_config(300), seed=0), model)  # the embedding has 300 rows
    assert error_of(answer(model, doc), capsys) == (
        f"the tokenizer has 400 ids but the model ({model / 'config.json'}) embeds only 300: the "
        f"tokenizer does not belong to this model ({model}): use the tokenizer files saved with this "
        "checkpoint")


def test_truncated_and_corrupt_safetensors_name_the_file(good_model, tmp_path, doc, capsys):
    model = _copy(good_model, tmp_path / "truncated")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    msg = error_of(answer(model, doc), capsys)
    assert msg.startswith("tensor ") and f"data bytes ({weights}): the file is truncated or corrupt" in msg
    weights.write_bytes(b"\xff" * 8 + data[8:])  # header length garbage
    msg = error_of(answer(model, doc), capsys)
    assert msg.startswith("safetensors header of ") and f"({weights}): the file is truncated" in msg
    weights.write_bytes(data[:8] + b"#" * 20 + data[28:])  # header text garbage
    assert error_of(answer(model, doc), capsys) == (
        f"unreadable safetensors header (not JSON) ({weights}): the file is truncated or corrupt: "
        "download or export it again")
    weights.write_bytes(data[:5])
    assert error_of(answer(model, doc), capsys).startswith(f"not a safetensors file (5 bytes, no header) ({weights})")


def test_invalid_config_json_names_the_file(good_model, tmp_path, doc, capsys):
    model = _copy(good_model, tmp_path / "bad_config")
    config = model / "config.json"
    good = config.read_text()
    config.write_text(good[: len(good) // 2])
    msg = error_of(answer(model, doc), capsys)
    assert msg.startswith("config.json is not valid JSON (") and " at line " in msg
    assert msg.endswith(f"({config}): fix the file or restore it from the checkpoint")
    config.write_text(json.dumps({**json.loads(good), "architectures": ["GPT2LMHeadModel"],
                                  "model_type": "gpt2"}))
    msg = error_of(answer(model, doc), capsys)
    assert msg.startswith("unsupported architecture") and f"({config}): use a Qwen2/Qwen3/Llama" in msg
    # eval goes through the same checks
    config.write_text("[1, 2]")
    msg = error_of(["eval", "--model", str(model), "--tasks", "vt", "--lengths", "100",
                    "--out", str(tmp_path / "eval")], capsys)
    assert msg == f"config.json must hold a JSON object, got list ({config}): restore the file from the checkpoint"
    assert not (tmp_path / "eval").exists()


def test_weight_map_may_not_leave_the_model_folder(good_model, tmp_path, doc, capsys):
    model = _copy(good_model, tmp_path / "sharded")
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(model / "model.safetensors", outside)
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"embed_tokens.weight": "../elsewhere.safetensors"}}))
    assert error_of(answer(model, doc), capsys) == (
        f"the weight map points outside the model folder ('../elsewhere.safetensors') ({index}): "
        "weight files must be inside the model directory: fix the index")


def _requantize(model: Path, name: str) -> None:
    """Rewrites weight `name` of model.safetensors as int8 (as a quantized checkpoint stores it)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    tensors[name] = np.clip(np.round(tensors[name] * 127), -127, 127).astype(np.int8)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def test_quantized_weights_are_an_error_naming_the_weight_and_dtype(good_model, tmp_path, doc, capsys):
    model = _copy(good_model, tmp_path / "int8")
    _requantize(model, "model.layers.0.mlp.down_proj.weight")
    weights = model / "model.safetensors"
    expected = ("weight 'model.layers.0.mlp.down_proj.weight' has dtype I8, not a float type: quantized "
                "checkpoints (int8/uint8/int4-packed, fp8; GPTQ, AWQ, bitsandbytes) are not supported "
                f"({weights}): use the unquantized checkpoint (float32, bfloat16 or float16 safetensors)")
    assert error_of(answer(model, doc), capsys) == expected
    msg = error_of(["eval", "--model", str(model), "--tasks", "vt", "--lengths", "100",
                    "--out", str(tmp_path / "eval")], capsys)
    assert msg == expected and not (tmp_path / "eval").exists()
    # the loader itself (train's model.path goes straight to it) refuses it too
    from memagent_jax.models import from_pretrained

    with pytest.raises(InputError, match=r"weight 'model.layers.0.mlp.down_proj.weight' has dtype I8"):
        from_pretrained(model)


def test_quantization_config_is_an_error_naming_config_json(good_model, tmp_path, doc, capsys):
    model = _copy(good_model, tmp_path / "gptq")
    config = model / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    assert error_of(answer(model, doc), capsys) == (
        "config.json has a quantization_config (quant_method 'gptq'): quantized checkpoints are not "
        "supported; use the unquantized checkpoint (float32, bfloat16 or float16 safetensors) "
        f"({config}): use a Qwen2/Qwen3/Llama config.json as transformers writes it")


# ----------------------------------------------------------------------------- --debug


def test_debug_shows_the_exception(capsys):
    argv = ["plan", "qwen3_4b_memagent", "--devices", "0", "--hbm-gib", "80"]
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(InputError, match="--devices 0 is not a number of accelerators"):
            cli.main(debug_argv)
