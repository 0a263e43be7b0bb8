"""Evaluation: accuracy of the memory agent (and baselines) vs document length.

`evaluate` runs every *cell* (task, length, policy). Tasks are the RULER synthetic tasks (length =
context tokens of the tokenizer) and "hotpotqa" (RULER-HotpotQA; length = number of documents N).
Each cell generates `num_samples` deterministic samples (`seed`), runs the agent with
`rollout(..., training=False, group_size=1)` in batches, extracts the answer (boxed, else "the
answer is ...", else the raw text) and scores it with the task's metric (sub_em for QA,
string_match_all for RULER), reported as a percentage.

The `full_context` baseline puts the whole document in one prompt. Where that prompt plus the
answer budget does not fit `max_context_tokens` (default: the model's position range), the default
(`full_context_overflow="truncate"`) center-truncates the document to the tokens the window leaves
(head and tail kept, as MemAgent's and RULER's baselines do) and records `truncated_to` and
`truncated_share` in the cell; `"na"` records the cell as N/A instead, as in the paper's table.

Results are written after every cell to out_dir/results.json (settings, then every cell with its
per-sample records), results.csv and report.md; a rerun with the same settings skips finished
cells, so a killed evaluation resumes where it stopped. The PNGs (accuracy_vs_length.png,
heatmap.png) are drawn at the end (`eval_report.write_outputs` redraws everything from results.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from memagent_jax.agent.memory import FullContextPolicy, MemoryPolicy, make_policy
from memagent_jax.agent.prompts import PromptBuilder, builder_from_config
from memagent_jax.agent.rollout import GenerateFn, engine_generate_fn, rollout, sampler_generate_fn
from memagent_jax.agent.window import default_budget, engine_max_len, fit_window
from memagent_jax.config import AgentSection
from memagent_jax.data import hotpotqa, ruler_synthetic
from memagent_jax.eval_report import (CSV_FIELDS, PLOTS, REPORT_MD, RESULTS_CSV, RESULTS_JSON, load_results,
                                      render_report, write_outputs)
from memagent_jax.plots import format_length
from memagent_jax.rl.rewards import answer_is_extract, boxed_answer, string_match_all, sub_em
from memagent_jax.seeds import derive

logger = logging.getLogger(__name__)
__all__ = ["CSV_FIELDS", "PLOTS", "REPORT_MD", "RESULTS_CSV", "RESULTS_JSON", "load_results", "render_report",
           "write_outputs", "evaluate", "run_eval_cli", "add_eval_arguments", "task_samples", "cell_key",
           "extract_answer", "parse_lengths", "fit_agent_to_window", "KNOWN_TASKS", "HOTPOTQA"]

HOTPOTQA = "hotpotqa"
KNOWN_TASKS: tuple[str, ...] = (*ruler_synthetic.TASKS, HOTPOTQA)
METRICS: dict[str, Callable[[str | None, Sequence[str]], float]] = {
    "sub_em": sub_em, "string_match_all": string_match_all}
DEFAULT_WINDOW = 8192  # full_context window when neither max_context_tokens nor a model gives one


def metric_name(task: str) -> str:
    """The task's scoring metric: "sub_em" (hotpotqa, qa_1) or "string_match_all"."""
    return "sub_em" if task == HOTPOTQA else ruler_synthetic.metric_for(task)


def length_unit(task: str) -> str:
    """What a length means for the task: "docs" (hotpotqa) or "tokens" (RULER)."""
    return "docs" if task == HOTPOTQA else "tokens"


def extract_answer(text: str | None) -> str:
    """The answer in a final reply: last \\boxed{}, else text after "the answer is", else the text."""
    text = text or ""
    for found in (boxed_answer(text), answer_is_extract(text)):
        if found is not None:
            return found
    return text.strip()


