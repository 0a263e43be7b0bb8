"""Sampler throughput: our jitted generate vs transformers' generate, on one random Qwen2 model.

Builds a random Qwen2 checkpoint with transformers (default: 4 layers, hidden 256, fp32), runs
greedy generation of `--new-tokens` for `--batch` random prompts of `--prompt-len` tokens (no EOS,
so every row decodes every step) and prints ONE JSON line. Both sides are timed end to end
(prefill + decode), interleaved (bench/timing.py: a warm-up call each, then `--repeats` rounds in
which each side runs calls for at least `--min-seconds`), so both see the same background load;
`ratio` is the median over the rounds of peer seconds / ours, with its spread (min, max). The
same calls with ONE new token time the prefill on each side; the rest, per step, is the decode
(`*_prefill_seconds`, `*_decode_ms_per_step`, from the medians). `--preset qwen2.5-0.5b` uses Qwen2.5-0.5B shapes in bf16 and adds the HBM
roofline of a decode step (weights + KV cache read at the mean cache length).

    python bench/sampler.py                      # CPU default
    python bench/sampler.py --preset qwen2.5-0.5b --hbm-gbps 3350 --no-peer
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import cpu_model, interleaved, ratio_spread, spread, usable_cpus  # noqa: E402

PRESETS = {
    "qwen2.5-0.5b": dict(layers=24, hidden=896, heads=14, kv_heads=2, intermediate=4864,
                         vocab=151936, tied=True, dtype="bfloat16"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tied", action="store_true", help="tie input and output embeddings")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model shapes (random weights); overrides the shape flags and --dtype")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median and spread)")
    p.add_argument("--min-seconds", type=float, default=10.0, help="calls per side and round last >= this")
    p.add_argument("--no-peer", action="store_true", help="skip transformers' generate")
    p.add_argument("--hbm-gbps", type=float, default=None,
                   help="memory bandwidth (GB/s) for the decode roofline; omitted if not given")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.preset:
        for k, v in PRESETS[args.preset].items():
            setattr(args, k, v)
    return args


def build_checkpoint(args: argparse.Namespace, path: Path) -> None:
    """A random Qwen2 checkpoint (weights normal(0.02), like HF's init) saved as safetensors."""
    import torch
    import transformers

    torch.manual_seed(args.seed)
    cfg = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, tie_word_embeddings=args.tied,
        max_position_embeddings=max(32768, args.prompt_len + args.new_tokens),
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = transformers.Qwen2ForCausalLM(cfg).to(getattr(torch, args.dtype))
    model.save_pretrained(path, safe_serialization=True)


def ours_call(args: argparse.Namespace, path: Path, prompts: list[list[int]], new_tokens: int | None = None
              ) -> Callable[[], list]:
    """Loads the checkpoint with our loader; returns a greedy generate call (token lists)."""
    import jax.numpy as jnp

    from memagent_jax import models, sampler

    model = models.from_pretrained(path, dtype=getattr(jnp, args.dtype))
    state = sampler.decode_state(model, None)
    n = new_tokens or args.new_tokens
    return lambda: sampler.generate(model, prompts, max_new_tokens=n, temperature=0.0,
                                    state=state, max_prompt_len=args.prompt_len).tokens


def hf_call(args: argparse.Namespace, path: Path, prompts: list[list[int]], new_tokens: int | None = None
            ) -> Callable[[], list]:
    """The same with transformers' generate (KV cache, exactly N tokens): on CUDA when JAX runs
    on a GPU, else torch CPU with one thread per usable core."""
    import jax
    import torch
    import transformers

    device = "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(usable_cpus())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, args.dtype)).eval().to(device)
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    n = new_tokens or args.new_tokens
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
              max_new_tokens=n, min_new_tokens=n,
              eos_token_id=None, pad_token_id=0)

    def call() -> list:
        with torch.inference_mode():
            return model.generate(ids, **kw)[:, ids.shape[1]:].tolist()

    return call


