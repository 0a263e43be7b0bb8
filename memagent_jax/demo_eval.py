"""The demo's evaluation: held-out needle_kv documents at multiples of the training length.

For each policy (the RL policy `<run>/hf`, the warm start `<run>/sft/hf`) and each length, one
`rollout(..., training=False)` over all documents (every chunk is read; no training cap), decoded
with the demo's eval sampling (greedy by default). The no-document baseline runs the RL policy
on the same questions with an EMPTY context: zero memory turns, the answer comes from the first
memory alone. Accuracy = `rl.rewards.verify` (exact match of the boxed answer, the training
reward); sub_em of the boxed answer is recorded too. Seconds per chunk = rollout wall time /
(documents x chunks per document), measured after an untimed warm-up so compilation is excluded.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from memagent_jax.rl import rewards as R


def _score(result: Any) -> tuple[float, float]:
    """(accuracy, sub_em) of a rollout's final answers, both in [0, 1]."""
    acc = [R.verify(t.answer_text, t.ground_truths) for t in result.trajectories]
    sub = [R.sub_em(R.boxed_answer(t.answer_text), t.ground_truths) for t in result.trajectories]
    return float(np.mean(acc)), float(np.mean(sub))


def _trace(result: Any, samples: list[dict], n: int = 2, keep: int = 6) -> list[dict[str, Any]]:
    """Memory after each chunk (first `keep` turns, the needle's turn, the last) of n documents."""
    out = []
    for t, s in zip(result.trajectories[:n], samples[:n]):
        turns = sorted({*range(min(keep, len(t.memories))), s["needle_chunk"], len(t.memories) - 1})
        out.append({"question": s["question"], "answer": s["answers"][0], "needle_chunk": s["needle_chunk"],
                    "num_chunks": t.num_chunks, "distractor_keys": s.get("distractor_keys", []),
                    "memories": {int(k): t.memories[k] for k in turns if 0 <= k < len(t.memories)},
                    "final": t.answer_text})
    return out


def evaluate_policies(run: Any) -> dict[str, Any]:
    """accuracy / sub_em / seconds_per_chunk: {policy: {"<m>x": value}} on the held-out sets;
    accuracy_seen_keys: the same on the seen-key sets (training keys, held-out codes) when the
    data stage wrote them; plus traces and setup."""
    from tqdm.auto import tqdm

    from memagent_jax.agent.rollout import rollout, sampler_generate_fn
    from memagent_jax.data.needle_kv import read_jsonl
    from memagent_jax.demo import _agent
    from memagent_jax.models import from_pretrained
    from memagent_jax.tokenizer import load_tokenizer

    d, a = run.demo, run.cfg.agent
    tok = load_tokenizer(run.path("tokenizer"))
    policy, builder = _agent(run, tok, None)
    sets = {f"{m}x": read_jsonl(run.path("data", f"eval_{m}x.jsonl")) for m in d.eval_multiples}
    seen_path = {f"{m}x": run.path("data", f"seen_keys_{m}x.jsonl") for m in d.eval_multiples}
    seen = {k: read_jsonl(p) for k, p in seen_path.items() if p.is_file()}
    gen_kwargs = dict(max_memory_new_tokens=a.max_memory_tokens,
                      max_final_new_tokens=a.max_final_new_tokens, seed=d.seed)
    out: dict[str, Any] = {"accuracy": {}, "accuracy_seen_keys": {}, "sub_em": {}, "seconds_per_chunk": {},
                           "seconds": {},
                           "chunks": {k: v[0]["num_chunks"] for k, v in sets.items()},
                           "tokens": {k: float(np.mean([s["num_tokens"] for s in v])) for k, v in sets.items()},
                           "docs": d.eval_docs, "temperature": d.eval_temperature, "top_p": d.eval_top_p,
                           "traces": {}}
    total = 2 * sum(len(v) * v[0]["num_chunks"] for v in [*sets.values(), *seen.values()])
    bar = tqdm(total=total, desc="eval: document-chunks", unit="chunk", disable=not d.progress)

    def run_set(gen: Any, samples: list[dict], progress: bool) -> tuple[Any, float]:
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

    for name, path in (("rl", run.path("hf")), ("warm_start", run.path("sft", "hf"))):
        model = from_pretrained(path)
        gen = sampler_generate_fn(model, tok, temperature=d.eval_temperature, top_p=d.eval_top_p,
                                  max_prompt_len=model.config.max_position_embeddings)
        run_set(gen, sets[next(iter(sets))], progress=False)  # untimed: compiles the programs
        for key, samples in sets.items():
            res, seconds = run_set(gen, samples, progress=True)
            acc, sub = _score(res)
            chunks = sum(t.num_chunks for t in res.trajectories)
            for metric, value in (("accuracy", acc), ("sub_em", sub), ("seconds", seconds),
                                  ("seconds_per_chunk", seconds / max(1, chunks))):
                out[metric].setdefault(name, {})[key] = value
            if name == "rl":
                out["traces"][key] = _trace(res, samples)
        for key, samples in seen.items():  # training keys, held-out codes, unseen documents
            res, _ = run_set(gen, samples, progress=True)
            out["accuracy_seen_keys"].setdefault(name, {})[key] = _score(res)[0]
        if name == "rl":  # the same policy without the document
            for key, samples in sets.items():
                res, seconds = run_set(gen, [dict(s, context="") for s in samples], progress=False)
                acc, sub = _score(res)
                out["accuracy"].setdefault("no_document", {})[key] = acc
                out["sub_em"].setdefault("no_document", {})[key] = sub
                out["seconds"].setdefault("no_document", {})[key] = seconds
        bar.set_postfix({f"{name}@{k}": f"{v:.2f}" for k, v in out["accuracy"][name].items()})
    bar.close()
    return out