def cell_key(task: str, length: int, policy: str) -> str:
    """Key of a cell in results.json["cells"]."""
    return f"{task}/{int(length)}/{policy}"


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    """`tasks` as a list; ValueError naming the known tasks when one is unknown or none is given."""
    unknown = [t for t in tasks if t not in KNOWN_TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {unknown or '(none given)'}; known tasks: {', '.join(KNOWN_TASKS)}")
    return list(tasks)


def task_samples(task: str, length: int, num_samples: int, tokenizer: Any, *, seed: int = 0,
                 hotpotqa_items: Sequence[dict[str, Any]] | str | os.PathLike[str] | None = None,
                 squad_path: str | None = None) -> list[dict[str, Any]]:
    """The deterministic samples of one (task, length): dicts with question, context, answers.

    hotpotqa uses the first `num_samples` questions of `hotpotqa_items` (a path or loaded items)
    with `length` documents each; RULER tasks are generated to `length` tokens of `tokenizer`.
    """
    if task == HOTPOTQA:
        if hotpotqa_items is None:
            raise ValueError("task 'hotpotqa' needs a local HotpotQA distractor-format file: pass "
                             "hotpotqa_path= (CLI: --hotpotqa PATH, e.g. hotpot_dev_distractor_v1.json)")
        source = hotpotqa.generate(hotpotqa_items, int(length), seed=seed, max_questions=num_samples)
        samples = [source[i] for i in range(len(source))]
        if len(samples) < num_samples:
            logger.warning("hotpotqa: only %d questions available (asked for %d)", len(samples), num_samples)
        return samples
    _check_tasks([task])
    return ruler_synthetic.generate_many(task, int(length), tokenizer, num_samples, seed=seed,
                                         squad_path=squad_path)


def _policy_for(name: str, agent: Any, main: bool, doc_budget: int | None = None) -> MemoryPolicy:
    """A policy by name; overwrite gets the agent's chunk and memory sizes; full_context
    center-truncates documents to `doc_budget` tokens (None: never truncates)."""
    if name == "full_context":
        return FullContextPolicy(max_context_tokens=doc_budget or 1 << 62)
    kwargs: dict[str, Any] = {}
    if name == "overwrite":
        kwargs = dict(chunk_size=agent.chunk_size, max_chunks=None, max_memory_tokens=agent.max_memory_tokens)
    if main:
        kwargs.update(getattr(agent, "policy_kwargs", None) or {})
    return make_policy(name, **kwargs)


FULL_CONTEXT_OVERFLOW = ("truncate", "na")


def _model_generate_fn(model: Any, tokenizer: Any, builder: PromptBuilder, agent: Any, policy: str, *,
                       engine: str, slots: int, window: int) -> GenerateFn:
    """The sampler on `model` for one policy's cells: the continuous-batching engine (KV cache
    bounded by the overwrite agent's budgets; other policies get the model's window) or static."""
    if engine == "static":
        return sampler_generate_fn(model, tokenizer)
    positions = model.config.max_position_embeddings
    if policy == "overwrite":
        max_len = engine_max_len(builder, positions, question_budget=agent.question_budget,
                                 memory_tokens=agent.max_memory_tokens, chunk_size=agent.chunk_size,
                                 answer_tokens=agent.max_final_new_tokens)
    else:
        max_len = min(window, positions)
    return engine_generate_fn(model, tokenizer, slots=slots, max_len=max_len)


def _fit_check(samples: Sequence[Mapping[str, Any]], tokenizer: Any, builder: PromptBuilder,
               final_tokens: int, window: int, question_budget: int | None = None
               ) -> tuple[str | None, int, float]:
    """The full-context baseline against `window`: (reason the prompts do not fit or None, the
    document tokens the window leaves beside the longest question, template and answer budget,
    the share of samples whose document is longer than that)."""
    longest, overhead, doc_lens = 0, 0, []
    for s in samples:
        q = tokenizer.encode(s["question"])
        q = q[:question_budget] if question_budget else q
        doc = tokenizer.encode(s["context"])
        frame = len(builder.final_prompt(q, [])) + final_tokens
        overhead, longest = max(overhead, frame), max(longest, frame + len(doc))
        doc_lens.append(len(doc))
    budget = window - overhead
    share = sum(n > budget for n in doc_lens) / max(1, len(doc_lens))
    if longest > window:
        return f"prompt + answer budget is {longest} tokens, over max_context_tokens={window}", budget, share
    return None, budget, share


def _run_cell(samples: Sequence[dict[str, Any]], policy: MemoryPolicy, *, builder: PromptBuilder,
              tokenizer: Any, generate_fn: GenerateFn, gen: dict[str, Any], batch_size: int,
              metric: str, question_budget: int | None) -> dict[str, Any]:
    """Run one policy over the samples in batches; per-sample records and the cell summary."""
    score_fn = METRICS[metric]
    records: list[dict[str, Any]] = []
    seconds = 0.0
    for b, start in enumerate(range(0, len(samples), batch_size)):
        batch = list(samples[start:start + batch_size])
        t0 = time.perf_counter()
        res = rollout(batch, policy=policy, builder=builder, tokenizer=tokenizer, generate_fn=generate_fn,
                      group_size=1, training=False, question_budget=question_budget,
                      gen_kwargs={**gen, "seed": derive(gen["seed"], b)})  # batch b's stream
        dt = time.perf_counter() - t0
        seconds += dt
        for s, t, doc_tokens in zip(batch, res.trajectories, res.stats["doc_tokens"]):
            final = res.conversations[t.conversation_ids[-1]]
            pred = extract_answer(t.answer_text)
            records.append({
                "id": s.get("id", str(len(records))), "question": s["question"], "answers": list(s["answers"]),
                "prediction": pred, "response": t.answer_text, "score": float(score_fn(pred, s["answers"])),
                "chunks": int(t.num_chunks), "doc_tokens": int(doc_tokens), "seconds": dt / len(batch),
                "finish_reason": final.finish_reason, "memory_capped_turns": int(t.memory_capped_turns),
                "final_memory": t.memories[-1] if t.memories else None,
            })
    n = max(1, len(records))
    mean = {k: sum(r[k] for r in records) / n for k in ("score", "chunks", "doc_tokens")}
    return {"status": "ok", "n": len(records), "seconds": seconds, "accuracy": 100.0 * mean["score"],
            "seconds_per_sample": seconds / n, "chunks_mean": mean["chunks"], "doc_tokens_mean": mean["doc_tokens"],
            "samples": records}


# ----------------------------------------------------------------------------- evaluate


def evaluate(
    model: Any,
    tokenizer: Any,
    *,
    tasks: Sequence[str],
    lengths: Sequence[int],
    num_samples: int,
    out_dir: str | os.PathLike[str],
    agent: AgentSection | Mapping[str, Any] | None = None,
    temperature: float = 0.7,
    top_p: float = 0.95,
    top_k: int = 0,
    seed: int = 0,
    baselines: Sequence[str] = ("full_context",),
    max_context_tokens: int | None = None,
    hotpotqa_path: str | os.PathLike[str] | None = None,
    squad_path: str | os.PathLike[str] | None = None,
    generate_fn: GenerateFn | None = None,
    batch_size: int = 16,
    meta: Mapping[str, Any] | None = None,
    progress: bool = True,
    full_context_overflow: str = "truncate",
    engine: str = "continuous",
) -> dict[str, Any]:
    """Evaluate `agent.policy` and `baselines` on tasks x lengths; returns the results dict.

    `agent` is an AgentSection (or a dict of its fields): policy, chunk_size, max_memory_tokens
    (also the memory turn's generation budget), max_final_new_tokens, final_style, templates and
    question_budget. `generate_fn` defaults to the real sampler on `model`: the continuous-batching
    engine (`engine="continuous"`, `batch_size` slots) or one batched call per turn ("static"). `meta` (e.g. the model
    path) is stored in results.json. `full_context_overflow`: "truncate" (center-truncate documents
    longer than the window leaves) or "na" (record those cells as N/A). Raises ValueError when
    out_dir holds results of other settings.
    """
    if full_context_overflow not in FULL_CONTEXT_OVERFLOW:
        raise ValueError(f"full_context_overflow must be one of {FULL_CONTEXT_OVERFLOW}, "
                         f"got {full_context_overflow!r}")
    if agent is None:
        agent = AgentSection()
    elif isinstance(agent, Mapping):
        agent = AgentSection(**agent)
    tasks, lengths = _check_tasks(tasks), [int(n) for n in lengths]
    if not lengths or min(lengths) < 1 or num_samples < 1 or batch_size < 1:
        raise ValueError(f"need lengths >= 1, num_samples >= 1 and batch_size >= 1 "
                         f"(got lengths={lengths}, num_samples={num_samples}, batch_size={batch_size})")
    if HOTPOTQA in tasks and hotpotqa_path is None:
        raise ValueError("task 'hotpotqa' needs hotpotqa_path: a local HotpotQA distractor-format JSON "
                         "file (CLI: --hotpotqa PATH, e.g. hotpot_dev_distractor_v1.json)")
    if "qa_1" in tasks and squad_path is None:
        raise ValueError("task 'qa_1' needs squad_path: a local SQuAD v1.1 JSON file (CLI: --squad PATH)")
    policies = list(dict.fromkeys([agent.policy, *baselines]))
    for name in policies:
        _policy_for(name, agent, name == agent.policy)  # fail fast on a bad name or setting
    if engine not in ("continuous", "static"):
        raise ValueError(f"engine must be 'continuous' or 'static', got {engine!r}")
    if generate_fn is None and model is None:
        raise ValueError("evaluate needs a model or a generate_fn")
    window = max_context_tokens or getattr(getattr(model, "config", None), "max_position_embeddings", None) \
        or DEFAULT_WINDOW
    settings = json.loads(json.dumps({
        "num_samples": num_samples, "temperature": temperature, "top_p": top_p, "top_k": top_k,
        "seed": seed, "agent": dataclasses.asdict(agent), "max_context_tokens": window,
        "full_context_overflow": full_context_overflow,
        "hotpotqa_path": os.fspath(hotpotqa_path) if hotpotqa_path else None,
        "squad_path": os.fspath(squad_path) if squad_path else None, "meta": dict(meta or {})}))
    results = load_results(out_dir) or {"version": 1, "settings": settings, "cells": {}}
    changed = sorted(k for k in settings if results["settings"].get(k) != settings[k])
    if changed:
        raise ValueError(f"{Path(out_dir) / RESULTS_JSON} holds results of different settings "
                         f"({', '.join(changed)}); use another out_dir or delete it to start over")
    results["settings"]["baselines"] = list(dict.fromkeys([*results["settings"].get("baselines", []),
                                                           *[b for b in baselines if b != agent.policy]]))

    builder = builder_from_config(tokenizer, agent)
    model_window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if model_window and agent.policy != "full_context":  # fail before any cell, naming the settings
        fit_window(builder, model_window, question_budget=agent.question_budget,
                   memory_tokens=agent.max_memory_tokens, answer_tokens=agent.max_final_new_tokens,
                   chunk_size=agent.chunk_size)
    gen = dict(max_memory_new_tokens=agent.max_memory_tokens, max_final_new_tokens=agent.max_final_new_tokens,
               temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    generate_fns = {name: generate_fn or _model_generate_fn(model, tokenizer, builder, agent, name, engine=engine,
                                                            slots=batch_size, window=window)
                    for name in policies}
    items = hotpotqa.load_hotpotqa(hotpotqa_path) if HOTPOTQA in tasks else None
    todo = [(t, n, p) for t in tasks for n in lengths for p in policies]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), initial=sum(cell_key(*c) in results["cells"] for c in todo), unit="cell",
               desc="eval", disable=not progress, dynamic_ncols=True)
    cache: dict[tuple[str, int], list[dict[str, Any]]] = {}
    task_t0: dict[str, float] = {}
    task_done: dict[str, int] = {}
    try:
        for task, n, name in todo:
            key, where = cell_key(task, n, name), f"{task} @ {format_length(n, length_unit(task))} [{name}]"
            if key in results["cells"]:
                continue
            t0, did = task_t0.setdefault(task, time.perf_counter()), task_done.get(task, 0)
            left = sum(cell_key(*c) not in results["cells"] for c in todo if c[0] == task)
            eta = f"{(time.perf_counter() - t0) / did * left:.0f}s" if did else "?"
            bar.set_postfix_str(f"{where}; {task}: {time.perf_counter() - t0:.0f}s elapsed, ETA {eta}")
            if (task, n) not in cache:  # the same samples for every policy of this (task, length)
                cache = {(task, n): task_samples(task, n, num_samples, tokenizer, seed=seed, hotpotqa_items=items,
                                                 squad_path=os.fspath(squad_path) if squad_path else None)}
            samples = cache[(task, n)]
            reason, doc_budget, share = _fit_check(samples, tokenizer, builder, agent.max_final_new_tokens,
                                                   window, agent.question_budget) \
                if name == "full_context" else (None, None, 0.0)
            if reason is not None and (full_context_overflow == "na" or doc_budget < 1):
                if doc_budget is not None and doc_budget < 1:
                    reason += "; the template, question and answer budget alone fill the window"
                cell = {"status": "n/a", "reason": reason, "accuracy": None, "n": len(samples), "seconds": 0.0,
                        "seconds_per_sample": None, "chunks_mean": None, "doc_tokens_mean": None, "samples": []}
            else:
                truncate = reason is not None
                cell = _run_cell(samples, _policy_for(name, agent, name == agent.policy,
                                                      doc_budget if truncate else None),
                                 builder=builder, tokenizer=tokenizer, generate_fn=generate_fns[name], gen=gen,
                                 batch_size=batch_size, metric=metric_name(task),
                                 question_budget=agent.question_budget)
                if truncate:
                    cell.update(truncated_to=doc_budget, truncated_share=share)
            results["cells"][key] = {"task": task, "length": n, "policy": name, "unit": length_unit(task),
                                     "metric": metric_name(task), **cell}
            write_outputs(results, out_dir, plots=False)
            task_done[task] = did + 1
            acc = "N/A" if cell["accuracy"] is None else f"{cell['accuracy']:.1f}%"
            line = f"{where}: {acc} (n={cell['n']}, {cell['seconds_per_sample'] or 0:.2f} s/sample)"
            (bar.write if progress else logger.info)(line)
            bar.update(1)
    finally:
        bar.close()
        write_outputs(results, out_dir, plots=True)
    return results


