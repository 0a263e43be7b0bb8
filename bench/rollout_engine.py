"""Rollout on the continuous-batching engine vs the static path, one tiny random model.

The memory agent's rollout (`rollout()`, T=1, group sampling) runs on both paths with the same
seeds, interleaved (bench/timing.py: a warm-up each, then `--repeats` rounds of at least
`--min-seconds` per side); prints ONE JSON line: `ratio` = static / engine seconds per rollout,
median and spread (min, max) over the rounds, whether the outputs are identical, the reply-length
distribution, the engine's slot occupancy and where its last rollout's wall time went: blocked on
the device (`device_wait_s`), the engine's own host work (`host_s`: refills, reads, bookkeeping),
the rollout's work on finished replies (`caller_s`, overlapping the next decode call) and the
rest of the rollout outside the engine's loop (`outside_s`: building and recording).

Reply lengths, MemAgent-like: most memory turns add little to the note, some rewrite it up to the
memory budget. A random model samples them: its embeddings scaled by `--logit-scale` make the
next-token distribution peaked and context dependent, so some contexts end at EOS within a few
tokens and others almost never do; with the default scale 8 and the budget (`--cap`) 256 about half
the replies end within ~90 tokens and about a tenth run to the budget (the JSON reports p50, p90,
the share at the cap). The static path decodes each memory turn's call until its longest reply
ends; the engine refills a slot as soon as its reply ends, with no barrier between turns.

    python bench/rollout_engine.py --docs 32 --group 8 --cap 256
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import cpu_model, interleaved, ratio_spread, spread, usable_cpus  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--cap", type=int, default=256, help="memory budget: max new tokens per reply")
    p.add_argument("--doc-chars", type=int, default=96)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--logit-scale", type=float, default=8.0,
                   help="embedding scale of the random model (peaked, context-dependent replies)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=10.0, help="per side and round")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from memagent_jax.agent.memory import make_policy
    from memagent_jax.agent.prompts import PromptBuilder, PromptTemplates
    from memagent_jax.agent.rollout import engine_generate_fn, rollout, sampler_generate_fn
    from tiny_policy import AsciiTokenizer, docs, tiny_model

    tok = AsciiTokenizer()
    model = tiny_model(vocab_size=tok.vocab_size, seed=1)
    model.embed[...] = model.embed[...] * args.logit_scale
    policy = make_policy("overwrite", chunk_size=args.chunk, max_chunks=16, max_memory_tokens=args.cap)
    builder = PromptBuilder(tok, PromptTemplates(memory_update="Q{prompt}M{memory}C{chunk}>",
                                                 final="Q{prompt}M{memory}>", first_memory="-"))
    rng = np.random.default_rng(0)
    samples = [dict(d, context=d["context"][: int(rng.integers(args.chunk, args.doc_chars + 1))])
               for d in docs(args.docs, args.doc_chars, seed=3)]
    kw = dict(policy=policy, builder=builder, tokenizer=tok, group_size=args.group, training=True,
              gen_kwargs=dict(max_memory_new_tokens=args.cap, max_final_new_tokens=args.cap, seed=1))
    max_len = 128 + 2 * args.cap + args.chunk  # template + question + memory + chunk + reply
    fns = {"static": sampler_generate_fn(model, tok, temperature=1.0),
           "engine": engine_generate_fn(model, tok, slots=args.slots, max_len=max_len,
                                        decode_steps=args.decode_steps, temperature=1.0)}
    walls: dict[str, list[float]] = {"engine": []}

    def engine_call():  # also records its wall time, for the host/device split
        t0 = time.perf_counter()
        res = rollout(samples, generate_fn=fns["engine"], **kw)
        walls["engine"].append(time.perf_counter() - t0)
        return res

    times, outs = interleaved({"static": lambda: rollout(samples, generate_fn=fns["static"], **kw),
                               "engine": engine_call}, args.repeats, args.min_seconds)
    static, cont = outs["static"], outs["engine"]
    same = all(a.response == b.response and np.allclose(a.sampler_logps, b.sampler_logps, atol=1e-5)
               for a, b in zip(static.conversations, cont.conversations))
    lengths = np.array([len(c.response) for c in static.conversations])
    tokens = int(lengths.sum())
    eng = cont.stats["engine"]
    wall = walls["engine"][-1]
    ratio = ratio_spread(times["static"], times["engine"])
    result = dict(
        bench="rollout_engine", ratio=ratio["median"], ratio_spread=[ratio["min"], ratio["max"]],
        ratios=ratio["values"], engine_s=spread(times["engine"]), static_s=spread(times["static"]),
        engine_tok_s=round(tokens / statistics.median(times["engine"]), 1),
        static_tok_s=round(tokens / statistics.median(times["static"]), 1),
        identical=bool(same), tokens=tokens, conversations=len(lengths),
        reply_len=dict(mean=round(float(lengths.mean()), 1), p50=float(np.median(lengths)),
                       p90=float(np.percentile(lengths, 90)), max=int(lengths.max()),
                       share_at_cap=round(float((lengths >= args.cap).mean()), 3)),
        engine=dict(eng, occupancy=round(eng["occupancy"], 3),
                    **{k: round(eng[k], 3) for k in ("device_wait_s", "host_s", "caller_s", "run_s")},
                    outside_s=round(wall - eng["run_s"], 3), wall_s=round(wall, 3)),
        timing=f"{args.repeats} interleaved rounds of >= {args.min_seconds} s per side after a warm-up",
        docs=args.docs, group=args.group, cap=args.cap, slots=args.slots,
        decode_steps=args.decode_steps, logit_scale=args.logit_scale,
        cpu=cpu_model(), cores=usable_cpus(),
        jax=jax.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
