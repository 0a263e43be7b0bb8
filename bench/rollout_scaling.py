"""Rollout cost vs document length: seconds per chunk and peak memory at 1x, 8x and 64x.

MemAgent's claim is linear cost: every chunk is one fixed-size conversation, so the time per
chunk and the memory in use must not grow with the document. This runs the memory agent
(`rollout(..., training=False)`, greedy) on the demo's needle documents of 1x, 8x and 64x the training
length with the tiny model: the demo's exported policy when `--model` (default runs/demo/hf)
exists, else a random init of configs/tiny.yaml's shape with a freshly trained tokenizer.

Seconds per chunk = wall time / (documents x chunks per document): the lengths run interleaved
(bench/timing.py: a warm-up each, then `--repeats` rounds of >= `--min-seconds` per length); the
JSON gives the median and spread (min, max) over the rounds, and the 64x/1x ratio per round. Memory: the process RSS sampled every 2 ms by a thread
during each rollout (peak, and peak minus the RSS just before), plus the JAX device's
peak_bytes_in_use where the backend reports it (not on CPU). Prints ONE JSON line.

    python bench/rollout_scaling.py [--model runs/demo/hf] [--docs 4] [--multiples 1,8,64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import cpu_model, interleaved, ratio_spread, spread, usable_cpus  # noqa: E402


class PeakRSS:
    """Context manager: peak resident set size of this process while inside (sampling thread)."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def device_peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def load_policy(args: argparse.Namespace, cfg: object) -> tuple[object, object, str]:
    """(model, tokenizer, description): the demo's exported policy, or a random init."""
    from memagent_jax.models import from_pretrained, init_model
    from memagent_jax.policy import random_model_config
    from memagent_jax.tokenizer import load_tokenizer, train_sentencepiece

    model_dir = Path(args.model)
    if (model_dir / "config.json").is_file():
        return from_pretrained(model_dir), load_tokenizer(model_dir), f"trained ({model_dir})"
    from memagent_jax.agent.prompts import templates_from_config
    from memagent_jax.demo.task import tokenizer_corpus

    t = templates_from_config(cfg.agent)
    tok = train_sentencepiece(tokenizer_corpus() + [t.memory_update, t.final] * 20,
                              tempfile.mkdtemp(prefix="bench_tok_"), args.vocab)
    return init_model(random_model_config(cfg, tok.vocab_size), seed=0), tok, "random init"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/demo/hf", help="HF policy dir (random init if absent)")
    p.add_argument("--config", default="tiny")
    p.add_argument("--docs", type=int, default=4, help="documents per rollout (one batch)")
    p.add_argument("--multiples", default="1,8,64")
    p.add_argument("--vocab", type=int, default=1024, help="tokenizer vocab for the random init")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median and spread)")
    p.add_argument("--min-seconds", type=float, default=10.0, help="per length and round")
    args = p.parse_args(argv)

    import jax

    from memagent_jax.agent.memory import make_policy
    from memagent_jax.agent.prompts import builder_from_config
    from memagent_jax.agent.rollout import rollout, sampler_generate_fn
    from memagent_jax.demo import task as nk
    from memagent_jax.demo import load_demo_config

    cfg, demo = load_demo_config(args.config)
    a = cfg.agent
    model, tok, weights = load_policy(args, cfg)
    policy = make_policy("overwrite", chunk_size=a.chunk_size, max_chunks=None,
                         max_memory_tokens=a.max_memory_tokens)
    builder = builder_from_config(tok, a)
    gen = sampler_generate_fn(model, tok, temperature=0.0, max_prompt_len=model.config.max_position_embeddings)
    gen_kwargs = dict(max_memory_new_tokens=a.max_memory_tokens, max_final_new_tokens=a.max_final_new_tokens,
                      seed=args.seed)

    def docs(mult: int) -> list[dict]:
        spec = nk.NeedleSpec(chunk_size=a.chunk_size, num_chunks=demo.train_chunks * mult,
                             min_distractors=demo.min_distractors, max_distractors=demo.max_distractors,
                             num_keys=demo.num_keys, name="eval")
        return nk.generate(spec, tok, args.docs, seed=args.seed + 7)

    def run(samples: list[dict]) -> object:
        return rollout(samples, policy=policy, builder=builder, tokenizer=tok, generate_fn=gen,
                       group_size=1, training=False, gen_kwargs=gen_kwargs, question_budget=a.question_budget)

    mults = [int(m) for m in args.multiples.split(",")]
    samples = {m: docs(m) for m in mults}
    # interleaved rounds over the lengths (each warmed up first): seconds per rollout per round
    times, results = interleaved({m: (lambda m=m: run(samples[m])) for m in mults},
                                 args.repeats, args.min_seconds)
    out: dict[str, object] = {"bench": "rollout_scaling", "weights": weights, "docs": args.docs,
                              "chunk_size": a.chunk_size, "train_chunks": demo.train_chunks,
                              "timing": f"{args.repeats} interleaved rounds of >= {args.min_seconds} s "
                                        "per length after a warm-up; RSS from one more rollout each"}
    per_chunk: dict[int, list[float]] = {}
    for m in mults:
        chunks = sum(t.num_chunks for t in results[m].trajectories)
        per_chunk[m] = [t / chunks for t in times[m]]
        with PeakRSS() as mem:
            run(samples[m])
        out[f"{m}x"] = {"chunks_per_doc": chunks // args.docs, "seconds": spread(times[m], 3),
                        "s_per_chunk": spread(per_chunk[m], 6),
                        "peak_rss_mib": round(mem.peak / 2**20, 1),
                        "peak_rss_delta_mib": round((mem.peak - mem.start) / 2**20, 2),
                        "device_peak_bytes": device_peak_bytes()}
    lo, hi = mults[0], mults[-1]
    key = f"{hi}x/{lo}x"
    ratio = ratio_spread(per_chunk[hi], per_chunk[lo])
    out["ratio_s_per_chunk_" + key] = ratio["median"]
    out["ratio_s_per_chunk_spread"] = [ratio["min"], ratio["max"]]
    out["ratio_peak_rss_" + key] = round(out[f"{hi}x"]["peak_rss_mib"] / out[f"{lo}x"]["peak_rss_mib"], 3)
    out["cpu"], out["cores"] = cpu_model(), usable_cpus()
    out["device"] = f"{jax.default_backend()} x{jax.device_count()}"
    out["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
