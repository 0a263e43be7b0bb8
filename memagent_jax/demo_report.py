"""The demo's report: PNG plots (matplotlib Agg), report.md and summary.json of a run folder."""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any

POLICY_LABELS = {"rl": "RL (DAPO)", "warm_start": "warm start (SFT)", "no_document": "no document"}


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


def _plots(run: Any, results: dict[str, Any], rl_metrics: list[dict], sft_metrics: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if sft_metrics:
        axes[0].plot([m["step"] for m in sft_metrics], [m["loss"] for m in sft_metrics], lw=1)
    axes[0].set(title="warm start: SFT loss", xlabel="SFT step", ylabel="response NLL / token")
    steps = [m["step"] for m in rl_metrics]
    axes[1].plot(steps, [m.get("reward/mean", float("nan")) for m in rl_metrics], "o-", label="reward (kept groups)")
    axes[1].plot(steps, [m.get("accuracy/all_mean", float("nan")) for m in rl_metrics], "s-",
                 label="accuracy (all sampled)")
    axes[1].set(title="RL: reward and accuracy per step", xlabel="RL step", ylim=(-0.05, 1.05))
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(run.path("training_curves.png"), dpi=110)
    plt.close(fig)
    names.append("training_curves.png")

    mults = list(results["chunks"])
    xs = [int(k[:-1]) for k in mults]
    for metric, fname, ylabel, policies in (
            ("accuracy", "accuracy_vs_length.png", "accuracy (exact boxed answer)",
             ("rl", "warm_start", "no_document")),
            ("seconds_per_chunk", "seconds_per_chunk.png", "seconds per document-chunk",
             ("rl", "warm_start"))):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for p in policies:
            if p in results[metric]:
                ax.plot(xs, [results[metric][p][k] for k in mults], "o-", label=POLICY_LABELS[p])
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{m}x\n({results['chunks'][k]} ch)" for m, k in zip(xs, mults)])
        ax.set(xlabel="document length (multiple of the training length)", ylabel=ylabel)
        if metric == "accuracy":
            ax.set_ylim(-0.05, 1.05)
        else:
            ax.set_ylim(0, max(v for p in policies if p in results[metric]
                               for v in results[metric][p].values()) * 1.3)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run.path(fname), dpi=110)
        plt.close(fig)
        names.append(fname)
    return names


def _table(results: dict[str, Any], metric: str, fmt: str, policies: tuple[str, ...]) -> str:
    mults = list(results["chunks"])
    head = "| policy | " + " | ".join(f"{k} ({results['chunks'][k]} chunks)" for k in mults) + " |"
    rows = [head, "|---" * (len(mults) + 1) + "|"]
    for p in policies:
        if p in results[metric]:
            rows.append(f"| {POLICY_LABELS[p]} | " + " | ".join(fmt.format(results[metric][p][k])
                                                           for k in mults) + " |")
    return "\n".join(rows)


def _one_line(text: str, limit: int = 80) -> str:
    """`text` on one line for a Markdown code span (newlines shown as a return sign, backticks
    replaced, long text cut with an ellipsis)."""
    flat = text.replace("\n", "\u23ce").replace("`", "'")
    return flat if len(flat) <= limit else flat[:limit] + "\u2026"


