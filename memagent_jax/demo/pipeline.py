"""`memagent-jax demo`: the embedded default, end to end on one CPU, into ONE run folder.

Stages (each writes `<run>/<stage>/done.json` when complete and is skipped when that exists,
unless an earlier stage ran in this invocation; `--fresh` deletes the run folder first):

  tokenizer  SentencePiece on the essays + needle wording + the prompt templates
  data       needle documents measured in those tokens (demo/task.py): pretraining, SFT and RL
             sets at the training length, and unseen evaluation documents at each multiple
  pretrain   the base model: multi-query in-context lookup over whole documents (demo/pretrain.py)
  sft        teacher transcripts through the RL prompts -> warm start from the base (rl/sft.py);
             with model.lora.rank > 0 on adapters over the frozen base (merged into sft/hf,
             the PEFT adapter in sft/adapter), and the RL stage on fresh adapters over that
  rl         DAPO `Trainer` from the warm start (dynamic sampling, overlong shaping, orbax);
             resumes from its checkpoints; the final policy is exported to `<run>/hf`
  eval       RL policy, warm start, the base reading the whole document (full-context baseline)
             and a no-document baseline at 1x..64x the training length (demo/evaluation.py)
  report     report.md, PNG plots, summary.json (demo/report.py)

The config is a normal `Config` YAML (configs/tiny.yaml) plus a `demo:` section (`DemoSection`);
overrides `demo.key=value` go to the latter, all others to the former.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from memagent_jax.config import Config, save_config, to_dict
from memagent_jax.demo.run import STAGES, DemoSection, Run, agent_parts, load_demo_config, task_parts

__all__ = ["STAGES", "DemoSection", "Run", "agent_parts", "load_demo_config", "run_demo"]

def _bar(run: Run, total: int, desc: str, unit: str = "it") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not run.demo.progress, leave=True)


def rl_config(run: Run) -> Config:
    """The RL run's Config: the demo config pointed at the warm start, tokenizer and RL data."""
    cfg = dataclasses.replace(run.cfg)
    cfg.model = dataclasses.replace(cfg.model, path=str(run.path("sft", "hf")))
    cfg.tokenizer = str(run.path("tokenizer"))
    cfg.data = dataclasses.replace(cfg.data, source="jsonl", path=str(run.path("data", "rl.jsonl")),
                                   num_docs=run.demo.rl_docs)
    cfg.agent = dataclasses.replace(cfg.agent, max_chunks=max(run.demo.train_chunks, run.demo.rl_max_chunks))
    cfg.trainer = dataclasses.replace(cfg.trainer, out_dir=str(run.path("rl")),
                                      progress=run.demo.progress)
    return cfg


# ----------------------------------------------------------------------------------- stages


def stage_tokenizer(run: Run) -> dict[str, Any]:
    from memagent_jax.agent.prompts import templates_from_config
    from memagent_jax.demo import base
    from memagent_jax.demo.task import tokenizer_corpus
    from memagent_jax.chat_templates import PLAIN_TEMPLATE
    from memagent_jax.tokenizer import train_sentencepiece

    if not run.demo.from_scratch:
        return base.copy_tokenizer(run.path("tokenizer"))

    t = templates_from_config(run.cfg.agent)
    texts = tokenizer_corpus() + [t.memory_update, t.final, t.first_memory] * 20
    tok = train_sentencepiece(texts, run.path("tokenizer"), run.demo.vocab_size, chat_template=PLAIN_TEMPLATE)
    return {"vocab_size": tok.vocab_size}


def spec(run: Run, chunks: int, name: str, training: bool = True) -> Any:
    """The task's document spec at `chunks` chunks (`name` tags the documents' ids and seeds);
    training documents get up to `demo.max_decoys` plain-word key mentions, and RL documents
    `demo.rl_min_distractors` or more distractors."""
    from memagent_jax.demo.multivalue import MultiValueSpec
    from memagent_jax.demo.task import NeedleSpec

    d = run.demo
    least = d.rl_min_distractors if name == "rl" else d.min_distractors
    kwargs = dict(chunk_size=run.cfg.agent.chunk_size, num_chunks=chunks, min_distractors=least,
                  max_distractors=d.max_distractors, num_keys=d.num_keys, name=name,
                  max_decoys=d.max_decoys if training else 0)
    if d.task == "multivalue":
        return MultiValueSpec(**kwargs, min_values=d.min_values, max_values=d.max_values)
    return NeedleSpec(**kwargs)


