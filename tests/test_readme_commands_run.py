"""Every command line of README.md's "## Command line" block RUNS as the README writes it, at small
sizes: the optional parts are kept and the metavariables (DIR, N, CONFIG, ...) are filled with
small real inputs, in the order they appear on the line. The demo line runs first (micro config,
from scratch) and its outputs feed the others: its RL config trains, the trained run exports, its
policy answers and is evaluated, its tokenizer builds a RULER dataset.

A README line whose command or flag drifted from the CLI fails here (and in
test_readme_commands.py, which only parses); a line whose command breaks at run time fails here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from memagent_jax import cli
from test_readme_commands import COMMAND_LINES, LINES

HOTPOT = Path(__file__).parent / "data" / "hotpot_dev_distractor_60.json"


def fill(line: str, values: dict[str, list[str | tuple[str, ...]]]) -> list[str]:
    """A README line as argv: brackets dropped (every optional part kept), each metavariable
    replaced by the next of its values (the n-th DIR by values["DIR"][n]); a value is one
    argument, a tuple several (for "key=value ..." and "COMMAND ...")."""
    line = line.replace("[", " ").replace("]", " ")
    names = sorted(values, key=len, reverse=True)
    pattern = re.compile("|".join(rf"(?<![\w.-]){re.escape(n)}(?![\w-])" for n in names))
    used = {n: 0 for n in names}

    def sub(m: re.Match) -> str:
        name = m.group(0)
        options = values[name]
        if used[name] >= len(options):
            raise AssertionError(f"README line needs more values for {name!r} than the test has: {line}")
        used[name] += 1
        value = options[used[name] - 1]
        return shlex.join(value) if isinstance(value, tuple) else shlex.quote(value)

    argv = shlex.split(pattern.sub(sub, line))[1:]  # drop the program name
    unused = {n: values[n][used[n]:] for n in names if used[n] < len(values[n])}
    assert not unused, f"the README line no longer has {unused}: {line}"
    return argv


#: The model folder of the README's line that asks the demo's agent about the user's document.
DEMO_HF = "runs/demo/hf"


def readme_line(command: str) -> str:
    """The README's line of `command` (exactly one; for `answer`, the generic one)."""
    found = [ln for ln in COMMAND_LINES if shlex.split(ln)[1] == command and DEMO_HF not in ln]
    assert len(found) == 1, (command, COMMAND_LINES)
    return found[0]


def demo_answer_line() -> str:
    """The README's line that asks the demo's agent (`runs/demo/hf`) about a document."""
    found = [ln for ln in COMMAND_LINES if shlex.split(ln)[1] == "answer" and DEMO_HF in ln]
    assert len(found) == 1, COMMAND_LINES
    return found[0]


def needle_document(demo_dir: Path, multiple: int, seed: int) -> dict[str, Any]:
    """An unseen evaluation-style document of the demo run at `multiple` x its training length
    (the target needle and 1-3 distractor needles in essay text), written next to the run."""
    from memagent_jax.demo import load_demo_config
    from memagent_jax.demo import task as T
    from memagent_jax.tokenizer import load_tokenizer

    cfg, demo = load_demo_config(demo_dir / "config.yaml")
    tok = load_tokenizer(demo_dir / "hf")
    spec = T.NeedleSpec(chunk_size=cfg.agent.chunk_size, num_chunks=demo.train_chunks * multiple,
                        min_distractors=demo.min_distractors, max_distractors=demo.max_distractors,
                        num_keys=demo.num_keys, name="readme")
    sample = T.generate(spec, tok, 1, seed=seed)[0]
    sample["path"] = demo_dir / f"readme_doc_{multiple}x_{seed}.txt"
    sample["path"].write_text(sample["context"])
    return sample


def ask_demo_agent(demo_dir: Path, sample: dict[str, Any], capsys: Any) -> tuple[str, str]:
    """The README's demo-answer line on `sample`'s document, asking for its key: (stdout, stderr)."""
    line = demo_answer_line()
    readme_key = re.search(r"secret code for (\w+)\?", line).group(1)
    return run(fill(line, {DEMO_HF: [str(demo_dir / "hf")], "FILE": [str(sample["path"])],
                           readme_key: [sample["key"]]}), capsys)


