"""`memagent-jax demo`: the embedded default, end to end on one CPU, into ONE run folder.

Stages (each writes `<run>/<stage>/done.json` when complete and is skipped when that exists,
unless an earlier stage ran in this invocation; `--fresh` deletes the run folder first):

  tokenizer  SentencePiece on the essays + training-split needles + the prompt templates
  data       needle_kv documents measured in those tokens: SFT and RL sets at the training
             length, held-out sets (disjoint keys and values) at each evaluation multiple, and
             seen-key sets (training keys, held-out values, unseen documents)
  sft        teacher transcripts through the RL prompts -> short supervised warm start (rl/sft.py)
  rl         DAPO `Trainer` from the warm start (dynamic sampling, overlong shaping, orbax);
             resumes from its checkpoints; the final policy is exported to `<run>/hf`
  eval       RL policy, warm start and a no-document baseline on the held-out sets at
             1x..32x the training length: accuracy and seconds per chunk
  report     report.md, PNG plots, summary.json (demo_report.py)

The config is a normal `Config` YAML (configs/tiny.yaml) plus a `demo:` section (`DemoSection`);
overrides `demo.key=value` go to the latter, all others to the former.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memagent_jax.config import Config, apply_overrides, from_dict, load_yaml, save_config, to_dict

STAGES = ("tokenizer", "data", "sft", "rl", "eval", "report")


@dataclasses.dataclass
class DemoSection:
    """Knobs of the demo that are not part of an RL run's `Config`."""

    seed: int = 0
    vocab_size: int = 1024  # SentencePiece vocabulary
    train_chunks: int = 3  # training length, in chunks of agent.chunk_size tokens
    min_distractors: int = 1
    max_distractors: int = 3
    careless: float = 0.5  # fraction of warm-start documents written by a careless teacher
    sft_docs: int = 400
    rl_docs: int = 400
    eval_docs: int = 48  # held-out documents per length
    eval_multiples: list = dataclasses.field(default_factory=lambda: [1, 4, 16, 32])
    eval_temperature: float = 0.0  # 0 = greedy
    eval_top_p: float = 1.0
    sft_steps: int = 300
    sft_batch_size: int = 16
    sft_lr: float = 5e-3
    sft_warmup_steps: int = 20
    progress: bool = True


def load_demo_config(config: str | Path | None = "tiny", overrides: list[str] | None = None
                     ) -> tuple[Config, DemoSection]:
    """(Config, DemoSection) from a YAML with a `demo:` section and `key=value` overrides."""
    data = load_yaml(config) if config else {}
    demo_data = dict(data.pop("demo", None) or {})
    rest, demo_over = [], []
    for o in overrides or []:
        (demo_over if o.strip().startswith("demo.") else rest).append(o)
    demo_data = apply_overrides({"demo": demo_data}, demo_over)["demo"]
    cfg = from_dict(Config, apply_overrides(data, rest))
    demo = from_dict(DemoSection, demo_data, prefix="demo.")
    if demo.eval_multiples != sorted(set(int(m) for m in demo.eval_multiples)) or demo.eval_multiples[0] < 1:
        raise ValueError(f"demo.eval_multiples must be increasing positive integers, got {demo.eval_multiples}")
    return cfg, demo


@dataclasses.dataclass
class Run:
    """A run folder and its resolved configuration."""

    root: Path
    cfg: Config
    demo: DemoSection

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def done_file(self, stage: str) -> Path:
        return self.path(stage, "done.json")

    def is_done(self, stage: str) -> bool:
        return self.done_file(stage).is_file()

    def mark_done(self, stage: str, seconds: float, info: dict[str, Any] | None = None) -> None:
        self.done_file(stage).parent.mkdir(parents=True, exist_ok=True)
        self.done_file(stage).write_text(json.dumps({"stage": stage, "seconds": seconds, **(info or {})},
                                                    indent=2))

    def stage_seconds(self) -> dict[str, float]:
        return {s: json.loads(self.done_file(s).read_text())["seconds"] for s in STAGES if self.is_done(s)}


def _bar(run: Run, total: int, desc: str, unit: str = "it") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not run.demo.progress, leave=True)


def rl_config(run: Run) -> Config:
    """The RL run's Config: the demo config pointed at the warm start, tokenizer and RL data."""
    cfg = dataclasses.replace(run.cfg)
    cfg.model = dataclasses.replace(cfg.model, path=str(run.path("sft", "hf")))
    cfg.tokenizer = str(run.path("tokenizer"))
    cfg.data = dataclasses.replace(cfg.data, source="needle_kv", path=str(run.path("data", "rl.jsonl")),
                                   num_docs=run.demo.rl_docs)
    cfg.agent = dataclasses.replace(cfg.agent, max_chunks=run.demo.train_chunks)
    cfg.trainer = dataclasses.replace(cfg.trainer, out_dir=str(run.path("rl")),
                                      progress=run.demo.progress)
    return cfg