def stage_data(run: Run) -> dict[str, Any]:
    from memagent_jax.demo import task as T
    from memagent_jax.tokenizer import load_tokenizer

    tok, d = load_tokenizer(run.path("tokenizer")), run.demo
    build, _ = task_parts(run)
    if d.sft_max_chunks < d.train_chunks:
        raise ValueError(f"demo.sft_max_chunks={d.sft_max_chunks} must be >= demo.train_chunks={d.train_chunks}")
    rng = np.random.default_rng([d.seed, 11])
    sft_lengths = rng.integers(d.train_chunks, d.sft_max_chunks + 1, size=d.sft_docs)
    train_jobs = [("sft", n, int((sft_lengths == n).sum()), d.seed) for n in range(d.train_chunks, d.sft_max_chunks + 1)]
    if d.rl_max_chunks > d.train_chunks:  # RL documents of several lengths (their own stream)
        rl_lengths = np.random.default_rng([d.seed, 12]).integers(d.train_chunks, d.rl_max_chunks + 1,
                                                                  size=d.rl_docs)
        if d.rl_short_share > 0:  # this share at the training length (1x), the rest spread out
            short = np.random.default_rng([d.seed, 13]).random(d.rl_docs) < d.rl_short_share
            rl_lengths[short] = d.train_chunks
        train_jobs += [("rl", n, int((rl_lengths == n).sum()), d.seed + 1)
                       for n in range(d.train_chunks, d.rl_max_chunks + 1)]
    else:
        train_jobs.append(("rl", d.train_chunks, d.rl_docs, d.seed + 1))
    eval_jobs = [(f"eval_{m}x", m) for m in d.eval_multiples]
    bar = _bar(run, d.sft_docs + d.rl_docs + d.eval_docs * len(eval_jobs), "data: documents", "doc")
    counts: dict[str, Any] = {}
    seen: set[tuple] = set()
    sets: dict[str, list] = {}
    for name, chunks, n, seed in train_jobs:
        samples = T.generate(spec(run, chunks, name), tok, n, seed=seed, progress=bar.update, build=build)
        seen |= {T.layout_key(s) for s in samples}
        sets.setdefault(name, []).extend(samples)
    for name, samples in sets.items():
        samples = [samples[i] for i in rng.permutation(len(samples))]
        T.write_jsonl(samples, run.path("data", f"{name}.jsonl"))
        counts[name] = {"docs": len(samples), "chunks": sorted({s["num_chunks"] for s in samples})}
    # Unseen documents: a separate random stream, and no needle layout of a training document.
    for name, m in eval_jobs:
        samples = T.generate(spec(run, d.train_chunks * m, "eval", training=False), tok, d.eval_docs, seed=d.seed + 2,
                             exclude=seen, progress=bar.update, build=build)
        T.write_jsonl(samples, run.path("data", f"{name}.jsonl"))
        counts[name] = {"docs": d.eval_docs, "chunks": d.train_chunks * m,
                        "tokens_mean": sum(s["num_tokens"] for s in samples) / max(1, len(samples))}
    bar.close()
    return {"sets": counts}


def _train(run: Run, stage: str, model: Any, examples: list, settings: Any, pad_id: int,
           first_step: int = 0, phase: str = "") -> tuple[Any, list[dict]]:
    """Supervised training with a progress bar and `<stage>/metrics.jsonl`: (model, history).
    A later phase of the same stage (`first_step` > 0) appends its steps after the earlier ones."""
    from memagent_jax.metrics import MetricsWriter
    from memagent_jax.rl.sft import train_sft

    if first_step == 0:
        run.path(stage, "metrics.jsonl").unlink(missing_ok=True)
    writer = MetricsWriter(run.path(stage), tensorboard=False)
    bar = _bar(run, settings.steps, f"{stage}{phase}: steps", "step")

    def on_step(step: int, m: dict[str, float]) -> None:
        writer.write(first_step + step, m)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}")

    model, history = train_sft(model, examples, settings, pad_id=pad_id, on_step=on_step)
    bar.close()
    writer.close()
    return model, history


