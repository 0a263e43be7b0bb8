"""The demo's report: PNG plots (matplotlib Agg), report.md and summary.json of a run folder."""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any

import numpy as np

POLICY_LABELS = {"rl": "RL (DAPO)", "warm_start": "warm start (SFT)",
                 "full_context": "full context (base, window)", "no_document": "no document"}


def label(policy: str) -> str:
    """A row's label: the fixed ones, or "RL model, <name> memory" for compared memory policies."""
    if policy in POLICY_LABELS:
        return POLICY_LABELS[policy]
    for prefix, model in (("warm_start_", "warm-start"), ("rl_", "RL")):
        if policy.startswith(prefix):
            return f"{model} model, {policy[len(prefix):]} memory"
    return policy


def policies(results: dict[str, Any]) -> tuple[str, ...]:
    """The evaluated rows in report order: RL, warm start, compared memory policies, baselines."""
    names = list(results["accuracy"])
    compared = [p for p in names if p not in POLICY_LABELS]
    return tuple(p for p in ("rl", "warm_start", *compared, "full_context", "no_document") if p in names)


def machine() -> str:
    """A one-line description of this machine (CPU, cores, JAX backend)."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"jax {jax.__version__} on {jax.default_backend()}")


def _plots(run: Any, results: dict[str, Any], curves: dict[str, list[dict]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))

    def curve(ax: Any, xs: list, ys: list, label: str | None = None) -> None:
        """Raw values faint, a 25-step moving average on top."""
        line, = ax.plot(xs, ys, lw=0.6, alpha=0.35)
        k = min(25, len(ys))
        if k:
            avg = np.convolve(np.asarray(ys, float), np.ones(k) / k, mode="valid")
            ax.plot(xs[k - 1:], avg, lw=1.6, color=line.get_color(), label=label)

    for ax, stage, title in ((axes[0], "pretrain", "base: lookup pretraining loss"),
                             (axes[1], "sft", "warm start: SFT loss")):
        m = curves.get(stage, [])
        if m:
            curve(ax, [x["step"] for x in m], [x["loss"] for x in m])
        ax.set(title=title, xlabel="step", ylabel="trained-token NLL", yscale="log")
    rl = curves.get("rl", [])
    steps = [m["step"] for m in rl]
    curve(axes[2], steps, [m.get("reward/mean", float("nan")) for m in rl], "reward (kept groups)")
    curve(axes[2], steps, [m.get("accuracy/all_mean", float("nan")) for m in rl], "accuracy (all sampled, T=1)")
    axes[2].set(title="RL: reward and accuracy per step", xlabel="RL step", ylim=(-0.05, 1.05))
    axes[2].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(run.path("training_curves.png"), dpi=110)
    plt.close(fig)
    names.append("training_curves.png")

    mults = list(results["chunks"])
    xs = [int(k[:-1]) for k in mults]
    for metric, fname, ylabel, rows in (
            ("accuracy", "accuracy_vs_length.png", "accuracy (exact boxed answer)", policies(results)),
            ("seconds_per_chunk", "seconds_per_chunk.png", "seconds per document-chunk", ("rl", "warm_start"))):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for p in rows:
            if p not in results[metric]:
                continue
            ys = [results[metric][p][k] for k in mults]
            if metric == "accuracy":
                lo = [max(0.0, y - results["interval"][p][k][0]) for y, k in zip(ys, mults)]
                hi = [max(0.0, results["interval"][p][k][1] - y) for y, k in zip(ys, mults)]
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=3, label=label(p))
            else:
                ax.plot(xs, ys, "o-", label=label(p))
        if metric == "accuracy" and run.demo.task == "needle":
            ax.plot(xs, [1 / 10] * len(xs), ":", color="grey", label="chance (1 of 10 digits)")
        if metric == "accuracy":
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{results['docs']} unseen documents per length, 95% intervals", fontsize=9)
        else:
            ax.set_ylim(0, max(v for p in rows if p in results[metric]
                               for v in results[metric][p].values()) * 1.3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{m}x\n({results['chunks'][k]} ch)" for m, k in zip(xs, mults)])
        ax.set(xlabel="document length (multiple of the training length)", ylabel=ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run.path(fname), dpi=110)
        plt.close(fig)
        names.append(fname)
    return names


def _table(results: dict[str, Any], metric: str, policies: tuple[str, ...]) -> str:
    mults = list(results["chunks"])
    head = "| policy | " + " | ".join(f"{k} ({results['chunks'][k]} chunks)" for k in mults) + " |"
    rows = [head, "|---" * (len(mults) + 1) + "|"]
    for p in policies:
        if p not in results[metric]:
            continue
        if metric == "accuracy":
            cells = [f"{results[metric][p][k]:.1%} [{results['interval'][p][k][0]:.1%}, "
                     f"{results['interval'][p][k][1]:.1%}]" for k in mults]
        elif metric == "digit_f1":
            cells = [f"{results[metric][p][k]:.3f}" for k in mults]
        else:
            cells = [f"{results[metric][p][k]:.4f}" for k in mults]
        rows.append(f"| {label(p)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def targets(results: dict[str, Any], task: str = "needle") -> dict[str, Any]:
    """The demo's targets, read off the evaluation.

    needle: RL vs warm start at 1x (+10 points or >= 95%, with non-overlapping 95% intervals), RL
    at 32x and longer within 5 points of 1x, the no-document baseline at chance (its interval
    reaches 10%, or it is below). multivalue: RL vs warm start at 1x +15 points with intervals
    apart, RL at 16x and 32x within 10 points of its 1x, and some pair of memory policies 10 or
    more points apart at some length with intervals apart."""
    acc, iv = results["accuracy"], results["interval"]
    mults = list(results["chunks"])
    m1 = mults[0]
    multi = task == "multivalue"
    out: dict[str, Any] = {}
    if "rl" in acc and "warm_start" in acc:
        gain = acc["rl"][m1] - acc["warm_start"][m1]
        apart = iv["rl"][m1][0] > iv["warm_start"][m1][1]
        enough = gain >= 0.15 if multi else (gain >= 0.10 or acc["rl"][m1] >= 0.95)
        out["rl_vs_warm_start_1x"] = {"gain": round(gain, 4), "intervals_apart": apart,
                                      "met": enough and apart}
        for k in mults[1:]:
            m = int(k[:-1])
            if (multi and m in (16, 32)) or (not multi and m >= 32):
                drop = acc["rl"][m1] - acc["rl"][k]
                out[f"rl_{k}_vs_1x"] = {"drop": round(drop, 4), "met": drop <= (0.10 if multi else 0.05)}
    if multi:
        memory = [p for p in acc if p not in ("full_context", "no_document")]
        best = {"gap": 0.0, "met": False}
        for i, p in enumerate(memory):
            for q in memory[i + 1:]:
                for k in mults:
                    hi, lo = (p, q) if acc[p][k] >= acc[q][k] else (q, p)
                    gap = acc[hi][k] - acc[lo][k]
                    met = gap >= 0.10 and iv[hi][k][0] > iv[lo][k][1]
                    if (met, gap) > (best["met"], best["gap"]):
                        best = {"pair": f"{hi} > {lo}", "length": k, "gap": round(gap, 4), "met": met}
        out["memory_policies_differ"] = best
    if "no_document" in acc:
        out["no_document_at_chance"] = {"max": max(acc["no_document"].values()),
                                        "met": all(iv["no_document"][k][0] <= 0.10 for k in mults)}
    return out


def _one_line(text: str, limit: int = 80) -> str:
    """`text` on one line for a Markdown code span (newlines shown as a return sign, backticks
    replaced, long text cut with an ellipsis)."""
    flat = text.replace("\n", "\u23ce").replace("`", "'")
    return flat if len(flat) <= limit else flat[:limit] + "\u2026"


def _task_text(run: Any, params: int, vocab: int) -> str:
    """The report's task paragraph."""
    cfg, d, a = run.cfg, run.demo, run.cfg.agent
    model = (f"Policy: Qwen2 architecture, {params:,} parameters (hidden {cfg.model.hidden_size}, "
             f"{cfg.model.num_layers} layers, vocab {vocab}), random init.")
    unseen = ("the evaluation documents are unseen (a separate random stream, and no needle layout "
              "of a training document).")
    if d.task == "multivalue":
        return (f"Essay haystack in which the question's key has {d.min_values}-{d.max_values} needles "
                "`The secret code is <key><digit>.`, each in its own chunk, beside "
                f"{d.min_distractors}-{d.max_distractors} distractor needles with other keys; question "
                "`What are all the secret codes for <key>?`; the answer is the digits in document "
                "order, boxed, and only the whole set in order scores (digit F1 gives partial "
                f"credit). {d.num_keys} keys, distinct digits; {unseen} The memory is a list of "
                f"`<key><digit>` notes (or `none`) capped at {a.max_memory_tokens} tokens: room for "
                f"{a.max_memory_tokens // 2} notes, so keeping every value fits and noting every "
                f"needle does not. It is rewritten after each {a.chunk_size}-token chunk (overwrite) "
                "or added to (append); warm-start documents have "
                f"{d.train_chunks}-{d.sft_max_chunks} chunks, RL documents "
                f"{d.train_chunks}-{max(d.train_chunks, d.rl_max_chunks)}"
                + (f" ({d.rl_short_share:.0%} of them at {d.train_chunks})" if d.rl_short_share else "")
                + f" (1x = {d.train_chunks}). {model}")
    return ("Essay haystack with one target needle `The secret code is <key><digit>.` (e.g. `school7`) and "
            f"{d.min_distractors}-{d.max_distractors} distractor needles with other keys; question `What is "
            f"the secret code for <key>?`; {d.num_keys} keys, values 0-9 (chance 10%). Every (key, value) pair "
            f"occurs in training; {unseen} The memory note is `<key><digit>` or `none`, capped at "
            f"{a.max_memory_tokens} tokens and overwritten after each {a.chunk_size}-token chunk; training "
            f"documents have {d.train_chunks} chunks. {model}")