def roofline(args: argparse.Namespace, ours_tps: float) -> dict:
    """Bytes one decode step must read (all weights + K/V at the mean cache length).

    Also reports the K/V bytes our sampler actually reads per step: its attention reads the
    cache (prompt bucket + new-token bucket) up to the longest live row rounded up to one of
    `live_read_lengths` (steps of 1/8 of the cache), averaged over the decode steps.
    """
    from memagent_jax.models.attention import live_read_lengths

    from memagent_jax import sampler
    from memagent_jax.models import ModelConfig, count_params

    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.kv_heads,
                      tie_word_embeddings=args.tied)
    itemsize = 2 if args.dtype == "bfloat16" else 4
    weight_bytes = count_params(cfg) * itemsize
    mean_len = args.prompt_len + (args.new_tokens + 1) / 2
    kv_per_slot = 2 * cfg.num_layers * args.batch * cfg.num_kv_heads * cfg.head_dim * itemsize
    kv_bytes = kv_per_slot * mean_len
    cache_len = sampler.bucket(args.prompt_len) + sampler._pow2_bucket(args.new_tokens, 16)
    reads = [min(n for n in live_read_lengths(cache_len) if n >= args.prompt_len + t + 1)
             for t in range(args.new_tokens)]
    read_len = sum(reads) / len(reads)
    out = {"weight_bytes_per_step": weight_bytes, "kv_bytes_per_step": int(kv_bytes),
           "bytes_per_step": int(weight_bytes + kv_bytes), "mean_cache_len": mean_len,
           "sampler_cache_len": cache_len,
           "sampler_read_len": read_len, "sampler_kv_bytes_per_step": int(kv_per_slot * read_len)}
    if args.hbm_gbps:
        steps_per_s = args.hbm_gbps * 1e9 / (weight_bytes + kv_bytes)
        out["hbm_gbps"] = args.hbm_gbps
        out["roofline_tokens_per_s"] = steps_per_s * args.batch
        out["roofline_fraction"] = ours_tps / out["roofline_tokens_per_s"]
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import jax
    import numpy as np

    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, args.vocab, size=(args.batch, args.prompt_len)).tolist()
    new = args.batch * args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(args, Path(tmp))
        calls = {"ours": ours_call(args, Path(tmp), prompts)}
        if not args.no_peer:
            calls["hf"] = hf_call(args, Path(tmp), prompts)
        times, outputs = interleaved(calls, args.repeats, args.min_seconds)
        # The prefill/decode split: the same call with one new token is the prefill (+ 1 step).
        firsts = {f"{name}_prefill": fn(args, Path(tmp), prompts, 1)
                  for name, fn in (("ours", ours_call), ("hf", hf_call)) if name in calls}
        first_times, _ = interleaved(firsts, args.repeats, args.min_seconds / 2)
    assert all(len(t) == args.new_tokens for t in outputs["ours"])
    ours_s = statistics.median(times["ours"])
    result = {
        "bench": "sampler", "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform, "num_devices": jax.device_count(),
        "cpu": cpu_model(), "cpu_count": usable_cpus(),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "dtype": args.dtype, "preset": args.preset,
        "model": dict(layers=args.layers, hidden=args.hidden, heads=args.heads,
                      kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab,
                      tied=args.tied),
        "timing": (f"{args.repeats} interleaved rounds of >= {args.min_seconds} s per side after a "
                   "warm-up; seconds per call (prefill + decode), median over the rounds"),
        "ours_seconds": spread(times["ours"]), "ours_tokens_per_s": new / ours_s,
    }
    for name in calls:  # prefill = the 1-token call; decode = the rest, per step
        prefill = statistics.median(first_times[f"{name}_prefill"])
        side = "ours" if name == "ours" else "hf_generate"
        result[f"{side}_prefill_seconds"] = round(prefill, 4)
        result[f"{side}_decode_ms_per_step"] = round(
            1e3 * (statistics.median(times[name]) - prefill) / max(1, args.new_tokens - 1), 3)
    if "hf" in times:
        import torch

        ratio = ratio_spread(times["hf"], times["ours"])
        result.update(hf_generate_seconds=spread(times["hf"]),
                      hf_generate_tokens_per_s=new / statistics.median(times["hf"]),
                      ratio=ratio["median"], ratio_spread=[ratio["min"], ratio["max"]],
                      ratios=ratio["values"],
                      tokens_match=outputs["ours"][0] == outputs["hf"][0],
                      torch_version=torch.__version__)
    if args.preset:
        result["roofline"] = roofline(args, result["ours_tokens_per_s"])
    result.update(jax_version=jax.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
