"""Rollout on the continuous-batching engine vs the static path, one tiny random model.

A random model samples at T=1 over a small vocabulary, so a reply ends at EOS after a
geometric (long-tailed) number of tokens, capped at `--cap`. Both paths run the same rollout
(same seeds) after a warm-up; prints ONE JSON line: `ratio` = engine / static tokens/s, wall
times, whether the outputs are identical, and the engine's slot occupancy.

    python bench/rollout_engine.py --docs 32 --group 8 --cap 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--cap", type=int, default=256)
    p.add_argument("--doc-chars", type=int, default=96)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--vocab", type=int, default=36, help="model vocabulary (ids >= 36 never sampled)")
    args = p.parse_args(argv)

    import numpy as np

    from memagent_jax.agent.memory import make_policy
    from memagent_jax.agent.prompts import PromptBuilder, PromptTemplates
    from memagent_jax.agent.rollout import engine_generate_fn, rollout, sampler_generate_fn
    from tiny_policy import AsciiTokenizer, docs, tiny_model

    class SmallVocab(AsciiTokenizer):  # EOS is 1 of ~36 sampleable ids: replies ~36 tokens, long tail
        vocab_size = args.vocab

    tok = SmallVocab()
    model = tiny_model(vocab_size=132, seed=1)
    policy = make_policy("overwrite", chunk_size=args.chunk, max_chunks=16, max_memory_tokens=args.cap)
    builder = PromptBuilder(tok, PromptTemplates(memory_update="Q{prompt}M{memory}C{chunk}>",
                                                 final="Q{prompt}M{memory}>", first_memory="-"))
    rng = np.random.default_rng(0)
    samples = [dict(d, context=d["context"][: int(rng.integers(args.chunk, args.doc_chars + 1))])
               for d in docs(args.docs, args.doc_chars, seed=3)]
    kw = dict(policy=policy, builder=builder, tokenizer=tok, group_size=args.group, training=True,
              gen_kwargs=dict(max_memory_new_tokens=args.cap, max_final_new_tokens=args.cap, seed=1))
    static_fn = sampler_generate_fn(model, tok, temperature=1.0)
    max_len = 64 + 2 * args.cap + args.chunk
    engine_fn = engine_generate_fn(model, tok, slots=args.slots, max_len=max_len,
                                   decode_steps=args.decode_steps, temperature=1.0)

    def timed(fn):
        rollout(samples, generate_fn=fn, **kw)  # warm-up: compile every shape
        t0 = time.perf_counter()
        res = rollout(samples, generate_fn=fn, **kw)
        return res, time.perf_counter() - t0

    static, t_static = timed(static_fn)
    cont, t_engine = timed(engine_fn)
    tokens = sum(len(c.response) for c in static.conversations)
    same = all(a.response == b.response and np.allclose(a.sampler_logps, b.sampler_logps, atol=1e-5)
               for a, b in zip(static.conversations, cont.conversations))
    lengths = [len(c.response) for c in static.conversations]
    print(json.dumps(dict(
        ratio=round(t_static / t_engine, 3), engine_tok_s=round(tokens / t_engine, 1),
        static_tok_s=round(tokens / t_static, 1), engine_s=round(t_engine, 3),
        static_s=round(t_static, 3), identical=bool(same), tokens=tokens,
        reply_len_mean=float(np.mean(lengths)), reply_len_p50=float(np.median(lengths)),
        reply_len_max=int(max(lengths)), conversations=len(lengths),
        engine=cont.stats["engine"], docs=args.docs, group=args.group, cap=args.cap)))


if __name__ == "__main__":
    main()