def stage_pretrain(run: Run) -> dict[str, Any]:
    from memagent_jax.demo import base
    from memagent_jax.demo.pretrain import copy_corpus, lookup_corpus
    from memagent_jax.models import count_params, init_model
    from memagent_jax.policy import random_model_config
    from memagent_jax.rl.sft import SFTSettings
    from memagent_jax.tokenizer import load_tokenizer
    from memagent_jax.train_run import export_model

    if not run.demo.from_scratch:
        return base.copy_base(run.path("pretrain"))
    tok, d = load_tokenizer(run.path("tokenizer")), run.demo
    _, builder = agent_parts(run, tok, None)
    mcfg = random_model_config(run.cfg, tok.vocab_size)
    model = init_model(mcfg, seed=d.seed)
    copies = []
    if d.pretrain_copy_steps:  # phase 1: repeated random spans only, until induction heads form
        copies = copy_corpus(tok, d.pretrain_copy_steps * d.pretrain_batch_size, seed=d.seed + 4)
        settings = SFTSettings(steps=d.pretrain_copy_steps, batch_size=d.pretrain_batch_size, lr=d.pretrain_lr,
                               warmup_steps=20, seed=d.seed, pad_multiple=128)
        model, _ = _train(run, "pretrain", model, copies, settings, tok.pad_id, phase=" (copying)")
    examples = lookup_corpus(tok, builder, num_docs=d.pretrain_docs, chunk_size=run.cfg.agent.chunk_size,
                             max_chunks=d.pretrain_max_chunks, num_keys=d.num_keys, seed=d.seed + 3,
                             max_decoys=d.max_decoys, copy_share=d.pretrain_copy_share)
    settings = SFTSettings(steps=d.pretrain_steps, batch_size=d.pretrain_batch_size, lr=d.pretrain_lr,
                           warmup_steps=20, seed=d.seed, pad_multiple=128)
    model, history = _train(run, "pretrain", model, examples, settings, tok.pad_id,
                            first_step=d.pretrain_copy_steps, phase=" (lookup)" if copies else "")
    export_model(model, tok, run.path("pretrain", "hf"))
    examples = copies + examples
    return {"sequences": len(examples), "tokens": int(sum(len(e.tokens) for e in examples)),
            "params": count_params(mcfg), "final_loss": history[-1]["loss"]}


def stage_sft(run: Run) -> dict[str, Any]:
    from memagent_jax.demo.task import read_jsonl
    from memagent_jax.models import from_pretrained
    from memagent_jax.models.peft_adapter import save_adapter
    from memagent_jax.rl.sft import SFTSettings, teacher_transcripts
    from memagent_jax.tokenizer import load_tokenizer
    from memagent_jax.train_run import export_model, load_train_policy

    tok, d = load_tokenizer(run.path("tokenizer")), run.demo
    policy, builder = agent_parts(run, tok, d.sft_max_chunks)
    examples = teacher_transcripts(read_jsonl(run.path("data", "sft.jsonl")), policy=policy,
                                   builder=builder, tokenizer=tok, teacher=task_parts(run)[1])
    model = from_pretrained(run.path("pretrain", "hf"))
    lora = run.cfg.model.lora.rank > 0
    if lora:  # model.lora: adapters over the base frozen in model.dtype (train_run.py)
        model, _ = load_train_policy(run.cfg, seed=d.seed, model=model, tokenizer=tok)
    settings = SFTSettings(steps=d.sft_steps, batch_size=d.sft_batch_size, lr=d.sft_lr,
                           warmup_steps=d.sft_warmup_steps, seed=d.seed)
    model, history = _train(run, "sft", model, examples, settings, tok.pad_id)
    # the warm start is an agent of the same prompts and budgets (trained on up to sft_max_chunks);
    # with LoRA its folder holds the merged model (the RL stage puts fresh adapters on it) and
    # sft/adapter the PEFT adapter on the base
    export_model(model, tok, run.path("sft", "hf"),
                 agent=dataclasses.replace(run.cfg.agent, max_chunks=d.sft_max_chunks))
    if lora:
        save_adapter(model, run.path("sft", "adapter"), base_model=str(run.path("pretrain", "hf")))
    return {"examples": len(examples), "final_loss": history[-1]["loss"], "lora_rank": run.cfg.model.lora.rank}