# ----------------------------------------------------------------------------- command line


def parse_lengths(text: str) -> list[int]:
    """"8K,16K,1M" or "50,100" -> ints (K = 1024, M = 1024 * 1024)."""
    out = []
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        scale = {"k": 1 << 10, "m": 1 << 20}.get(part[-1].lower(), 1)
        number = part[:-1] if scale > 1 else part
        try:
            out.append(int(round(float(number) * scale)))
        except ValueError as e:
            raise ValueError(f"bad length {part!r} in --lengths {text!r}: want e.g. 8K,16K or 50,100") from e
        if out[-1] < 1:
            raise ValueError(f"bad length {part!r} in --lengths {text!r}: lengths are positive "
                             "(tokens for RULER tasks, documents for hotpotqa), e.g. 8K,16K or 50,100")
    if not out:
        raise ValueError(f"--lengths {text!r} names no length")
    return out


def _names(text: str) -> list[str]:
    return [p.strip() for p in str(text).split(",") if p.strip() and p.strip().lower() != "none"]


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `memagent-jax eval` options to `parser` (see `run_eval_cli`)."""
    from memagent_jax.checks import non_negative_float, non_negative_int, positive_int, probability

    a = parser.add_argument
    a("--model", required=True, help="HF model directory (config.json, safetensors, tokenizer files)")
    a("--tasks", required=True, help=f"comma-separated tasks: {', '.join(KNOWN_TASKS)}")
    a("--lengths", required=True,
      help="comma-separated lengths: tokens for RULER tasks (8K = 8192), documents for hotpotqa (50,100)")
    a("--num-samples", type=positive_int, default=128, help="samples per (task, length) (default 128)")
    a("--out", required=True, help="output folder; rerunning with the same settings resumes")
    a("--temperature", type=non_negative_float, default=0.7, help="0 = greedy (default 0.7)")
    a("--top-p", type=probability, default=0.95, help="in (0, 1]; 1 = off (default 0.95)")
    a("--top-k", type=non_negative_int, default=0, help="0 = off (default)")
    a("--seed", type=int, default=0)
    # Agent settings: a flag left out takes the model folder's (memagent_agent.json), else the default.
    a("--policy", default=None,
      help="memory policy name or module.path:ClassName (default: the model folder's, else overwrite)")
    a("--chunk-size", type=positive_int, default=None,
      help="tokens per chunk (overwrite policy; default: the folder's trained chunk, else the largest "
           "that fits the model's window)")
    a("--max-memory-tokens", type=positive_int, default=None,
      help="memory size = memory-turn generation budget (default: the folder's, else 1024, or window/8 "
           "if smaller)")
    a("--max-final-new-tokens", type=positive_int, default=None,
      help="answer generation budget (default: the folder's, else 1024, or window/8 if smaller)")
    a("--final-style", default=None, choices=["boxed", "answer_is"],
      help="final prompt (default: the folder's, else boxed)")
    a("--question-budget", type=positive_int, default=None,
      help="tokens kept for the question (default: the folder's, else 1024, or window/8 if smaller)")
    a("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
      help="let a Qwen3 model think (default: the folder's, else non-thinking prompts); thinking is never "
           "kept in the memory")
    a("--hotpotqa", default=None, help="HotpotQA distractor-format JSON (required for task hotpotqa)")
    a("--squad", default=None, help="SQuAD v1.1 JSON (required for task qa_1)")
    a("--baselines", default="full_context", help="comma-separated baseline policies ('none' for none)")
    a("--max-context-tokens", type=positive_int, default=None,
      help="full_context window (prompt + answer); default: the model's max_position_embeddings")
    a("--full-context-overflow", default="truncate", choices=list(FULL_CONTEXT_OVERFLOW),
      help="documents longer than the full_context window: center-truncate them (default) or mark the cell N/A")
    a("--batch-size", type=positive_int, default=16, help="documents per rollout batch (= engine slots)")
    a("--engine", default="continuous", choices=["continuous", "static"],
      help="continuous batching (default) or one batched sampler call per memory turn")
    a("--dtype", default="float32", help="weight dtype (float32, bfloat16)")
    a("--no-progress", action="store_true", help="no progress bar")
    return parser


#: The `eval` flags that set each budget (named in window-fit errors).
EVAL_FLAGS = {"chunk_size": "--chunk-size", "question_budget": "--question-budget",
              "memory_tokens": "--max-memory-tokens", "answer_tokens": "--max-final-new-tokens"}
#: The `eval` flag of each agent setting (named in the settings line on stderr).
EVAL_SETTING_FLAGS = {"policy": "--policy", "chunk_size": "--chunk-size", "max_memory_tokens": "--max-memory-tokens",
                      "max_final_new_tokens": "--max-final-new-tokens", "question_budget": "--question-budget",
                      "final_style": "--final-style", "enable_thinking": "--enable-thinking"}


def fit_agent_to_window(args: argparse.Namespace, tokenizer: Any, window: int, *,
                        source: str | None = None) -> AgentSection:
    """The AgentSection of the `eval` flags over the model folder's saved agent settings
    (`memagent_agent.json`, one stderr line names what came from it), with budgets set by neither
    fitted to the model's window; a saved question budget is a lower bound (a longer question
    of a task is read whole).

    Question, memory and answer budgets default to 1024 (or window/8 if smaller); the chunk to the
    largest that fits with them (printed on stderr). A --chunk-size that does not fit is an
    InputError naming the flags; settings far from the saved ones give one warning.
    """
    from memagent_jax.agent.cli_settings import folder_settings, warn_far_from_training

    settings = folder_settings(args.model, dict(
        policy=args.policy, chunk_size=args.chunk_size, max_memory_tokens=args.max_memory_tokens,
        max_final_new_tokens=args.max_final_new_tokens, question_budget=args.question_budget,
        final_style=args.final_style, enable_thinking=args.enable_thinking))
    line = settings.summary(EVAL_SETTING_FLAGS)
    if line:
        print(line, file=sys.stderr)
    budget = default_budget(window)
    agent = dataclasses.replace(settings.agent, max_memory_tokens=settings.max_memory_tokens or budget,
                                max_final_new_tokens=settings.max_final_new_tokens or budget,
                                question_budget=args.question_budget or max(settings.question_budget or 0, budget))
    if agent.policy == "full_context":
        agent = dataclasses.replace(agent, chunk_size=settings.chunk_size or agent.chunk_size)
    else:
        fit = fit_window(builder_from_config(tokenizer, agent), window, question_budget=agent.question_budget,
                         memory_tokens=agent.max_memory_tokens, answer_tokens=agent.max_final_new_tokens,
                         chunk_size=settings.chunk_size, names=EVAL_FLAGS, source=source)
        trained = args.chunk_size is None and settings.chunk_size is not None
        print(fit.summary("as trained" if trained else None), file=sys.stderr)
        agent = dataclasses.replace(agent, chunk_size=fit.chunk_size)
    warn_far_from_training(settings, agent)
    return agent


def run_eval_cli(args: argparse.Namespace) -> dict[str, Any]:
    """`memagent-jax eval`: load the model and tokenizer from args.model, evaluate, print the report."""
    from memagent_jax.models.model_config import dtype_from_name
    from memagent_jax.run_lock import run_folder_lock

    tasks, lengths, dtype = _check_tasks(_names(args.tasks)), parse_lengths(args.lengths), dtype_from_name(args.dtype)
    with run_folder_lock(args.out):  # one evaluation per --out folder (run_lock.py)
        return _run_eval_locked(args, tasks, lengths, dtype)


def _run_eval_locked(args: argparse.Namespace, tasks: list[str], lengths: list[int], dtype: Any
                     ) -> dict[str, Any]:
    """`run_eval_cli` while it holds the --out folder's lock."""
    from memagent_jax.checks import load_checked

    model, tokenizer = load_checked(args.model, dtype=dtype)  # files are checked before the weights load
    agent = fit_agent_to_window(args, tokenizer, model.config.max_position_embeddings,
                                source=str(Path(args.model) / "config.json"))
    results = evaluate(model, tokenizer, tasks=tasks, lengths=lengths, num_samples=args.num_samples,
                       out_dir=args.out, agent=agent, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, seed=args.seed, baselines=_names(args.baselines),
                       max_context_tokens=args.max_context_tokens, hotpotqa_path=args.hotpotqa,
                       squad_path=args.squad, batch_size=args.batch_size,
                       meta={"model": os.path.abspath(args.model)}, progress=not args.no_progress,
                       full_context_overflow=args.full_context_overflow, engine=args.engine)
    print(render_report(results))
    print(f"results: {Path(args.out).resolve()} ({RESULTS_JSON}, {RESULTS_CSV}, {REPORT_MD}, {', '.join(PLOTS)})")
    return results