# ----------------------------------------------------------------------------------- stages


def stage_tokenizer(run: Run) -> dict[str, Any]:
    from memagent_jax.agent.prompts import templates_from_config
    from memagent_jax.data.needle_kv import tokenizer_corpus
    from memagent_jax.tokenizer import train_sentencepiece

    t = templates_from_config(run.cfg.agent)
    texts = tokenizer_corpus() + [t.memory_update, t.final, t.first_memory] * 20
    tok = train_sentencepiece(texts, run.path("tokenizer"), run.demo.vocab_size)
    return {"vocab_size": tok.vocab_size}


def _spec(run: Run, chunks: int, split: str, key_split: str = "") -> Any:
    from memagent_jax.data.needle_kv import NeedleSpec

    return NeedleSpec(chunk_size=run.cfg.agent.chunk_size, num_chunks=chunks, split=split,
                      min_distractors=run.demo.min_distractors, max_distractors=run.demo.max_distractors,
                      key_split=key_split)


def stage_data(run: Run) -> dict[str, Any]:
    from memagent_jax.data import needle_kv as nk
    from memagent_jax.tokenizer import load_tokenizer

    tok, d = load_tokenizer(run.path("tokenizer")), run.demo
    jobs = [("sft", _spec(run, d.train_chunks, "train"), d.sft_docs, d.seed),
            ("rl", _spec(run, d.train_chunks, "train"), d.rl_docs, d.seed + 1)]
    jobs += [(f"eval_{m}x", _spec(run, d.train_chunks * m, "eval"), d.eval_docs, d.seed + 2)
             for m in d.eval_multiples]
    # Training keys with held-out codes, in unseen documents: what RL learns for the keys it saw.
    jobs += [(f"seen_keys_{m}x", _spec(run, d.train_chunks * m, "eval", "train"), d.eval_docs, d.seed + 3)
             for m in d.eval_multiples]
    bar = _bar(run, sum(j[2] for j in jobs), "data: documents", "doc")
    counts = {}
    for name, spec, n, seed in jobs:
        samples = nk.generate(spec, tok, n, seed=seed, progress=bar.update)
        nk.write_jsonl(samples, run.path("data", f"{name}.jsonl"))
        counts[name] = {"docs": n, "chunks": spec.num_chunks,
                        "tokens_mean": sum(s["num_tokens"] for s in samples) / max(1, n)}
    bar.close()
    return {"sets": counts}


def _agent(run: Run, tokenizer: Any, training_chunks: int | None) -> tuple[Any, Any]:
    from memagent_jax.agent.memory import make_policy
    from memagent_jax.agent.prompts import PromptBuilder, templates_from_config

    a = run.cfg.agent
    policy = make_policy("overwrite", chunk_size=a.chunk_size, max_chunks=training_chunks,
                         max_memory_tokens=a.max_memory_tokens)
    return policy, PromptBuilder(tokenizer, templates_from_config(a))


def stage_sft(run: Run) -> dict[str, Any]:
    from memagent_jax.data.needle_kv import NeedleTeacher, read_jsonl
    from memagent_jax.metrics import MetricsWriter
    from memagent_jax.models import count_params, init_model
    from memagent_jax.policy import random_model_config
    from memagent_jax.rl.sft import SFTSettings, teacher_transcripts, train_sft
    from memagent_jax.tokenizer import load_tokenizer
    from memagent_jax.train_run import export_model

    tok, d = load_tokenizer(run.path("tokenizer")), run.demo
    policy, builder = _agent(run, tok, d.train_chunks)
    examples = teacher_transcripts(read_jsonl(run.path("data", "sft.jsonl")), policy=policy,
                                   builder=builder, tokenizer=tok, teacher=NeedleTeacher(d.careless))
    mcfg = random_model_config(run.cfg, tok.vocab_size)
    model = init_model(mcfg, seed=d.seed)
    settings = SFTSettings(steps=d.sft_steps, batch_size=d.sft_batch_size, lr=d.sft_lr,
                           warmup_steps=d.sft_warmup_steps, seed=d.seed)
    writer = MetricsWriter(run.path("sft"), tensorboard=False)
    bar = _bar(run, d.sft_steps, "sft: steps", "step")

    def on_step(step: int, m: dict[str, float]) -> None:
        writer.write(step, m)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}")

    run.path("sft", "metrics.jsonl").unlink(missing_ok=True)
    model, history = train_sft(model, examples, settings, pad_id=tok.pad_id, on_step=on_step)
    bar.close()
    writer.close()
    export_model(model, tok, run.path("sft", "hf"))
    return {"examples": len(examples), "params": count_params(mcfg),
            "final_loss": history[-1]["loss"]}


