"""Tokens/s of the jitted DAPO train step vs a PyTorch eager forward + backward + AdamW step of the
same tiny HF model, measured in the same run. Prints one JSON line.

Both sides do the same work per step on the same [batch, seq] tokens: a full forward, per-token
log-probs of the targets (fp32 log-softmax), the on-policy DAPO policy-gradient loss (ratio 1, so
the loss gradient equals -A * grad logp on response tokens; token-mean), backward, gradient
clipping, and one AdamW update. Ours runs `micro_batch_grads` + the donated optimizer step.

It also reports the achieved GFLOP/s of both ((6 * params + attention) * tokens per step) next to
the machine's measured matmul GFLOP/s at the step's MLP shape (jitted `x @ w` and torch's): the
limit a step made of such matmuls could reach. `--breakdown` times the step's pieces.

With --preset qwen2.5-0.5b (random weights, bf16) and --peak-tflops, it also reports model FLOPs
utilisation: 6 * params * tokens (+ attention) per step / time / peak.

`--lora RANK` also times our step on rank-RANK adapters over every projection (models/lora.py:
the base frozen, only the adapters differentiated and updated) and reports it against the
full-parameter step. The sides are timed interleaved (bench/timing.py: `--repeats` rounds, each
side at least `--min-seconds` per round); ratios are per round, reported as the median and its
[min, max] spread.

On a GPU the torch peer runs on CUDA (interleaved with ours: both hold their memory), and
`--attn` sets `model.attention` (models/attention.py): `cudnn` runs cuDNN's flash attention in the
training forward, `splash` the Pallas TPU kernel; decode/prefill keep the materialised `xla`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved, ratio_spread, spread  # noqa: E402

from memagent_jax import models  # noqa: E402
from memagent_jax.rl.logprobs import token_logprobs  # noqa: E402
from memagent_jax.rl.train_step import (  # noqa: E402
    LossSettings,
    init_policy_state,
    make_apply_update,
    make_optimizer,
    micro_batch_grads,
)

PRESETS = {
    "tiny": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=688, vocab_size=4096, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                         tie_word_embeddings=True),
}


def _hf_checkpoint(preset: str, path: Path, dtype: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**PRESETS[preset], max_position_embeddings=4096, rope_theta=1e6)
    model = transformers.Qwen2ForCausalLM(cfg)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_ours(path: Path, tokens: np.ndarray, mask: np.ndarray, adv: np.ndarray, dtype: str,
               repeats: int, remat: str, logprob_chunk: int = 4096, breakdown: bool = False,
               attention: str = "auto", scan_layers: bool = True, lora_rank: int = 0
               ) -> tuple[Any, dict]:
    """(one jitted train step as a callable, the --breakdown's piece times); with `lora_rank`
    the step of rank-`lora_rank` adapters on every projection over the frozen base."""
    model = models.from_pretrained(path, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
                                   remat=remat, attention=attention, scan_layers=scan_layers)
    if lora_rank:
        from memagent_jax.models.lora import LoraConfig, add_lora

        add_lora(model, LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank, dtype="float32"))
    tx = make_optimizer(1e-5, 1, 1, weight_decay=0.01, grad_clip=1.0)
    # with the weights' 1-device mesh, so the scalars' shardings match the update's outputs
    # (without it the update compiles twice: once more at the first timed step)
    mesh = jax.tree.leaves(nnx.state(model, nnx.Param))[0].sharding.mesh
    graphdef, state, frozen = init_policy_state(model, tx, mesh)
    apply = make_apply_update(tx)
    batch = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask),
             "advantages": jnp.asarray(adv), "sampler_logp": jnp.zeros(tokens.shape, jnp.float32)}
    den = jnp.float32(mask.sum())
    settings = LossSettings(logprob_chunk=logprob_chunk)
    holder = {"state": state}

    def step() -> None:
        grads, _ = micro_batch_grads(graphdef, holder["state"].params, batch, den, settings, frozen)
        holder["state"], norm, _ = apply(holder["state"], grads)
        jax.block_until_ready(norm)

    step()  # compile
    parts: dict = {}
    if breakdown and not lora_rank:  # where the step's time goes (each piece jitted and timed alone)
        params = holder["state"].params
        grads, _ = micro_batch_grads(graphdef, params, batch, den, settings)
        parts["grads_s"] = _timed(lambda: micro_batch_grads(graphdef, holder["state"].params,
                                                            batch, den, settings), repeats)

        def upd() -> Any:
            holder["state"], norm, _ = apply(holder["state"], grads)
            return norm
        parts["update_s"] = _timed(upd, repeats)
        toks = batch["tokens"]

        @jax.jit
        def fwd_hidden(params: Any) -> jax.Array:
            h, _ = nnx.merge(graphdef, params).hidden_states(toks)
            return h.astype(jnp.float32).sum()

        @jax.jit
        def grad_hidden(params: Any) -> Any:  # backbone fwd + bwd, no lm head / log-softmax
            return jax.grad(lambda p: (nnx.merge(graphdef, p).hidden_states(toks)[0]
                                       .astype(jnp.float32) ** 2).mean())(params)

        @jax.jit
        def fwd_logp(params: Any) -> jax.Array:
            lp, ent = token_logprobs(nnx.merge(graphdef, params), toks, chunk=logprob_chunk,
                                     with_entropy=True)
            return lp.sum() + ent.sum()

        p_now = lambda: holder["state"].params  # noqa: E731
        parts["fwd_hidden_s"] = _timed(lambda: fwd_hidden(p_now()), repeats)
        parts["fwd_bwd_hidden_s"] = _timed(lambda: grad_hidden(p_now()), repeats)
        parts["fwd_logp_entropy_s"] = _timed(lambda: fwd_logp(p_now()), repeats)
        parts = {k: round(v, 4) for k, v in parts.items()}
    return step, parts


def matmul_gflops(m: int, k: int, n: int, repeats: int = 10) -> dict[str, float]:
    """The machine's matmul speed at one of the step's shapes ([m, k] @ [k, n], the dtype's fp32):
    a jitted `x @ w` and torch's `x @ w` on the same device, GFLOP/s (best of `repeats`)."""
    rng = np.random.default_rng(0)
    a, b = rng.random((m, k), np.float32), rng.random((k, n), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(lambda x, y: x @ y)
    out = {"jax": 2 * m * k * n / _timed(lambda: mm(ja, jb), repeats) / 1e9}
    try:
        import torch
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)

        def tmm() -> None:
            ta @ tb
            if dev == "cuda":
                torch.cuda.synchronize()
        tmm()
        out["torch"] = 2 * m * k * n / _best(tmm, repeats) / 1e9
    except ImportError:
        pass
    return {key: round(v, 1) for key, v in out.items()}


def _timed(fn: Any, repeats: int) -> float:
    """Best wall time of fn() (blocked on its result) after one warm-up call."""
    jax.block_until_ready(fn())
    return _best(lambda: jax.block_until_ready(fn()), repeats)


def bench_torch(path: Path, tokens: np.ndarray, mask: np.ndarray, adv: np.ndarray, dtype: str
                ) -> Any:
    """One torch eager train step of the same model as a callable (warmed up)."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32,
        attn_implementation="sdpa").to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    ids = torch.tensor(tokens, dtype=torch.long, device=device)
    m = torch.tensor(mask[:, 1:], device=device)
    a = torch.tensor(adv[:, 1:], device=device)

    def step() -> None:
        logits = model(ids).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        loss = -(a * logp * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--min-seconds", type=float, default=10.0, help="each side's time per round")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="also time the step of rank-RANK LoRA adapters (every projection)")
    p.add_argument("--remat", default="none")
    p.add_argument("--attn", default="auto", choices=["xla", "cudnn", "splash", "blocked", "auto"],
                   help="model.attention of the training forward (models/attention.py)")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="model.scan_layers (--no-scan-layers unrolls the layer loop); default: "
                        "unrolled for the 4-layer tiny preset (as configs/tiny.yaml does on a "
                        "CPU), scanned for qwen2.5-0.5b")
    p.add_argument("--logprob-chunk", type=int, default=4096, help="tokens per LM-head slice (8 rows x 512 positions: the earlier default)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the step's pieces (grads, update, backbone fwd / fwd+bwd, logp fwd)")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (e.g. 989 for H100 bf16)")
    args = p.parse_args()
    if args.scan_layers is None:
        args.scan_layers = args.preset != "tiny"

    rng = np.random.default_rng(0)
    vocab = PRESETS[args.preset]["vocab_size"]
    tokens = rng.integers(0, vocab, (args.batch, args.seq)).astype(np.int32)
    mask = np.zeros((args.batch, args.seq), np.float32)
    mask[:, args.seq // 2:] = 1.0  # second half = response tokens
    adv = (rng.normal(size=(args.batch, 1)) * mask).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        _hf_checkpoint(args.preset, path, args.dtype)
        calls = {} if args.no_peer else {"torch": bench_torch(path, tokens, mask, adv, args.dtype)}
        calls["ours"], parts = bench_ours(path, tokens, mask, adv, args.dtype, args.repeats,
                                          args.remat, args.logprob_chunk, args.breakdown,
                                          args.attn, args.scan_layers)
        if args.lora:
            calls["lora"], _ = bench_ours(path, tokens, mask, adv, args.dtype, args.repeats,
                                          args.remat, args.logprob_chunk, False, args.attn,
                                          args.scan_layers, lora_rank=args.lora)
        times, _ = interleaved(calls, repeats=args.repeats, min_seconds=args.min_seconds)
    ours = spread(times["ours"])["median"]
    peer = None if args.no_peer else spread(times["torch"])["median"]
    n_tokens = args.batch * args.seq
    cfg = PRESETS[args.preset]
    n_params = models.count_params(models.ModelConfig.from_hf_dict(
        {**cfg, "architectures": ["Qwen2ForCausalLM"]}))
    attn = 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * args.seq  # per token, fwd+bwd
    flops = (6 * n_params + attn) * n_tokens
    # the limit: the machine's matmul at the step's MLP shape, [batch*seq, hidden] @ [hidden, mlp]
    limit = matmul_gflops(n_tokens, cfg["hidden_size"], cfg["intermediate_size"])
    out = {
        "bench": "train_step", "preset": args.preset, "dtype": args.dtype,
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "batch": args.batch, "seq": args.seq, "params": n_params,
        "remat": args.remat, "attn": args.attn, "scan_layers": args.scan_layers, "logprob_chunk": args.logprob_chunk,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "ours_tokens_per_s": round(n_tokens / ours, 1),
        "torch_eager_tokens_per_s": None if peer is None else round(n_tokens / peer, 1),
        "ratio": None if peer is None else ratio_spread(times["torch"], times["ours"])["median"],
        "ratio_spread": None if peer is None else ratio_spread(times["torch"], times["ours"]),
        "ours_step_s": spread(times["ours"]),
        "torch_step_s": None if peer is None else spread(times["torch"]),
        **({"lora_rank": args.lora, "lora_step_s": spread(times["lora"]),
            "lora_tokens_per_s": round(n_tokens / spread(times["lora"])["median"], 1),
            # full-parameter step / LoRA step, per round: > 1 = the LoRA step is faster
            "lora_speedup": ratio_spread(times["ours"], times["lora"])} if args.lora else {}),
        "timing": f"interleaved, {args.repeats} rounds, >= {args.min_seconds:g} s per side per "
                  "round; medians, ratios per round (median [min, max])",
        "model_tflops_per_s": round(flops / ours / 1e12, 3),
        "ours_gflops_per_s": round(flops / ours / 1e9, 1),
        "torch_gflops_per_s": None if peer is None else round(flops / peer / 1e9, 1),
        "matmul_gflops_per_s": limit,
        "mfu": round(flops / ours / 1e12 / args.peak_tflops, 4) if args.peak_tflops else None,
        **({"breakdown": parts} if parts else {}),
        "peak_gpu_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "jax": jax.__version__, "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
