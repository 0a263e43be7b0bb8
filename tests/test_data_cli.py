"""`memagent-jax data ruler_synthetic CONFIG --data-dir DIR tokenizer=DIR` from the command line;
a failed build leaves no partial dataset folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from memagent_jax import cli

ESSAYS = Path(__file__).resolve().parent.parent / "memagent_jax" / "data" / "essays"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from memagent_jax.tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("tok")
    train_sentencepiece([(ESSAYS / n).read_text() for n in ("avg.txt", "gap.txt")], out, vocab_size=400)
    return out


def test_ruler_synthetic_builds_from_the_command_line(tok_dir, tmp_path, capsys):
    from memagent_jax.data.tfds_builders import load_dataset

    data = tmp_path / "data"
    assert cli.main(["data", "ruler_synthetic", "niah_single_1_256_k2", "--data-dir", str(data),
                     f"tokenizer={tok_dir}"]) == 0
    assert "built ruler_synthetic/niah_single_1_256_k2" in capsys.readouterr().out
    rows = load_dataset("ruler_synthetic", "niah_single_1_256_k2", str(data))
    assert len(rows) == 2 and rows[0]["question"] and rows[0]["answers"]


def test_failed_build_leaves_no_partial_folder(tmp_path, capsys):
    data = tmp_path / "data"
    code = cli.main(["data", "ruler_synthetic", "niah_single_1_256_k2", "--data-dir", str(data),
                     f"tokenizer={tmp_path / 'nowhere'}"])
    assert code == 2 and "No tokenizer in" in capsys.readouterr().err
    assert not data.exists()
    data.mkdir()
    (data / "other").mkdir()  # folders that were there before stay
    code = cli.main(["data", "ruler_synthetic", "niah_single_1_256_k2", "--data-dir", str(data)])
    assert code == 2 and "needs tokenizer=DIR" in capsys.readouterr().err
    assert sorted(p.name for p in data.iterdir()) == ["other"]