def data_lines() -> dict[str, str]:
    lines = {shlex.split(ln)[2]: ln for ln in COMMAND_LINES if shlex.split(ln)[1] == "data"}
    assert set(lines) == {"ruler_hotpotqa", "ruler_synthetic"}, lines
    return lines


def run(argv: list[str], capsys: Any) -> tuple[str, str]:
    """cli.main in this process: (stdout, stderr); fails with the command's stderr unless it returns 0."""
    rc = cli.main(argv)
    out = capsys.readouterr()
    assert rc == 0, f"memagent-jax {shlex.join(argv)} returned {rc}:\n{out.err[-3000:]}"
    return out.out, out.err


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """`--ship-base` writes the package's shipped base: point it at a copy for this module."""
    import shutil

    from memagent_jax.demo import base

    saved = base.BASE_DIR
    copy = tmp_path_factory.mktemp("shipped") / "base"
    shutil.copytree(saved, copy)
    base.BASE_DIR = copy
    yield copy
    base.BASE_DIR = saved


@pytest.mark.slow  # ~100 s on 2 cores; tests/test_readme_commands.py parses every line in the default run
def test_every_readme_command_runs(tmp_path, capsys, base_dir):
    demo, train, ev, ans, exported = (tmp_path / n for n in ("demo", "train", "eval", "answer", "exported"))
    doc = tmp_path / "doc.txt"
    doc.write_text("The secret code is school7. " * 20)

    # demo: every stage of the micro config from scratch, shipping its base (to the test's copy)
    run(fill(readme_line("demo"), {"DIR": [str(demo)], "NAME": ["micro"], "TASK": ["needle"], "STAGE": ["report"],
                                   "key=value ...": ["demo.progress=false"]}), capsys)
    assert (demo / "summary.json").is_file() and (demo / "hf" / "model.safetensors").is_file()
    shipped = json.loads((base_dir / "provenance.json").read_text())
    assert shipped["command"].startswith(f"memagent-jax demo --out {demo} --config micro --from-scratch --ship-base")

    # train: the demo's RL stage as a plain train config, into a new run folder
    run(fill(readme_line("train"), {"CONFIG": [str(demo / "rl" / "train_config.yaml")],
                                    "key=value ...": [f"trainer.out_dir={train}"]}), capsys)
    assert (train / "metrics.jsonl").is_file()

    # export: that run's checkpoint -> an HF folder
    run(fill(readme_line("export"), {"RUN_DIR": [str(train)], "DIR": [str(exported)]}), capsys)
    assert (exported / "config.json").is_file() and (exported / "model.safetensors").is_file()

    # eval and answer: the exported policy (the model folder = DIR; the chunk fits its window)
    run(fill(readme_line("eval"), {"DIR": [str(exported), str(ev)], "T1,T2": ["niah_single_1,vt"],
                                   "L1,L2": ["96,192"], "N": ["1", "32"]}), capsys)
    assert (ev / "results.json").is_file() and (ev / "report.md").is_file()
    _, err = run(fill(readme_line("answer"), {"DIR": [str(exported)], "FILE": [str(doc)],
                                           "TEXT": ["What is the secret code for school?"],
                                           "NAME": ["overwrite"], "N": ["32"]}), capsys)
    assert "memory after chunk 1/" in err and "chunk 32 tokens (as given)" in err  # --show-memory, --chunk-size

    # the demo's agent on a document of one's own, 64x its training length: the agent settings come
    # from the exported folder (the micro demo's policy is too briefly trained to answer it right:
    # test_readme_demo_answer_line_answers_at_64x checks the answer with the real demo)
    sample = needle_document(demo, 64, seed=0)
    out, err = ask_demo_agent(demo, sample, capsys)
    assert (f"agent settings from {demo / 'hf' / 'memagent_agent.json'}: policy overwrite, chunk 32, memory 8, "
            "answer 16, question budget at least 64") in err
    assert "chunk 32 tokens (as trained)" in err and f"{2 * 64} chunks" in err
    assert len(out.splitlines()) == 1  # the answer line (this micro policy's answer: often empty)

    # data: both builders, from local inputs (the README's file name = the user's download)
    data = data_lines()
    run(fill(data["ruler_hotpotqa"], {"DIR": [str(tmp_path / "tfds")],
                                      "hotpot_dev_distractor_v1.json": [str(HOTPOT)]}), capsys)
    run(fill(data["ruler_synthetic"], {"DIR": [str(tmp_path / "tfds"), str(demo / "tokenizer")]}), capsys)
    built = {p.parents[2].name for p in (tmp_path / "tfds").rglob("dataset_info.json")}
    assert built == {"ruler_hotpotqa", "ruler_synthetic"}, built

    # plan: a shipped config on 8 devices, an override after the options
    out, _ = run(fill(readme_line("plan"), {"CONFIG": ["qwen2_5_7b_memagent"], "N": ["8"], "G": ["80"],
                                         "key=value ...": ["rl.kl_coef=0.001"]}), capsys)
    assert "GiB" in out

    # compile: a small policy for 4 TPU v5p chips, through the TPU compiler (skipped without libtpu)
    if importlib.util.find_spec("libtpu") is not None:
        small = ("model.path=", "model.vocab_size=1024", "model.hidden_size=512", "model.num_heads=4",
                 "model.num_kv_heads=4", "model.intermediate_size=512", "model.num_layers=1",
                 "model.dtype=bfloat16", "model.remat=full", "mesh.fsdp=2", "mesh.tensor=2",
                 "agent.chunk_size=256", "agent.max_memory_tokens=32", "agent.question_budget=32",
                 "agent.max_final_new_tokens=32", "rl.micro_batch_tokens=2048", "rl.gen_batch_size=2",
                 "rollout.group_size=2", "rl.train_batch_size=2", "rl.mini_batch_size=1")
        out, _ = run(fill(readme_line("compile"), {"CONFIG": ["memagent"], "T": ["v5p:2x2x1"],
                                                "key=value ...": [small]}), capsys)
        report = json.loads(out)
        assert report["ok"] and len(report["programs"]) == 6 and report["attention"] == "splash"

    # the global line: bad input is one line and exit 2; --debug raises with the traceback instead
    generic = LINES[0]
    assert "[--debug] COMMAND ..." in generic
    bad = ["plan", "memagent", "--devices", "8", "--hbm-gib", "80", "rl.no_such_key=1"]
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("memagent-jax plan: error:") and "Traceback" not in err
    with pytest.raises(Exception, match="no_such_key"):
        cli.main(fill(generic, {"COMMAND ...": [tuple(bad)]}))


@pytest.mark.slow
def test_readme_demo_answer_line_answers_at_64x(tmp_path, capsys, monkeypatch):
    """The README's line that asks the demo's agent about one's own document, on the default demo's
    fresh export (`memagent-jax demo` through its RL stage, about 2-3 minutes): right on unseen
    needle documents with distractors at 64x and 128x the training length."""
    from memagent_jax.demo import base

    # the package's shipped base, also when test_every_readme_command_runs pointed BASE_DIR at its copy
    monkeypatch.setattr(base, "BASE_DIR", Path(base.__file__).resolve().parent / "base")
    demo = tmp_path / "demo"
    run(["demo", "--out", str(demo), "--until", "rl", "demo.progress=false"], capsys)
    for multiple, seed in ((64, 0), (64, 1), (128, 2)):
        sample = needle_document(demo, multiple, seed)
        assert sample["distractor_keys"]
        out, err = ask_demo_agent(demo, sample, capsys)
        assert f"{3 * multiple} chunks" in err
        assert out.strip() == sample["value"], (multiple, seed, sample["key"], out, err[-2000:])