def write_report(run: Any) -> dict[str, Any]:
    """Writes plots, report.md and summary.json into the run folder; returns a small info dict."""
    from memagent_jax.metrics import read_metrics
    from memagent_jax.models import count_params
    from memagent_jax.policy import random_model_config

    results = json.loads(run.path("eval", "results.json").read_text())
    curves = {stage: read_metrics(run.path(stage)) for stage in ("pretrain", "sft", "rl")}
    plots = _plots(run, results, curves)
    cfg, d, a = run.cfg, run.demo, run.cfg.agent
    seconds = run.stage_seconds()
    vocab = json.loads(run.done_file("tokenizer").read_text()).get("vocab_size", d.vocab_size)
    params = count_params(random_model_config(cfg, vocab))
    mults = list(results["chunks"])
    m1, mlast = mults[0], mults[-1]
    met = targets(results, d.task)
    rnd = {p: {k: round(v, 4) for k, v in by.items()} for p, by in results["accuracy"].items()}
    summary = {
        "accuracy": rnd,
        "interval_95": {p: {k: [round(x, 4) for x in v] for k, v in by.items()}
                        for p, by in results["interval"].items()},
        "sub_em": {p: {k: round(v, 4) for k, v in by.items()} for p, by in results["sub_em"].items()},
        "digit_f1": {p: {k: round(v, 4) for k, v in by.items()}
                     for p, by in results.get("digit_f1", {}).items()},
        "task": d.task,
        "seconds_per_chunk": {p: {k: round(v, 5) for k, v in by.items()}
                              for p, by in results["seconds_per_chunk"].items()},
        "needle_chance": {k: round(v, 4) for k, v in results["needle_chance"].items()},
        "targets": met,
        "train_length_chunks": d.train_chunks, "chunk_size": a.chunk_size,
        "eval_docs_per_length": results["docs"], "params": params,
        "wall_time_s": {**{k: round(v, 1) for k, v in seconds.items()},
                        "total": round(sum(seconds.values()), 1)},
        "machine": machine(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    run.path("summary.json").write_text(json.dumps(summary, indent=2))
    decoding = ("greedy" if results["temperature"] <= 0 else
                f"sampling (temperature {results['temperature']}, top-p {results['top_p']})")
    acc = results["accuracy"]
    stopped = json.loads(run.done_file("rl").read_text()).get("stopped_early", "")
    pre_done = json.loads(run.done_file("pretrain").read_text())
    pre = pre_done.get("provenance", pre_done)  # the shipped base's own record, or this run's
    copy_steps = pre.get("pretrain", {}).get("pretrain_copy_steps",
                                             0 if "provenance" in pre_done else d.pretrain_copy_steps)
    lines = [
        "# memagent-jax demo: a tiny memory agent, trained and evaluated on one CPU", "",
        f"{summary['date']} on {summary['machine']}.", "",
        "## Task", "", _task_text(run, params, vocab), "",
        "## Stages", "",
        f"1. Base model{' (shipped: ' + pre_done['source'] + ', made ' + str(pre.get('date')) + ' in ' + str(pre.get('pretrain_wall_time_s')) + ' s by `' + str(pre.get('command')) + '`)' if 'provenance' in pre_done else ''}: "
        + (f"{copy_steps} steps x {pre.get('pretrain', {}).get('pretrain_batch_size', d.pretrain_batch_size)} "
           "repeated random spans only (induction heads), then " if copy_steps else "")
        + f"{pre.get('pretrain', {}).get('pretrain_steps', d.pretrain_steps)} steps x "
        f"{pre.get('pretrain', {}).get('pretrain_batch_size', d.pretrain_batch_size)} lookup sequences "
        f"({pre.get('sequences', '?')} sequences, {pre.get('tokens', 0):,} tokens: documents of 1-"
        f"{pre.get('pretrain', {}).get('pretrain_max_chunks', d.pretrain_max_chunks)} chunks with every needle "
        "asked, the document in the answer prompt as the full-context baseline reads it, and repeated "
        "random spans).",
        f"2. Warm start: {d.sft_steps} SFT steps x {d.sft_batch_size} teacher conversations of the memory "
        f"workflow from {d.sft_docs} documents; {d.careless:.0%} of them by a careless teacher that "
        + ("keeps only the latest value it saw (each new one overwrites the note)." if d.task == "multivalue"
           else "notes the first needle it sees, whatever its key."),
        f"3. RL: {len(curves['rl'])} DAPO steps x {cfg.rl.train_batch_size} groups x "
        f"{cfg.rollout.group_size} samples (dynamic sampling {'on' if cfg.rl.filter_groups else 'off'}, "
        f"overlong shaping {'on' if cfg.rl.overlong.enable else 'off'}, lr {cfg.optim.lr}).",
        f"4. Evaluation: {results['docs']} unseen documents per length, {decoding}; the full-context "
        f"baseline reads {results['context_window']} document tokens (center-truncated).", "",
    ]
    if stopped:
        lines += [f"RL stopped early: {stopped}", ""]
    lines += [
        "## Accuracy (exact boxed answer, 95% Wilson interval) vs document length", "",
        _table(results, "accuracy", policies(results)), "",
        "![accuracy vs length](accuracy_vs_length.png)", "",
        *(["Digit F1 (the boxed digits against the answer's, as multisets: partial credit):", "",
           _table(results, "digit_f1", policies(results)), ""] if d.task == "multivalue" else []),
        "Targets:", "",
    ]
    for name, t in met.items():
        lines.append(f"- {name}: {'met' if t['met'] else 'NOT met'} "
                     f"({', '.join(f'{k} {v}' for k, v in t.items() if k != 'met')})")
    if "full_context" in acc:
        lines += ["", f"Base model lookup (full context at {m1}, right needle): {acc['full_context'][m1]:.1%} "
                  f"vs {results['needle_chance'][m1]:.1%} for a random needle of the document."]
    lines += [
        "", "## Cost: seconds per document-chunk", "",
        _table(results, "seconds_per_chunk", ("rl", "warm_start")), "",
        f"RL at {mlast} vs {m1}: {results['seconds_per_chunk']['rl'][mlast] / results['seconds_per_chunk']['rl'][m1]:.2f}x "
        "the time per chunk (linear cost in document length).", "",
        "![seconds per chunk](seconds_per_chunk.png)", "",
        "## Training", "", "![training curves](training_curves.png)", "",
        *(["RL ran with rollout.mode: async: the rollout and update lanes of its last steps "
           "(rl/timeline.jsonl):", "", "![async RL lanes](rl/timeline.png)", ""]
          if run.path("rl", "timeline.png").is_file() else []),
        "## Wall time per stage (seconds)", "",
        "| " + " | ".join(seconds) + " | total |", "|---" * (len(seconds) + 1) + "|",
        "| " + " | ".join(f"{v:.1f}" for v in seconds.values()) + f" | {sum(seconds.values()):.1f} |", "",
        "## What the memory looks like (first document of each length)",
    ]
    for policy, by_length in results["traces"].items():
        lines += ["", f"### {label(policy)}", ""]
        for key, traces in by_length.items():
            for t in traces[:1]:
                where = ", ".join(str(c + 1) for c in t.get("value_chunks", [t["needle_chunk"]]))
                lines.append(f"- {key}: {t['question']} (answer {t['answer']}, in chunk(s) {where} of "
                             f"{t['num_chunks']}, distractors {t['distractor_keys']})")
                for k, mem in t["memories"].items():
                    lines.append(f"  - after chunk {int(k) + 1}: `{_one_line(mem)}`")
                lines.append(f"  - final answer: `{_one_line(t['final'])}`")
    lines += ["", "The exported RL policy (HF safetensors + tokenizer) is in `hf/`; the base model in "
              "`pretrain/hf/`, the warm start in `sft/hf/`."]
    run.path("report.md").write_text("\n".join(lines) + "\n")
    return {"plots": plots}
