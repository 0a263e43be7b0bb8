"""Evaluation tests: accuracy vs length with a scripted policy (oracle / blank), resume, report and
plots; an end-to-end run of `run_eval_cli` on a tiny random checkpoint through the real sampler."""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import pytest

from memagent_jax import eval as ev
from memagent_jax.config import AgentSection
from memagent_jax.types import SampleOutput
from tiny_policy import AsciiTokenizer

TOK = AsciiTokenizer()
TASKS = ["niah_single_1", "vt"]
LENGTHS = [256, 512, 1024]
HOTPOT = Path(__file__).parent / "data" / "hotpot_dev_distractor_60.json"
AGENT = AgentSection(chunk_size=200, max_memory_tokens=48, max_final_new_tokens=64)
WINDOW = 1250  # full_context: the 256/512-token documents fit with the template, 1024 does not


def question_of(prompt_text: str) -> str:
    return prompt_text.split("<problem> \n", 1)[1].split("\n</problem>", 1)[0]


class Scripted:
    """generate_fn: memory turns reply "noted"; the final turn boxes lookup[question] (oracle)
    or replies nothing (blank). Counts calls and rows."""

    def __init__(self, lookup: dict[str, list[str]] | None) -> None:
        self.lookup, self.calls, self.rows = lookup, 0, 0

    def __call__(self, prompts: list[list[int]], *, max_new_tokens: int, seed: int, **sampling: Any) -> SampleOutput:
        self.calls += 1
        self.rows += len(prompts)
        out = []
        for p in prompts:
            text = TOK.decode(p)
            if "Updated memory:" in text:
                reply = "noted"
            elif self.lookup is None:
                reply = ""
            else:
                reply = "The values are \\boxed{" + ", ".join(self.lookup[question_of(text)]) + "}"
            out.append((TOK.encode(reply) + [TOK.eos_id])[:max_new_tokens])
        return SampleOutput(tokens=out, logps=[[-0.1] * len(t) for t in out], finish_reasons=["eos"] * len(out))


def oracle_lookup(tasks: list[str], lengths: list[int], num_samples: int, seed: int, **kw: Any) -> dict[str, list[str]]:
    lookup: dict[str, list[str]] = {}
    for task in tasks:
        for n in lengths:
            for s in ev.task_samples(task, n, num_samples, TOK, seed=seed, **kw):
                assert lookup.setdefault(s["question"], s["answers"]) == s["answers"], "ambiguous question"
    return lookup


def run(out: Path, gen: Scripted, **kw: Any) -> dict[str, Any]:
    args = dict(tasks=TASKS, lengths=LENGTHS, num_samples=2, out_dir=out, agent=AGENT, seed=3,
                max_context_tokens=WINDOW, generate_fn=gen, batch_size=2, progress=False,
                full_context_overflow="na")
    return ev.evaluate(None, TOK, **{**args, **kw})


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle")
    gen = Scripted(oracle_lookup(TASKS, LENGTHS, 2, seed=3))
    return out, gen, run(out, gen)


