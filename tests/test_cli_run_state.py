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
