"""The base model shipped with the package (memagent_jax/demo/base/), as MemAgent ships on top of
an instruct LLM: the demo tokenizer and the lookup-pretrained tiny decoder, with the metrics of
the run that made them and its provenance (command, seed, wall time, machine, date).

`memagent-jax demo --from-scratch` trains both in the run folder instead; adding `--ship-base`
then copies that run's tokenizer and base model here (`ship`), which is how the shipped files
were made.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent / "base"
PROVENANCE = "provenance.json"


def _need_base() -> Path:
    if not (BASE_DIR / "config.json").is_file():
        raise FileNotFoundError(f"no shipped base model in {BASE_DIR}; run `memagent-jax demo --from-scratch` "
                                "(trains the tokenizer and the base in the run) or restore the package files")
    return BASE_DIR


def provenance() -> dict[str, Any]:
    """How the shipped base was made."""
    return json.loads((_need_base() / PROVENANCE).read_text())


def copy_tokenizer(out: Path) -> dict[str, Any]:
    """The shipped tokenizer into `out` (the run's tokenizer stage)."""
    from memagent_jax.tokenizer import load_tokenizer, save_tokenizer

    tok = load_tokenizer(_need_base())
    save_tokenizer(tok, out)
    return {"vocab_size": tok.vocab_size, "source": str(BASE_DIR)}


def copy_base(out: Path) -> dict[str, Any]:
    """The shipped base model into `out/hf` and its training metrics into `out/metrics.jsonl`."""
    src = _need_base()
    hf = out / "hf"
    if hf.exists():
        shutil.rmtree(hf)
    shutil.copytree(src, hf, ignore=shutil.ignore_patterns("metrics.jsonl", PROVENANCE, "__pycache__"))
    if (src / "metrics.jsonl").is_file():
        shutil.copyfile(src / "metrics.jsonl", out / "metrics.jsonl")
    return {"source": str(BASE_DIR), "provenance": provenance()}


def ship(run_root: Path, info: dict[str, Any]) -> Path:
    """Replaces the shipped base with `<run_root>/pretrain/hf` (+ its metrics and `info`)."""
    src = run_root / "pretrain" / "hf"
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no base model to ship; run the pretrain stage first")
    if BASE_DIR.exists():
        shutil.rmtree(BASE_DIR)
    shutil.copytree(src, BASE_DIR)
    shutil.copyfile(run_root / "pretrain" / "metrics.jsonl", BASE_DIR / "metrics.jsonl")
    (BASE_DIR / PROVENANCE).write_text(json.dumps(info, indent=2) + "\n")
    return BASE_DIR