def test_oracle_scores_100_and_full_context_na_when_too_long(oracle_run):
    out, gen, results = oracle_run
    cells = results["cells"]
    assert len(cells) == len(TASKS) * len(LENGTHS) * 2
    for task in TASKS:
        for n in LENGTHS:
            c = cells[ev.cell_key(task, n, "overwrite")]
            assert c["status"] == "ok" and c["accuracy"] == 100.0 and c["n"] == 2
            assert c["chunks_mean"] == pytest.approx(sum(r["chunks"] for r in c["samples"]) / 2)
            assert all(r["chunks"] >= n // AGENT.chunk_size for r in c["samples"])
            assert all(r["prediction"] and r["score"] == 1.0 and r["seconds"] >= 0 for r in c["samples"])
            base = cells[ev.cell_key(task, n, "full_context")]
            if n < 1024:
                assert base["status"] == "ok" and base["accuracy"] == 100.0 and base["chunks_mean"] == 0
            else:
                assert base["status"] == "n/a" and base["accuracy"] is None and "max_context_tokens" in base["reason"]
    # overwrite: batches of 2 docs -> one call per memory step + 1 final; full_context: 1 call per cell
    expected = sum(max(r["chunks"] for r in cells[ev.cell_key(t, n, "overwrite")]["samples"]) + 1
                   for t in TASKS for n in LENGTHS) + len(TASKS) * 2
    assert gen.calls == expected


def test_full_context_center_truncates_to_the_window_by_default(tmp_path):
    """The default overflow: documents longer than the window leaves are center-truncated, so
    every full-context prompt plus the answer budget fits, and the cell says so."""
    seen: list[list[int]] = []

    class Recording(Scripted):
        def __call__(self, prompts: list[list[int]], **kw: Any) -> SampleOutput:
            seen.extend(prompts)
            return super().__call__(prompts, **kw)

    lookup = oracle_lookup(["vt"], [1024], 2, seed=3)
    results = ev.evaluate(None, TOK, tasks=["vt"], lengths=[1024], num_samples=2, out_dir=tmp_path, agent=AGENT,
                          seed=3, max_context_tokens=WINDOW, generate_fn=Recording(lookup), batch_size=2,
                          progress=False)
    cell = results["cells"][ev.cell_key("vt", 1024, "full_context")]
    assert cell["status"] == "ok" and cell["accuracy"] == 100.0 and cell["truncated_share"] == 1.0
    assert 0 < cell["truncated_to"] < 1024 and all(r["doc_tokens"] > cell["truncated_to"] for r in cell["samples"])
    finals = [p for p in seen if "Updated memory:" not in TOK.decode(p)]
    assert len(finals) == 4  # 2 overwrite + 2 full_context final prompts
    full = [p for p in finals if len(p) + AGENT.max_final_new_tokens > WINDOW - 2 * AGENT.chunk_size]
    assert len(full) == 2 and all(len(p) + AGENT.max_final_new_tokens <= WINDOW for p in full)
    samples = ev.task_samples("vt", 1024, 2, TOK, seed=3)
    for p in full:  # head and tail of its document kept, the middle cut
        doc = next(TOK.encode(s["context"]) for s in samples if s["question"] in TOK.decode(p))
        text = TOK.decode(p)
        assert TOK.decode(doc[:50]) in text and TOK.decode(doc[-50:]) in text and TOK.decode(doc) not in text
    assert "center-truncated" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="full_context_overflow must be one of"):
        ev.evaluate(None, TOK, tasks=["vt"], lengths=[1024], num_samples=2, out_dir=tmp_path / "x", agent=AGENT,
                    generate_fn=Recording(lookup), full_context_overflow="drop")


def test_files_report_and_plots(oracle_run):
    out, _, results = oracle_run
    assert json.loads((out / "results.json").read_text()) == results
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 12 and set(ev.CSV_FIELDS) <= set(rows[0])
    na = [r for r in rows if r["status"] == "n/a"]
    assert [(r["task"], r["length"], r["policy"], r["accuracy"]) for r in na] == [
        (t, "1024", "full_context", "") for t in TASKS]
    md = (out / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0] == "| task | policy | 256 | 512 | 1K | avg |"
    assert table[1] == "|---|---|---|---|---|---|"
    assert "| niah_single_1 | overwrite | 100.00 | 100.00 | 100.00 | 100.00 |" in table
    assert "| vt | full_context | 100.00 | 100.00 | N/A | 100.00 |" in table
    assert "| RULER average | overwrite | 100.00 | 100.00 | 100.00 | 100.00 |" in table
    assert "| RULER average | full_context | 100.00 | 100.00 | N/A | 100.00 |" in table
    acc_rows = table[2:2 + [r.startswith("| task") for r in table[2:]].index(True)]
    assert len(acc_rows) == len(TASKS) * 2 + 2  # task x policy rows + one RULER average per policy
    for name in ev.PLOTS:
        assert (out / name).stat().st_size > 10_000, name
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_finished_cells(oracle_run, tmp_path):
    out, _, results = oracle_run
    gen = Scripted(None)
    again = run(out, gen)
    assert gen.calls == 0 and again["cells"] == results["cells"]
    # a cell missing (killed run): only that cell runs again, the rest stays as it was
    copy = tmp_path / "partial"
    copy.mkdir()
    partial = json.loads((out / "results.json").read_text())
    del partial["cells"][ev.cell_key("vt", 512, "overwrite")]
    (copy / "results.json").write_text(json.dumps(partial))
    gen = Scripted(None)
    redone = run(copy, gen)
    assert gen.calls > 0 and gen.rows == sum(
        r["chunks"] + 1 for r in results["cells"][ev.cell_key("vt", 512, "overwrite")]["samples"])
    assert redone["cells"][ev.cell_key("vt", 512, "overwrite")]["accuracy"] == 0.0  # blank answerer
    assert redone["cells"][ev.cell_key("vt", 256, "overwrite")]["accuracy"] == 100.0
    with pytest.raises(ValueError, match="different settings.*seed"):
        run(out, gen, seed=4)