def stage_rl(run: Run) -> dict[str, Any]:
    from memagent_jax.rl.trainer import DynamicSamplingError
    from memagent_jax.run_lock import run_folder_lock
    from memagent_jax.train_run import export_model, make_trainer

    cfg = rl_config(run)
    # The RL stage as a plain `memagent-jax train` config (e.g. for launch/local_multihost.sh).
    save_config(cfg, run.path("rl", "train_config.yaml"))
    with run_folder_lock(cfg.trainer.out_dir):  # also keeps a `train` of train_config.yaml out
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
            export_model(trainer.model(), trainer.tokenizer, run.path("hf"), agent=cfg.agent)
        finally:
            trainer.close()
    return {"rl_steps": trainer.rl_step, "stopped_early": stopped}


def stage_eval(run: Run) -> dict[str, Any]:
    from memagent_jax.demo.evaluation import evaluate_policies

    results = evaluate_policies(run)
    run.path("eval").mkdir(parents=True, exist_ok=True)
    run.path("eval", "results.json").write_text(json.dumps(results, indent=2))
    return {"policies": sorted(results["accuracy"])}


def stage_report(run: Run) -> dict[str, Any]:
    from memagent_jax.demo.report import write_report

    return write_report(run)


STAGE_FNS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "tokenizer": stage_tokenizer, "data": stage_data, "pretrain": stage_pretrain, "sft": stage_sft, "rl": stage_rl,
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
             overrides: list[str] | None = None, *, from_scratch: bool = False, ship_base: bool = False,
             until: str | None = None) -> dict[str, Any]:
    """Runs (or resumes) the stages into `out_dir`, up to and including `until` (default: all).

    `from_scratch` trains the tokenizer and the base model in the run instead of copying the
    shipped ones; `ship_base` (with it) then replaces the shipped base with this run's. Returns
    {"stages": {name: "ran"|"skipped"}, "summary": summary.json's content (None before report)}.
    """
    from rich.console import Console

    from memagent_jax.run_lock import run_folder_lock

    console = Console(stderr=True)
    if until is not None and until not in STAGES:
        raise ValueError(f"--until {until!r}: not a stage; stages are {', '.join(STAGES)}")
    if ship_base and not from_scratch:
        raise ValueError("--ship-base ships a base trained in this run: add --from-scratch")
    cfg, demo = load_demo_config(config, [*(overrides or []), *(["demo.from_scratch=true"] if from_scratch else [])])
    root = Path(out_dir)
    with run_folder_lock(root) as lock:  # one demo per run folder (run_lock.py)
        if fresh:  # everything but the lock this run holds
            for p in root.iterdir():
                if lock is None or p != lock.path:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return _run_stages(Run(root, cfg, demo), console, until=until, ship_base=ship_base,
                           command=shlex.join(["memagent-jax", "demo", "--out", str(out_dir),
                                               *(["--config", str(config)] if config else []),
                                               "--from-scratch", "--ship-base", *(overrides or [])]))


def _run_stages(run: Run, console: Any, *, until: str | None, ship_base: bool, command: str
                ) -> dict[str, Any]:
    """`run_demo`'s stages, while it holds the run folder's lock; `command`: the one that ships
    the base (its provenance)."""
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
        if stage == "pretrain" and ship_base:
            _ship(run, seconds, console, command)
        if stage == until:
            return {"stages": statuses, "summary": None}
    summary = json.loads(run.path("summary.json").read_text())
    seconds = run.stage_seconds()  # the report's own time is known only now
    summary["wall_time_s"] = {**{k: round(v, 1) for k, v in seconds.items()},
                              "total": round(sum(seconds.values()), 1)}
    run.path("summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"[bold green]demo finished:[/bold green] {run.path('report.md')}")
    return {"stages": statuses, "summary": summary}


def _ship(run: Run, seconds: float, console: Any, command: str) -> None:
    """Copies this run's tokenizer + base model into the package (memagent_jax/demo/base);
    `command` (the demo command that made them) goes into its provenance."""
    import datetime

    from memagent_jax.demo import base
    from memagent_jax.demo.report import machine

    info = {"command": command,
            "seed": run.demo.seed, "pretrain_wall_time_s": round(seconds, 1), "machine": machine(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "model": dataclasses.asdict(run.cfg.model),
            "pretrain": {k: v for k, v in dataclasses.asdict(run.demo).items()
                         if k.startswith("pretrain") or k in ("vocab_size", "num_keys", "seed")},
            **json.loads(run.done_file("pretrain").read_text())}
    console.print(f"    shipped the base model to {base.ship(run.root, info)}")
