"""The demo's evaluation: unseen documents at multiples of the training length.

Policies, each on the same documents of every length (`<run>/data/eval_<m>x.jsonl`):

- `rl`: the RL policy (`<run>/hf`) as a memory agent (`rollout(..., training=False)`: every chunk
  is read, no training cap);
- `warm_start`: the SFT policy (`<run>/sft/hf`), the same way;
- `full_context`: the base model (`<run>/pretrain/hf`) answering from the whole document in one
  prompt, center-truncated to `demo.context_window` tokens (MemAgent's Figure 1 baseline);
- `no_document`: the RL policy with an EMPTY context (zero memory turns): chance level.

Decoding is the demo's eval sampling (greedy by default). Accuracy = `rl.rewards.verify` (exact
match of the boxed answer, the training reward), with a 95% Wilson interval; sub_em of the boxed
answer is recorded too. Seconds per chunk = rollout wall time / (documents x chunks per document),
measured after an untimed warm-up so compilation is excluded.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np

from memagent_jax.config import turn_rows
from memagent_jax.rl import rewards as R


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (well behaved at 0 and 1)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At p = 0 or 1 a bound equals p exactly; rounding must not put p outside its own interval.
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def compared_name(policy: str) -> str:
    """The row suffix of a compared memory policy: its registered name, or the class name of a
    "module.path:ClassName" (e.g. "append", "MyPolicy")."""
    return policy.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def _score(result: Any) -> dict[str, Any]:
    """accuracy, its 95% interval, sub_em, digit F1 (the multi-value task's partial credit) and
    the count of right answers of a rollout."""
    from memagent_jax.demo.multivalue import digit_f1

    acc = [R.verify(t.answer_text, t.ground_truths) for t in result.trajectories]
    sub = [R.sub_em(R.boxed_answer(t.answer_text), t.ground_truths) for t in result.trajectories]
    f1 = [digit_f1(t.answer_text, t.ground_truths[0]) for t in result.trajectories]
    right = int(round(sum(acc)))
    return {"accuracy": float(np.mean(acc)), "interval": list(wilson_interval(right, len(acc))),
            "sub_em": float(np.mean(sub)), "digit_f1": float(np.mean(f1)), "right": right}


def _trace(result: Any, samples: list[dict], n: int = 2, keep: int = 6) -> list[dict[str, Any]]:
    """Memory after each chunk (first `keep` turns, the needle's turn, the last) of n documents."""
    out = []
    for t, s in zip(result.trajectories[:n], samples[:n]):
        facts = s.get("value_chunks", [s["needle_chunk"]])  # the chunks that hold the answer
        turns = sorted({*range(min(keep, len(t.memories))), *facts, len(t.memories) - 1})
        out.append({"question": s["question"], "answer": s["answers"][0], "needle_chunk": s["needle_chunk"],
                    "value_chunks": facts,
                    "num_chunks": t.num_chunks, "distractor_keys": s.get("distractor_keys", []),
                    "memories": {int(k): t.memories[k] for k in turns if 0 <= k < len(t.memories)},
                    "final": t.answer_text})
    return out


def evaluate_policies(run: Any) -> dict[str, Any]:
    """{metric: {policy: {"<m>x": value}}} for accuracy, interval, sub_em, seconds, seconds_per_chunk;
    plus chunks / tokens per length, the right-needle chance level, traces and the setup."""
    from tqdm.auto import tqdm

    from memagent_jax.agent.memory import make_policy
    from memagent_jax.agent.rollout import engine_generate_fn, rollout, sampler_generate_fn
    from memagent_jax.demo.run import agent_parts
    from memagent_jax.demo.task import read_jsonl
    from memagent_jax.models import from_pretrained
    from memagent_jax.tokenizer import load_tokenizer

    d, a = run.demo, run.cfg.agent
    tok = load_tokenizer(run.path("tokenizer"))
    overwrite, builder = agent_parts(run, tok, None)
    full = make_policy("full_context", max_context_tokens=d.context_window)
    sets = {f"{m}x": read_jsonl(run.path("data", f"eval_{m}x.jsonl")) for m in d.eval_multiples}
    gen_kwargs = dict(max_memory_new_tokens=a.max_memory_tokens,
                      max_final_new_tokens=a.max_final_new_tokens, seed=d.seed)
    out: dict[str, Any] = {
        "accuracy": {}, "interval": {}, "sub_em": {}, "digit_f1": {}, "seconds": {}, "seconds_per_chunk": {},
        "chunks": {k: v[0]["num_chunks"] for k, v in sets.items()},
        "tokens": {k: float(np.mean([s["num_tokens"] for s in v])) for k, v in sets.items()},
        "needle_chance": {k: float(np.mean([1 / len(s["needles"]) for s in v])) for k, v in sets.items()},
        "docs": d.eval_docs, "temperature": d.eval_temperature, "top_p": d.eval_top_p,
        "context_window": d.context_window, "traces": {}}

    def run_set(gen: Any, policy: Any, samples: list[dict], progress: bool) -> tuple[Any, float]:
        def on_step(k: int, n: int, trajs: list) -> None:
            if progress:
                bar.update(sum(1 for t in trajs if k < t.num_chunks))

        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the no-document baseline's empty contexts
            res = rollout(samples, policy=policy, builder=builder, tokenizer=tok, generate_fn=gen,
                          group_size=1, training=False, gen_kwargs=gen_kwargs,
                          question_budget=a.question_budget, on_step=on_step)
        return res, time.perf_counter() - t0

    def record(name: str, key: str, res: Any, seconds: float) -> None:
        score = _score(res)
        chunks = sum(max(1, t.num_chunks) for t in res.trajectories)
        for metric, value in (("accuracy", score["accuracy"]), ("interval", score["interval"]),
                              ("sub_em", score["sub_em"]), ("digit_f1", score["digit_f1"]),
                              ("seconds", seconds),
                              ("seconds_per_chunk", seconds / chunks)):
            out[metric].setdefault(name, {})[key] = value

    first = next(iter(sets))
    evaluated = [("rl", run.path("hf"), overwrite), ("warm_start", run.path("sft", "hf"), overwrite),
                 ("full_context", run.path("pretrain", "hf"), full)]
    for name in d.compare_policies:  # memory policies compared: the same models, another policy
        other = make_policy(name, chunk_size=a.chunk_size, max_chunks=None,
                            max_memory_tokens=a.max_memory_tokens)
        short = compared_name(name)
        evaluated[-1:-1] = [(f"rl_{short}", run.path("hf"), other),
                            (f"warm_start_{short}", run.path("sft", "hf"), other)]
    total = sum(len(v) * v[0]["num_chunks"] for v in sets.values()) * sum(
        p is not full for _, _, p in evaluated)
    bar = tqdm(total=total, desc="eval: document-chunks", unit="chunk", disable=not d.progress)
    for name, path, policy in evaluated:
        model = from_pretrained(path)
        if run.cfg.rollout.engine == "continuous":  # the config's rollout engine, as the RL stage
            gen = engine_generate_fn(model, tok, slots=turn_rows(run.cfg),
                                     max_len=model.config.max_position_embeddings,
                                     temperature=d.eval_temperature, top_p=d.eval_top_p)
        else:
            gen = sampler_generate_fn(model, tok, temperature=d.eval_temperature, top_p=d.eval_top_p,
                                      max_prompt_len=model.config.max_position_embeddings)
        run_set(gen, policy, sets[first][:8], progress=False)  # untimed: compiles the programs
        for key, samples in sets.items():
            res, seconds = run_set(gen, policy, samples, progress=policy is not full)
            record(name, key, res, seconds)
            if name == "rl" or name == "warm_start" or name.startswith("rl_"):
                out["traces"].setdefault(name, {})[key] = _trace(res, samples)
        if name == "rl":  # the same policy without the document
            for key, samples in sets.items():
                res, seconds = run_set(gen, policy, [dict(s, context="") for s in samples], progress=False)
                record("no_document", key, res, seconds)
        bar.set_postfix({f"{name}@{k}": f"{v:.2f}" for k, v in out["accuracy"][name].items()})
    bar.close()
    return out