def test_blank_answerer_scores_zero(tmp_path):
    results = run(tmp_path, Scripted(None), lengths=[256], baselines=(), progress=True)
    assert sorted(results["cells"]) == sorted(ev.cell_key(t, 256, "overwrite") for t in TASKS)
    for c in results["cells"].values():
        assert c["accuracy"] == 0.0 and all(r["prediction"] == "" for r in c["samples"])


def test_hotpotqa_lengths_are_document_counts(tmp_path):
    lookup = oracle_lookup(["hotpotqa"], [10, 12], 2, seed=0, hotpotqa_items=str(HOTPOT))
    results = ev.evaluate(None, TOK, tasks=["hotpotqa"], lengths=[10, 12], num_samples=2, out_dir=tmp_path,
                          agent=AgentSection(chunk_size=4000, max_memory_tokens=32, max_final_new_tokens=64),
                          hotpotqa_path=HOTPOT, generate_fn=Scripted(lookup), baselines=(), progress=False)
    for n in (10, 12):
        c = results["cells"][ev.cell_key("hotpotqa", n, "overwrite")]
        assert c["metric"] == "sub_em" and c["unit"] == "docs" and c["accuracy"] == 100.0
        assert all(r["answers"] for r in c["samples"])
    assert "| hotpotqa | overwrite | 100.00 | 100.00 | 100.00 |" in (tmp_path / "report.md").read_text()
    assert "10 docs" in (tmp_path / "report.md").read_text()


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task.*known tasks: niah_single_1"):
        run(tmp_path, Scripted(None), tasks=["niah_9"])
    with pytest.raises(ValueError, match="hotpotqa_path"):
        run(tmp_path, Scripted(None), tasks=["hotpotqa"])
    with pytest.raises(ValueError, match="squad_path"):
        run(tmp_path, Scripted(None), tasks=["qa_1"])
    with pytest.raises(ValueError, match="unknown memory policy"):
        run(tmp_path, Scripted(None), baselines=("nope",))
    assert ev.parse_lengths("8K, 16k,1.5M,50") == [8192, 16384, 1572864, 50]
    assert ev.extract_answer("so \\boxed{Paris}") == "Paris"
    assert ev.extract_answer("Therefore, the answer is London.") == "London"
    assert ev.extract_answer(" just text ") == "just text"


def test_end_to_end_tiny_checkpoint_cli(tmp_path):
    """A tiny random checkpoint + SentencePiece tokenizer through the real sampler and the CLI."""
    from memagent_jax.data.ruler_haystack import DEFAULT_ESSAYS_DIR
    from memagent_jax.models import save_pretrained
    from memagent_jax.tokenizer import train_sentencepiece
    from tiny_policy import tiny_model

    t0 = time.perf_counter()
    model_dir = tmp_path / "model"
    essays = sorted(Path(DEFAULT_ESSAYS_DIR).glob("*.txt"))[:3]
    tok = train_sentencepiece([p.read_text() for p in essays], model_dir, 400)
    save_pretrained(tiny_model(vocab_size=tok.vocab_size, max_position_embeddings=1024), model_dir)
    out = tmp_path / "eval"
    parser = ev.add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args([
        "--model", str(model_dir), "--tasks", "niah_single_1,vt", "--lengths", "120,240,360",
        "--num-samples", "2", "--out", str(out), "--chunk-size", "96", "--max-memory-tokens", "8",
        "--max-final-new-tokens", "8", "--batch-size", "2", "--max-context-tokens", "400", "--no-progress"])
    results = ev.run_eval_cli(args)
    cells = results["cells"]
    assert len(cells) == 2 * 3 * 2
    for c in cells.values():
        if c["status"] == "ok":
            assert 0.0 <= c["accuracy"] <= 100.0 and c["n"] == 2 and c["seconds"] > 0
            assert all(isinstance(r["response"], str) for r in c["samples"])
    assert all(cells[ev.cell_key(t, n, "overwrite")]["chunks_mean"] >= 1 for t in ("niah_single_1", "vt")
               for n in (120, 240, 360))
    for t in ("niah_single_1", "vt"):  # the 120-token documents fit a 400-token window, longer ones are cut
        assert [cells[ev.cell_key(t, n, "full_context")].get("truncated_share", 0.0) for n in (120, 240, 360)
                ] == [0.0, 1.0, 1.0]
    for name in ("results.json", "results.csv", "report.md", *ev.PLOTS):
        assert (out / name).is_file(), name
    assert time.perf_counter() - t0 < 90
