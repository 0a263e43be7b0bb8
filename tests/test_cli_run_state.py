"""Run-folder robustness: an interrupted `train` exits non-zero and says how to resume; a torn
metrics line; a resumed run with changed settings; exported file modes; export after the base
model moved."""

from __future__ import annotations

import pytest

from memagent_jax import cli


def test_interrupted_train_exits_non_zero_with_how_to_resume(tmp_path, monkeypatch, capsys):
    import memagent_jax.train_run as train_run

    monkeypatch.setattr(train_run, "run_training", lambda cfg: "interrupted")
    out = tmp_path / "run"
    code = cli.main(["train", "memagent", f"trainer.out_dir={out}", "trainer.total_steps=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.INTERRUPTED_EXIT == 130
    assert len(err) == 1 and "interrupted" in err[0] and str(out) in err[0]
    assert f"resume with `memagent-jax train memagent trainer.out_dir={out} trainer.total_steps=3`" in err[0]


def test_finished_train_exits_zero(tmp_path, monkeypatch, capsys):
    import memagent_jax.train_run as train_run

    monkeypatch.setattr(train_run, "run_training", lambda cfg: "done")
    assert cli.main(["train", "memagent", f"trainer.out_dir={tmp_path}"]) == 0
    assert "training done" in capsys.readouterr().out


def test_torn_last_metrics_line_is_skipped_and_truncated_on_resume(tmp_path):
    from memagent_jax.metrics import MetricsWriter, read_metrics

    w = MetricsWriter(tmp_path, tensorboard=False)
    for step in (1, 2):
        w.write(step, {"reward/mean": 0.5 * step})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "reward/me')  # killed mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    with pytest.warns(UserWarning, match="torn last line"):
        w.truncate_after(2)  # what the trainer does on resume
    w.write(3, {"reward/mean": 1.5})
    w.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # no warning, no merged line


def test_bad_metrics_line_before_the_last_names_the_file(tmp_path):
    from memagent_jax.metrics import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"line 2 of .*metrics.jsonl is not JSON"):
        read_metrics(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_get_the_usual_mode(tmp_path, umask):
    import os
    import stat

    from memagent_jax.models import ModelConfig, init_model, save_pretrained

    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=64)
    model = init_model(cfg, seed=0)
    old = os.umask(umask)
    try:
        save_pretrained(model, tmp_path / "one")
        save_pretrained(model, tmp_path / "sharded", max_shard_bytes=4096)
    finally:
        os.umask(old)
    files = [*(tmp_path / "one").iterdir(), *(tmp_path / "sharded").iterdir()]
    assert len([f for f in files if f.suffix == ".safetensors"]) > 2
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_resumed_run_with_changed_settings_keeps_the_earlier_config(tmp_path):
    from memagent_jax.config import load_config, save_config

    path = tmp_path / "config.yaml"
    first = load_config("memagent", ["trainer.total_steps=3"])
    assert save_config(first, path, keep_previous=True) is None
    assert save_config(first, path, keep_previous=True) is None  # same settings: no copy, no warning
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    second = load_config("memagent", ["trainer.total_steps=5", "optim.lr=0.5"])
    with pytest.warns(UserWarning, match=r"optim.lr: .* -> 0.5, trainer.total_steps: 3 -> 5"):
        kept = save_config(second, path, keep_previous=True)
    assert kept is not None and kept.name.startswith("config.prev-") and kept.suffix == ".yaml"
    assert load_config(kept).trainer.total_steps == 3 and load_config(path).trainer.total_steps == 5
    with pytest.warns(UserWarning):
        again = save_config(first, path, keep_previous=True)  # same second: a distinct name
    assert again != kept and kept.is_file() and again.is_file()


def test_export_works_after_the_base_model_folder_moved(tmp_path):
    import shutil
    from pathlib import Path

    import numpy as np

    from memagent_jax.checkpoint import RunCheckpointer
    from memagent_jax.config import load_config, save_config
    from memagent_jax.errors import InputError
    from memagent_jax.models import ModelConfig, from_pretrained, init_model, save_pretrained
    from memagent_jax.policy import load_policy
    from memagent_jax.rl.train_step import init_train_state, make_optimizer
    from memagent_jax.tokenizer import train_sentencepiece
    from memagent_jax.train_run import RUN_BASE, export_checkpoint, save_run_base

    essays = Path(__file__).resolve().parent.parent / "memagent_jax" / "data" / "essays"
    base, run = tmp_path / "base_model", tmp_path / "run"
    tok = train_sentencepiece([(essays / n).read_text() for n in ("avg.txt", "gap.txt")],
                              base, vocab_size=400)
    shape = ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_layers=1,
                        num_heads=2, num_kv_heads=1, max_position_embeddings=128)
    save_pretrained(init_model(shape, seed=0), base)
    cfg = load_config("memagent", [f"model.path={base}", f"trainer.out_dir={run}"])
    save_config(cfg, run / "config.yaml")
    model, tokenizer = load_policy(cfg)
    save_run_base(model, tokenizer, run)  # what run_training does at train start
    trained = init_model(shape, seed=1)  # stands for the trained weights in the checkpoint
    _, state = init_train_state(trained, make_optimizer(cfg.optim.lr, 1, 1))
    ckpt = RunCheckpointer(run / "checkpoints", async_save=False)
    ckpt.save(1, state, {"rl_step": 1}, force=True)
    ckpt.close()

    base.rename(tmp_path / "moved")
    out = export_checkpoint(run, tmp_path / "hf")
    ids = np.arange(8, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(from_pretrained(out)(ids)), np.asarray(trained(ids)))
    assert (out / "tokenizer.model").is_file()

    shutil.rmtree(run / RUN_BASE)  # a run without base/ and no base folder: a clear error
    with pytest.raises(InputError, match="model.path .* is missing"):
        export_checkpoint(run, tmp_path / "hf2")