def write_report(run: Any) -> dict[str, Any]:
    """Writes plots, report.md and summary.json into the run folder; returns a small info dict."""
    from memagent_jax.models import count_params
    from memagent_jax.policy import random_model_config

    results = json.loads(run.path("eval", "results.json").read_text())
    from memagent_jax.metrics import read_metrics

    rl_metrics, sft_metrics = read_metrics(run.path("rl")), read_metrics(run.path("sft"))
    plots = _plots(run, results, rl_metrics, sft_metrics)
    cfg, d, a = run.cfg, run.demo, run.cfg.agent
    seconds = run.stage_seconds()
    vocab = json.loads(run.done_file("tokenizer").read_text()).get("vocab_size", d.vocab_size)
    params = count_params(random_model_config(cfg, vocab))
    acc = {p: {k: round(v, 4) for k, v in by.items()} for p, by in results["accuracy"].items()}
    seen = results.get("accuracy_seen_keys", {})
    summary = {
        "accuracy": acc,
        "accuracy_seen_keys": {p: {k: round(v, 4) for k, v in by.items()} for p, by in seen.items()},
        "sub_em": {p: {k: round(v, 4) for k, v in by.items()} for p, by in results["sub_em"].items()},
        "seconds_per_chunk": {p: {k: round(v, 5) for k, v in by.items()}
                              for p, by in results["seconds_per_chunk"].items()},
        "train_length_chunks": d.train_chunks, "chunk_size": a.chunk_size,
        "eval_docs_per_length": results["docs"], "params": params,
        "wall_time_s": {**{k: round(v, 1) for k, v in seconds.items()},
                        "total": round(sum(seconds.values()), 1)},
        "machine": machine(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    run.path("summary.json").write_text(json.dumps(summary, indent=2))
    decoding = ("greedy" if results["temperature"] <= 0 else
                f"sampling (temperature {results['temperature']}, top-p {results['top_p']})")
    m1, mlast = next(iter(results["chunks"])), list(results["chunks"])[-1]
    rl_acc = results["accuracy"].get("rl", {})
    lines = [
        "# memagent-jax demo: a tiny memory agent, trained and evaluated on one CPU", "",
        f"{summary['date']} on {summary['machine']}.", "",
        "## Task", "",
        f"needle_kv: essay haystack, one target needle `The secret code is <key><value>.` (e.g. "
        f"`programming5G`) and {d.min_distractors}-{d.max_distractors} distractor needles with other "
        "keys; question `What is the secret code for <key>?`. Held-out keys (a hashed eighth of the "
        "tokenizer's whole-word essay pieces) and values (a hashed quarter of the 260 digit+letter "
        f"codes) never appear in training needles. Chunks of {a.chunk_size} tokens; training documents "
        f"have {d.train_chunks} chunks; the memory (the noted code, or `none`) is capped at "
        f"{a.max_memory_tokens} tokens and overwritten after every chunk. Policy: Qwen2 architecture, "
        f"{params:,} parameters (hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers, vocab "
        f"{vocab}), random init.",
        "",
        f"Warm start: {d.sft_steps} SFT steps x {d.sft_batch_size} teacher conversations from "
        f"{d.sft_docs} documents; a {d.careless:.0%} share of them written by a careless teacher that "
        f"notes the first code it sees, whatever its key. RL: {len(rl_metrics)} DAPO steps x "
        f"{cfg.rl.train_batch_size} groups x {cfg.rollout.group_size} "
        f"samples (dynamic sampling {'on' if cfg.rl.filter_groups else 'off'}, overlong shaping "
        f"{'on' if cfg.rl.overlong.enable else 'off'}, lr {cfg.optim.lr}). Evaluation: "
        f"{results['docs']} held-out documents per length, {decoding}.", "",
    ]
    stopped = json.loads(run.done_file("rl").read_text()).get("stopped_early", "")
    if stopped:
        lines += [f"RL stopped early: {stopped}", ""]
    lines += [
        "## Accuracy (exact boxed answer) vs document length", "",
        "Held-out keys and held-out codes:", "",
        _table(results, "accuracy", "{:.1%}", ("rl", "warm_start", "no_document")), "",
        f"RL vs warm start at the training length: {rl_acc.get(m1, 0) - results['accuracy']['warm_start'][m1]:+.1%}; "
        f"RL at {mlast} vs {m1}: {rl_acc.get(mlast, 0) - rl_acc.get(m1, 0):+.1%}.", "",
        "![accuracy vs length](accuracy_vs_length.png)", "",
    ]
    if seen:
        lines += [
            "Training keys with held-out codes, in unseen documents (what RL learns for the keys it "
            "trained on):", "",
            _table(results, "accuracy_seen_keys", "{:.1%}", ("rl", "warm_start")), "",
        ]
    lines += [
        "## Cost: seconds per document-chunk", "",
        _table(results, "seconds_per_chunk", "{:.4f}", ("rl", "warm_start")), "",
        "![seconds per chunk](seconds_per_chunk.png)", "",
        "## Training", "", "![training curves](training_curves.png)", "",
        "## Wall time per stage (seconds)", "",
        "| " + " | ".join(seconds) + " | total |", "|---" * (len(seconds) + 1) + "|",
        "| " + " | ".join(f"{v:.1f}" for v in seconds.values()) + f" | {sum(seconds.values()):.1f} |", "",
        "## What the RL policy's memory looks like", "",
    ]
    for key, traces in results["traces"].items():
        for t in traces[:1]:
            lines.append(f"- {key}: {t['question']} (answer {t['answer']}, needle in chunk "
                         f"{t['needle_chunk'] + 1}/{t['num_chunks']}, distractors {t['distractor_keys']})")
            for k, mem in t["memories"].items():
                lines.append(f"  - after chunk {int(k) + 1}: `{_one_line(mem)}`")
            lines.append(f"  - final answer: `{_one_line(t['final'])}`")
    lines += ["", "The exported RL policy (HF safetensors + tokenizer) is in `hf/`."]
    run.path("report.md").write_text("\n".join(lines) + "\n")
    return {"plots": plots}