def stage_rl(run: Run) -> dict[str, Any]:
    from memagent_jax.rl.trainer import DynamicSamplingError
    from memagent_jax.train_run import export_model, make_trainer

    cfg = rl_config(run)
    # The RL stage as a plain `memagent-jax train` config (e.g. for launch/local_multihost.sh).
    save_config(cfg, run.path("rl", "train_config.yaml"))
    trainer = make_trainer(cfg)
    stopped = ""
    try:
        try:
            status = trainer.run()
        except DynamicSamplingError as e:  # every group all-right or all-wrong: keep what we have
            warnings.warn(f"RL stopped after {trainer.rl_step} steps: {e}", stacklevel=1)
            status, stopped = "done", str(e)
        if status != "done":
            raise KeyboardInterrupt(f"RL interrupted at step {trainer.rl_step}; rerun the demo to resume")
        export_model(trainer.model(), trainer.tokenizer, run.path("hf"))
    finally:
        trainer.close()
    return {"rl_steps": trainer.rl_step, "stopped_early": stopped}


def stage_eval(run: Run) -> dict[str, Any]:
    from memagent_jax.demo_eval import evaluate_policies

    results = evaluate_policies(run)
    run.path("eval").mkdir(parents=True, exist_ok=True)
    run.path("eval", "results.json").write_text(json.dumps(results, indent=2))
    return {"policies": sorted(results["accuracy"])}


def stage_report(run: Run) -> dict[str, Any]:
    from memagent_jax.demo_report import write_report

    return write_report(run)


STAGE_FNS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "tokenizer": stage_tokenizer, "data": stage_data, "sft": stage_sft, "rl": stage_rl,
    "eval": stage_eval, "report": stage_report,
}


# ----------------------------------------------------------------------------------- driver


def _check_config(run: Run) -> None:
    """Saves the resolved config; warns when a resumed run folder was made with another one."""
    path = run.path("config.yaml")
    current = {**to_dict(run.cfg), "demo": dataclasses.asdict(run.demo)}
    if path.is_file():
        import yaml

        old = yaml.safe_load(path.read_text()) or {}
        changed = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
        if changed:
            warnings.warn(f"{run.root} was made with a different config (sections {changed}); "
                          "finished stages are kept. Use --fresh to start over.", stacklevel=3)
    run.root.mkdir(parents=True, exist_ok=True)
    save_config(run.cfg, path)
    with path.open("a") as f:
        import yaml

        f.write(yaml.safe_dump({"demo": dataclasses.asdict(run.demo)}, sort_keys=False))


def run_demo(out_dir: str | Path = "runs/demo", fresh: bool = False, config: str | Path | None = "tiny",
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Runs (or resumes) every stage into `out_dir`. Returns {"stages": {name: "ran"|"skipped"},
    "summary": summary.json's content}."""
    from rich.console import Console

    console = Console(stderr=True)
    cfg, demo = load_demo_config(config, overrides)
    root = Path(out_dir)
    if fresh and root.exists():
        shutil.rmtree(root)
    run = Run(root, cfg, demo)
    _check_config(run)
    statuses: dict[str, str] = {}
    upstream_ran = False
    for i, stage in enumerate(STAGES, 1):
        if run.is_done(stage) and not upstream_ran:
            secs = run.stage_seconds()[stage]
            console.print(f"[dim][{i}/{len(STAGES)}] {stage}: skipped (done in {secs:.1f}s; "
                          f"{run.done_file(stage)})[/dim]")
            statuses[stage] = "skipped"
            continue
        console.print(f"[bold][{i}/{len(STAGES)}] {stage}[/bold]")
        run.done_file(stage).unlink(missing_ok=True)
        t0 = time.perf_counter()
        info = STAGE_FNS[stage](run)
        seconds = time.perf_counter() - t0
        run.mark_done(stage, seconds, info)
        console.print(f"    {stage} done in {seconds:.1f}s")
        statuses[stage] = "ran"
        upstream_ran = True
    summary = json.loads(run.path("summary.json").read_text())
    seconds = run.stage_seconds()  # the report's own time is known only now
    summary["wall_time_s"] = {**{k: round(v, 1) for k, v in seconds.items()},
                              "total": round(sum(seconds.values()), 1)}
    run.path("summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"[bold green]demo finished:[/bold green] {run.path('report.md')}")
    return {"stages": statuses, "summary": summary}
