"""The command line: answer over long documents (flat memory use), train -> export round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memagent_jax.models import ModelConfig, from_pretrained, init_model, save_pretrained
from memagent_jax.tokenizer import load_tokenizer, train_sentencepiece

ESSAYS = Path(__file__).resolve().parent.parent / "memagent_jax" / "data" / "essays"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_model")
    text = [(ESSAYS / name).read_text() for name in ("avg.txt", "gap.txt", "wisdom.txt")]
    tok = train_sentencepiece(text, out, vocab_size=400)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    save_pretrained(init_model(cfg, seed=0), out)
    return out


def _run_cli(args: list[str], cwd: Path) -> tuple[str, str, int]:
    """Runs the CLI in a fresh process; returns (stdout, stderr, peak RSS in KiB)."""
    code = (
        "import resource, runpy, sys\n"
        f"sys.argv = ['memagent-jax', *{args!r}]\n"
        "try:\n    runpy.run_module('memagent_jax', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = int(proc.stderr.rsplit("PEAK_RSS_KIB", 1)[1].split()[0])
    return proc.stdout, proc.stderr, rss


def _document(tokenizer, num_chunks: int, chunk: int) -> str:
    words = " ".join((ESSAYS / n).read_text() for n in sorted(p.name for p in ESSAYS.glob("*.txt")))
    ids = tokenizer.encode(words)
    assert len(ids) >= num_chunks * chunk
    return tokenizer.decode(ids[: num_chunks * chunk])


@pytest.mark.slow  # ~18 s; bench/rollout_scaling.py measures flat memory
def test_answer_reads_100_chunks_with_flat_memory(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    rss = {}
    for n in (10, 100):
        doc = tmp_path / f"doc{n}.txt"
        doc.write_text(_document(tok, n, 48))
        out, err, rss[n] = _run_cli(
            ["answer", "--model", str(tiny_model_dir), "--doc", str(doc), "--question",
             "What is the essay about?", "--chunk-size", "48", "--max-memory-tokens", "8",
             "--max-answer-tokens", "8", "--show-memory"], tmp_path)
        chunks = int(err.split(" chunks,")[0].split()[-1])
        assert abs(chunks - n) <= 1  # re-tokenizing decoded text may shift a boundary
        assert err.count("memory after chunk") == chunks
        assert out.strip() != "" or "hit --max-answer-tokens" in err
    print(f"peak RSS: 10 chunks {rss[10] / 1024:.0f} MiB, 100 chunks {rss[100] / 1024:.0f} MiB")
    assert rss[100] <= 1.15 * rss[10], rss


def test_answer_reads_a_utf8_bom_and_handles_empty_documents(tiny_model_dir, tmp_path):
    # invalid UTF-8 is an error naming the file: tests/test_cli_errors.py
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffThe code is 42. ".encode("utf-8") * 5)
    _, err, _ = _run_cli(["answer", "--model", str(tiny_model_dir), "--doc", str(bom), "--question",
                          "What is the code?", "--chunk-size", "16", "--max-memory-tokens", "4",
                          "--max-answer-tokens", "4"], tmp_path)
    assert " chunks," in err  # read (exit status 0 is checked by _run_cli)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _, err, _ = _run_cli(["answer", "--model", str(tiny_model_dir), "--doc", str(empty),
                          "--question", "Anything?", "--max-memory-tokens", "4",
                          "--max-answer-tokens", "4"], tmp_path)
    assert "empty" in err and "0 chunks" in err


def test_train_then_export_round_trip(tiny_model_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    from memagent_jax.data.memagent_rows import write_rows

    samples = [{"question": f"What is item {i}?", "context": f"Item {i} is blue. " * 6,
                "answers": ["blue"]} for i in range(4)]
    write_rows(samples, rows)
    run = tmp_path / "run"
    _run_cli(["train", "memagent", f"model.path={tiny_model_dir}", "data.source=memagent_rows",
              f"data.path={rows}", f"trainer.out_dir={run}", "trainer.total_steps=1",
              "trainer.progress=false", "rollout.group_size=2", "rl.train_batch_size=2",
              "rl.gen_batch_size=2", "rl.mini_batch_size=1", "rl.filter_groups=false",
              "agent.chunk_size=32", "agent.max_memory_tokens=4", "agent.max_final_new_tokens=4",
              "rl.kl_coef=0.001", "optim.lr=0.01", "optim.warmup_steps=1",
              "optim.weight_decay=0.5"], tmp_path)  # decay moves weights even if A = 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and "actor/kl" in metrics[0]
    assert (run / "hf" / "config.json").is_file() and (run / "hf" / "tokenizer.model").is_file()
    _run_cli(["export", str(run), "--out", str(tmp_path / "exported")], tmp_path)
    from memagent_jax.agent.settings_file import read_agent_settings

    for folder in (run / "hf", tmp_path / "exported"):  # train's export and `export` carry the agent settings
        saved = read_agent_settings(folder)
        assert (saved.chunk_size, saved.max_memory_tokens, saved.max_final_new_tokens) == (32, 4, 4), folder
    a, b = from_pretrained(run / "hf"), from_pretrained(tmp_path / "exported")
    ids = np.arange(10, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))
    trained = np.asarray(a(ids))
    assert not np.array_equal(trained, np.asarray(from_pretrained(tiny_model_dir)(ids)))


def test_unknown_config_key_is_a_clear_cli_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memagent_jax", "train", "memagent", "rl.nope=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "unknown config key 'rl.nope'" in proc.stderr


# ----------------------------------------------------------------------------- commands as the README writes them

HOTPOT = Path(__file__).resolve().parent / "data" / "hotpot_dev_distractor_60.json"


def test_data_takes_key_value_inputs_after_options(tmp_path, capsys):
    from memagent_jax import cli

    argv = ["data", "ruler_hotpotqa", "n200", "--data-dir", str(tmp_path), f"path={HOTPOT}"]
    assert cli.main(argv) == 0
    assert "built ruler_hotpotqa/n200 in " in capsys.readouterr().out
    assert cli.main(["data", "ruler_hotpotqa", "n200", "junk", "--data-dir", str(tmp_path)]) == 2
    assert "error: builder input 'junk' is not key=value: write e.g. path=" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["plan", "qwen3_4b_memagent", "--devices", "8", "--hbm-gib", "80", "rollout.max_rows_per_call=64"],
    ["plan", "qwen3_4b_memagent", "rollout.max_rows_per_call=32", "--devices", "8",
     "rollout.max_rows_per_call=64", "--hbm-gib", "80"],  # later wins, as on one line
    ["plan", "--devices", "8", "qwen3_4b_memagent", "--hbm-gib", "80", "rollout.max_rows_per_call=64"],
])
def test_plan_overrides_anywhere(argv, capsys):
    from memagent_jax import cli

    assert cli.main(argv) == 0
    assert "rollout rows per generate call: configured 64," in capsys.readouterr().out


def test_stray_arguments_are_still_rejected(capsys):
    from memagent_jax import cli

    for argv in (["answer", "--model", "m", "--doc", "d", "--question", "q", "k=v"],
                 ["plan", "memagent", "--devices", "8", "--hbm-gib", "80", "--nope"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        assert "error: unrecognized arguments: " in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "tiny"], ["plan", "tiny", "--devices", "1", "--hbm-gib", "16"]])
def test_demo_config_points_at_the_demo(argv, capsys):
    from memagent_jax import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"memagent-jax {argv[0]}: error: tiny.yaml is a demo config (its demo: section "
                          "is read by `memagent-jax demo`), not a train config (")
    assert "configs/tiny.yaml): run `memagent-jax demo` to train and evaluate it" in err
