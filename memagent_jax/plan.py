"""Per-device memory plan: does a config fit on N devices of G GiB, and which meshes would.

`plan(cfg, devices, hbm_gib)` estimates, PER DEVICE, the peak bytes of the two phases of an RL
step and checks each against the HBM with 10% headroom (fits if total <= 0.9 * hbm). The figures
follow what the code does today (change the code, change the formula here); the activation and
sampler constants were checked against XLA's compiled memory analysis on an H100 (Qwen2.5-7B/14B
shapes, remat full / dots_no_batch, 1x12288 to 64x256 micro-batches: within -7%..+17% for the 7B,
-3% for the 14B at 12288 tokens; rollout programs within 5%).

Notation: L layers, D hidden, F intermediate, H heads, K kv heads, hd head dim, V vocab;
mesh (data, fsdp, tensor) = (d, f, t); batch rows are split over d*f (the "batch" rule), heads,
kv heads, mlp and vocab over t; pb = bytes of model.param_dtype, cb = bytes of model.dtype.

Train step (TRAIN_RULES layout; one micro-batch of r rows x W tokens per device, tok = r*W):
  params      sum over weights of prod(dim / its mesh axes) * pb         (exact shard sizes)
  ref params  the same again when rl.kl_coef > 0 (the frozen copy for low_var_kl)
  optimizer   AdamW mu + nu, which optax keeps in the PARAM dtype: 2 * params (+ 64 B of scalars)
  gradients   2 * params in the param dtype (jax.grad of param-dtype weights): the accumulator
              plus the current micro-batch's gradients
  activations with
    a_tok  = D*(4cb + 8) + (2H + 2K)*hd*cb/t + 4F*cb/t   bytes per token of one layer's
             intermediates (h, norm(h), h', norm(h') + 2 fp32 RMSNorm copies; q, attention
             output, k, v; gate, up, silu(gate), gate*up)
             + (H + K)*hd*(cb + 4)/t with q/k norm (Qwen3: normed q, k + their fp32 copies)
    scores = r * (H/t) * W^2   elements of ONE layer's attention matrix with model.attention=xla
             (the fp32 [B, K, G, T, S] scores exist in full); 0 with cudnn / splash / auto
             (flash kernels: O(T), their fp32 log-sum-exp r * (H/t) * W * 4 bytes per layer,
             counted once in the saved activations and twice in a layer's backward; `auto` is
             planned as the accelerators' flash kernel, which is what it picks in bf16);
             blocked: kept = r * (H/t) * sum over query blocks of rows * keys * 4 bytes (the
             causal blocks' fp32 probabilities, ~56% of W^2 at 8 blocks) saved per layer without
             remat, plus one block's dP and dS in a layer's backward
    saved by the layer scan, per remat policy:
      none           L * (tok*a_tok + scores*(8 + cb))   fp32 scores + fp32 probs + cb probs
      full           L * tok*D*cb                        each layer's input (the scan carry)
      dots           L * (tok*(3D + (2H + 2K)*hd/t + 2F/t)*cb + scores*(4 + cb))
      dots_no_batch  L * tok*(3D + (H + 2K)*hd/t + 2F/t)*cb
    outside   tok*D*(2cb + 8)          embeddings, final hidden states, their cotangents
    then the larger of the two backward phases (they do not overlap):
      layer   tok*a_tok + scores*(10 + cb) + 3 * one layer's weights * cb / t
              (one layer recomputed with its cotangents; all-gathered weights)
      logits  c * V/t * 12 + (1 or 2) * V*D*cb / t,  c = r * max(1, min(rl.logprob_chunk // r, W))
              (one log-prob chunk's backward: logits, probabilities and d logits, fp32
              [r, chunk, V] each; the gathered head)
    the gathered-weight terms apply when f > 1 or the param and compute dtypes differ.
  peak = params + ref + optimizer + max(gradients + activations, 3 * params (the optax step))
  The micro-batch follows rl/batching.py: conversations of length l pack as
  rows = max(1, rl.micro_batch_tokens // l), padded to a power-of-two multiple of d*f, width
  W = sampler.bucket(l); l = the longest conversation and its halvings down to 256 are tried and
  the worst is kept (short rows make big log-prob chunks: the chunk is over positions only).

Rollout (one sampler.generate call of B rows):
  resident      params + ref + optimizer as above (gradients are freed between updates)
  decode copy   the weights again under DECODE_RULES (replicated over fsdp) in the param dtype;
                0 when f == 1 (same layout: device_put keeps the buffers)
  KV cache      kv(B) = 2 * L * B/(d*f) * S * K/t * hd * cb, S = P + N: P = bucket(prompt)
                rounded up to the 512-token prefill chunk, N = next power of two >= new tokens
  peak working  max of  prefill  kv(U) + U/(d*f) * (H/t) * 512 * S * (4 + cb)  (one layer's scores)
                        gather   kv(U) + kv(B)           (the prefilled rows are gathered: a copy)
                        decode   kv(B) + kv(B)/L + 8 fp32 [B/(d*f), V/t] logit buffers
                with U = B (after the first turn every member of a group has its own memory)
  B = rl.gen_batch_size * rollout.group_size: every active conversation of a turn goes into one
  call, unless `rollout_rows` (or the `rollout.max_rows_per_call` config key)
  caps it; `max_rollout_rows` is the largest B that fits.
Conversation lengths: prompt = 200 (template + chat markup) + question_budget + max_memory_tokens
+ chunk_size; longest conversation = prompt + max(max_memory_tokens, max_final_new_tokens).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from memagent_jax.config import Config, turn_rows
from memagent_jax.errors import InputError
from memagent_jax.models.attention import block_rows, query_blocks
from memagent_jax.models.model_config import ModelConfig
from memagent_jax.models.paged_attention import page_size
from memagent_jax.models.sharding import DECODE_RULES, TRAIN_RULES, MeshConfig
from memagent_jax.model_shapes import (  # noqa: F401  (KNOWN_SHAPES, resolve_model: re-exported)
    KNOWN_SHAPES, adapter_bytes, mesh_problem, resolve_model, target_bytes, weight_bytes,
)
from memagent_jax.models.transformer import param_shapes
from memagent_jax.sampler import bucket

GIB = 2**30
HEADROOM = 0.10
TEMPLATE_OVERHEAD = 200  # memory-update template (~90 tokens) + Qwen system prompt + chat markup
PREFILL_CHUNK = 512  # sampler.generate's default prefill_chunk
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

@dataclasses.dataclass
class PhasePlan:
    """One phase's per-device items (label, bytes); they add up to `total`."""

    name: str
    items: list[tuple[str, int]]
    hbm_bytes: int
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(b for _, b in self.items)

    @property
    def fits(self) -> bool:
        return self.total <= (1 - HEADROOM) * self.hbm_bytes


@dataclasses.dataclass(frozen=True)
class MeshSuggestion:
    data: int
    fsdp: int
    tensor: int
    train_bytes: int
    rollout_bytes: int
    max_rollout_rows: int
    fits_train: bool
    fits_rollout: bool


@dataclasses.dataclass
class PlanReport:
    model_name: str
    model: ModelConfig
    devices: int
    hbm_gib: float
    mesh: tuple[int, int, int]
    train: PhasePlan
    rollout: PhasePlan
    micro_batch: dict[str, int]  # rows_per_device, width, conversation_length, micro_batch_tokens
    rollout_shape: dict[str, int]  # rows, rows_per_device, cache_length, prompt_bucket, new_tokens
    max_rollout_rows: int  # the largest rows per generate call that fits (0: not even one shard)
    suggestions: list[MeshSuggestion] | None = None  # None: not computed

    @property
    def fits(self) -> bool:
        return self.train.fits and self.rollout.fits


# --------------------------------------------------------------------------- the phases
def conversation_lengths(cfg: Config) -> tuple[int, int, int]:
    """(longest prompt, longest new-token budget, longest conversation) in tokens."""
    a = cfg.agent
    prompt = TEMPLATE_OVERHEAD + a.question_budget + a.max_memory_tokens + a.chunk_size
    new = max(a.max_memory_tokens, a.max_final_new_tokens)
    return prompt, new, prompt + new


def _pow2_multiple(n: int, multiple: int) -> int:
    size = multiple
    while size < n:
        size *= 2
    return size


def activation_bytes(model: ModelConfig, rows: int, width: int, tensor: int, logprob_chunk: int,
                     gathered: bool = True) -> list[tuple[str, int]]:
    """Activation items of one micro-batch (rows x width on this device) under model.remat; the
    last item is the larger of the two backward phases (one layer's, or one log-prob chunk's)."""
    L, D, F, H, K, hd = (model.num_layers, model.hidden_size, model.intermediate_size,
                         model.num_heads, model.num_kv_heads, model.head_dim)
    V, cb, t = model.vocab_size, _BYTES[model.dtype], tensor
    tok = rows * width
    flash = model.attention not in ("xla", "blocked")  # cudnn / splash (auto: one of them on GPU / TPU)
    scores = rows * (H // t) * width * width if model.attention == "xla" else 0
    lse = rows * (H // t) * width * 4 if flash else 0  # the kernels' fp32 log-sum-exp per query
    # blocked: the causal blocks' fp32 probabilities are kept for the backward (custom VJP
    # residuals: saved without remat, recomputed under a remat policy), plus one block's dP, dS
    kept = (rows * (H // t) * sum((b - a) * b for a, b in query_blocks(width)) * 4
            if model.attention == "blocked" else 0)
    block_tmp = rows * (H // t) * block_rows(width) * width * 4 * 2 if model.attention == "blocked" else 0
    a_tok = D * (4 * cb + 8) + hd * (2 * H + 2 * K) * cb // t + 4 * F * cb // t
    if model.qk_norm:  # normed q and k, and the fp32 copies their RMSNorms make
        a_tok += hd * (H + K) * (cb + 4) // t
    layer = tok * a_tok + scores * (10 + cb) + 2 * lse + kept + block_tmp
    saved = {
        "none": L * (tok * a_tok + scores * (8 + cb) + lse + kept),
        "full": L * tok * D * cb,
        "dots": L * (tok * (3 * D + (2 * H + 2 * K) * hd // t + 2 * F // t) * cb + scores * (4 + cb) + lse),
        "dots_no_batch": L * tok * (3 * D + (H + 2 * K) * hd // t + 2 * F // t) * cb,
    }[model.remat]
    layer_weights = sum(math.prod(s) for p, s in param_shapes(model).items() if p.startswith("layers/"))
    heads = 1 if model.tie_word_embeddings else 2
    layer_phase = layer + (cb * 3 * (layer_weights // L) // t if gathered else 0)
    positions = max(1, min(logprob_chunk // rows, width))  # rl.logprob_chunk: tokens per device
    logits_phase = (rows * positions * (V // t) * 12
                    + (cb * heads * V * D // t if gathered else 0))
    phase = (("backward of one layer: recompute + cotangents (+ gathered weights)", layer_phase)
             if layer_phase >= logits_phase else
             (f"log-prob chunk {rows}x{positions} x vocab, fp32 x3 (+ gathered head)",
              logits_phase))
    return [
        (f"activations saved by the scan, {L} layers (remat={model.remat})", saved),
        ("embeddings / final hidden + cotangents", tok * D * (2 * cb + 8)),
        phase,
    ]


def micro_batch_shape(cfg: Config, batch_shards: int, model: ModelConfig, tensor: int,
                      gathered: bool = True) -> tuple[int, int, int]:
    """(rows per device, width, conversation length) of the most memory-hungry micro-batch."""
    _, _, longest = conversation_lengths(cfg)
    budget = cfg.rl.micro_batch_tokens
    best, length = None, longest
    while True:
        rows = max(1, budget // length)
        per_dev = _pow2_multiple(rows, batch_shards) // batch_shards
        width = bucket(length)
        acts = activation_bytes(model, per_dev, width, tensor, cfg.rl.logprob_chunk, gathered)
        cost = sum(b for _, b in acts)
        if best is None or cost > best[0]:
            best = (cost, per_dev, width, length)
        if length <= 256:
            break
        length = max(256, length // 2)
    return best[1], best[2], best[3]


def _state_items(cfg: Config, model: ModelConfig, mesh: tuple[int, int, int]) -> list[tuple[str, int]]:
    pb = _BYTES[model.param_dtype]
    params = weight_bytes(model, mesh, TRAIN_RULES, pb)
    if model.lora is not None:  # LoRA: the base frozen in model.dtype, only adapters trained
        a, lo = adapter_bytes(model, mesh), model.lora
        items = [(f"frozen base ({model.param_dtype}, fsdp x tensor shards)", params),
                 (f"LoRA adapters (rank {lo.rank}, {lo.dtype}, {len(lo.targets)} targets)", a)]
        if cfg.rl.kl_coef > 0:
            items.append(("reference: zero adapters over the base (no second copy)", a))
        return items + [(f"AdamW mu + nu of the adapters ({lo.dtype}) + scalars", 2 * a + 64)]
    items = [(f"params ({model.param_dtype}, fsdp x tensor shards)", params)]
    if cfg.rl.kl_coef > 0:
        items.append(("reference params (rl.kl_coef > 0)", params))
    items.append((f"AdamW mu + nu ({model.param_dtype}, as optax keeps them) + scalars", 2 * params + 64))
    return items


def train_phase(cfg: Config, model: ModelConfig, mesh: tuple[int, int, int], hbm: int
                ) -> tuple[PhasePlan, dict[str, int]]:
    d, f, t = mesh
    gathered = f > 1 or model.param_dtype != model.dtype
    rows, width, length = micro_batch_shape(cfg, d * f, model, t, gathered)
    params = weight_bytes(model, mesh, TRAIN_RULES, _BYTES[model.param_dtype])
    trained = adapter_bytes(model, mesh) if model.lora is not None else params  # grads, optax
    acts = activation_bytes(model, rows, width, t, cfg.rl.logprob_chunk, gathered)
    if model.param_dtype != model.dtype:
        # XLA hoists the layers' cast to the compute dtype out of the layer loop: every weight's
        # shard once more in that dtype (seen in the TPU compiler's buffer assignment)
        acts.insert(0, (f"weights cast to {model.dtype} (sharded, hoisted out of the layer loop)",
                        params * _BYTES[model.dtype] // _BYTES[model.param_dtype]))
    items = _state_items(cfg, model, mesh)
    notes = [f"micro-batch: {rows} row(s) x {width} tokens per device (conversations of "
             f"{length} tokens, rl.micro_batch_tokens={cfg.rl.micro_batch_tokens})"]
    if 2 * trained + sum(b for _, b in acts) >= 3 * trained:
        gdtype = model.lora.dtype if model.lora is not None else model.param_dtype
        items.append((f"gradients x2 ({gdtype}: accumulator + micro-batch)", 2 * trained))
        items += acts
    else:  # the optax step holds the accumulator, the clipped gradients and the updates
        items.append(("optimizer step: gradients + clipped gradients + updates", 3 * trained))
        notes.append("the optimizer step, not the backward pass, is the peak")
    shape = {"rows_per_device": rows, "width": width, "conversation_length": length,
             "micro_batch_tokens": cfg.rl.micro_batch_tokens}
    return PhasePlan("train step", items, hbm, notes), shape


def _decode_copy(model: ModelConfig, mesh: tuple[int, int, int], merge: bool = True
                 ) -> tuple[str, int]:
    """The rollout's weights: DECODE_RULES (replicated over fsdp), cast to the compute dtype
    (sampler.decode_state); none when that is the training layout and dtype already."""
    if mesh[1] == 1 and model.lora is not None and merge:  # trainer.rollout_model: targets merged
        return ("decode weights (the base; the adapted targets merged into new buffers)",
                target_bytes(model, mesh, TRAIN_RULES, _BYTES[model.dtype]))
    if mesh[1] == 1 and model.param_dtype == model.dtype:
        return "decode weights (the train weights: same layout and dtype)", 0
    return (f"decode weights ({model.dtype}, DECODE_RULES: replicated over fsdp)",
            weight_bytes(model, mesh, DECODE_RULES, _BYTES[model.dtype]))


def engine_rollout_phase(cfg: Config, model: ModelConfig, mesh: tuple[int, int, int], hbm: int,
                         rows: int) -> tuple[PhasePlan, dict[str, int]]:
    """The continuous engine's rollout: its slot arrays (KV cache of `rows` slots x the engine's
    KV length, logits, tokens) resident between its two programs, plus the larger working set of
    prefill (rollout.engine_prefill_rows requests: their prompt cache, one layer's rows gathered
    for the scatter into the slots, one layer's forward activations) and decode (one layer's
    cache read, its scores, the logits)."""
    d, f, t = mesh
    L, D, F, H, K, hd, V = (model.num_layers, model.hidden_size, model.intermediate_size,
                            model.num_heads, model.num_kv_heads, model.head_dim, model.vocab_size)
    cb = _BYTES[model.dtype]
    prompt, _, max_len = rollout_lengths(cfg, model.max_position_embeddings)
    shards = d * f
    slots = rollout_rows(cfg, mesh, rows)
    per_dev = slots // shards
    prefill_rows = min(slots, rollout_rows(cfg, mesh, cfg.rollout.engine_prefill_rows)
                       if cfg.rollout.engine_prefill_rows else slots)
    P = min(bucket(prompt), max_len)
    kv_token = 2 * L * (K // t) * hd * cb  # one token's keys and values, all layers, this device
    kv = per_dev * max_len * kv_token
    slot_rest = per_dev * (V * 4 + max_len * 8 + 64)  # logits, tokens + log-probs, sampling state
    tokens = prefill_rows // shards * P
    act_tok = 4 * D * cb + 2 * F * cb // t + 2 * (H + 2 * K) * hd * cb // t
    prefill = tokens * kv_token + prefill_rows * P * kv_token // L + tokens * act_tok
    decode = kv // (2 * L) + 2 * per_dev * (H // t) * max_len * 4 + 4 * per_dev * V * 4
    paged = model.dtype == "bfloat16" and page_size(max_len) is not None  # TPU: Pallas write + read
    if K // t == 1 and not paged:
        # one kv head per tensor shard: the TPU compiler copied the whole cache (k and v) in the
        # XLA decode loop instead of updating it in place (seen in its buffer assignment); the
        # paged kernels update it in place (tiny Qwen3 on v5p:2x2x1: 2.13 -> 0.10 GiB temporaries)
        decode += 2 * kv
    items = _state_items(cfg, model, mesh)
    items.append(_decode_copy(model, mesh, cfg.model.lora.rollout == "merged"))
    items.append((f"engine slots: KV cache {per_dev} slots/device x {max_len} ({model.dtype}) + "
                  "logits, tokens", kv + slot_rest))
    step, which = max((prefill, f"prefill of {prefill_rows} requests x {P}: prompt cache, "
                                "one layer gathered, activations"),
                      (decode, "decode step: one layer's cache, scores, logits"))
    items.append((f"peak beyond it, {which}", step))
    notes = [f"{slots} engine slots ({per_dev} per device) x {max_len} KV positions; "
             f"{prefill_rows} requests per prefill call, prompts up to {P} tokens",
             f"working set: prefill {fmt_gib(prefill)} | decode {fmt_gib(decode)} GiB"]
    shape = {"rows": slots, "rows_per_device": per_dev, "cache_length": max_len, "prompt_bucket": P,
             "new_tokens": max_len - P, "prefill_rows": prefill_rows}
    return PhasePlan("rollout (continuous engine)", items, hbm, notes), shape


def rollout_phase(cfg: Config, model: ModelConfig, mesh: tuple[int, int, int], hbm: int,
                  rows: int) -> tuple[PhasePlan, dict[str, int]]:
    """The rollout phase of the configured engine (static: one sampler.generate call of `rows`)."""
    if cfg.rollout.engine != "static":
        return engine_rollout_phase(cfg, model, mesh, hbm, rows)
    d, f, t = mesh
    L, H, K, hd, V = (model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim,
                      model.vocab_size)
    cb = _BYTES[model.dtype]
    prompt, new, _ = conversation_lengths(cfg)
    P = bucket(prompt)
    chunk = min(PREFILL_CHUNK, P)
    P = -(-P // chunk) * chunk
    N = _pow2_multiple(new, 16)
    S = P + N
    B = _pow2_multiple(rows, d * f)
    per_dev = B // (d * f)
    kv = 2 * L * per_dev * S * (K // t) * hd * cb
    # U-row cache + one layer's scores: xla prefills `chunk` queries against the S-slot cache; a
    # kernel prefills the whole prompt causally (sampler._prefill): blocked holds one query
    # block's scores, the flash kernels O(P) (left out)
    rows_x_keys = {"xla": chunk * S, "blocked": block_rows(P) * P}.get(model.attention, 0)
    prefill = kv + per_dev * (H // t) * rows_x_keys * (4 + cb)
    gather = 2 * kv  # U-row and B-row caches (U = B)
    decode = kv + kv // L + 8 * per_dev * (V // t) * 4
    items = _state_items(cfg, model, mesh)
    items.append(_decode_copy(model, mesh, cfg.model.lora.rollout == "merged"))
    step, which = max((prefill, "prefill: unique-prompt cache + scores"),
                      (gather, "row gather: unique-prompt + row caches"), (decode, "decode step"))
    items.append((f"KV cache: {per_dev} rows/device x {S} slots ({model.dtype})", kv))
    items.append((f"peak beyond it, {which}", step - kv))
    notes = [f"{B} rows per generate call ({per_dev} per device), cache {P} prompt + {N} new slots",
             f"peak working set: prefill {fmt_gib(prefill)} | gather {fmt_gib(gather)} | "
             f"decode {fmt_gib(decode)} GiB"]
    shape = {"rows": B, "rows_per_device": per_dev, "cache_length": S, "prompt_bucket": P,
             "new_tokens": N}
    return PhasePlan("rollout", items, hbm, notes), shape


def rollout_rows(cfg: Config, mesh: tuple[int, int, int], rows: int | None = None) -> int:
    """Rows of the rollout program that runs: `rows` (default `turn_rows(cfg)`) rounded up to a
    power-of-two multiple of the batch shards, as the engine and the sampler round them."""
    return _pow2_multiple(rows or turn_rows(cfg), mesh[0] * mesh[1])


def rollout_lengths(cfg: Config, window: int | None = None) -> tuple[int, int, int]:
    """(longest prompt, longest reply, engine KV positions per slot): rollout.engine_max_len, or
    the longest conversation bucketed (capped at the model's `window`)."""
    prompt, new, longest = conversation_lengths(cfg)
    max_len = cfg.rollout.engine_max_len or bucket(longest)
    return prompt, new, min(max_len, window) if window else max_len


def max_rollout_rows(cfg: Config, model: ModelConfig, mesh: tuple[int, int, int], hbm: int) -> int:
    """The largest rows per generate call (a power-of-two multiple of d*f) that fits; 0 if none."""
    full = cfg.rl.gen_batch_size * cfg.rollout.group_size
    best, rows = 0, mesh[0] * mesh[1]
    while rows <= _pow2_multiple(full, mesh[0] * mesh[1]):
        if not rollout_phase(cfg, model, mesh, hbm, rows)[0].fits:
            break
        best, rows = rows, rows * 2
    return best


# ------------------------------------------------------------------------------- entry
def plan(cfg: Config, devices: int, hbm_gib: float, *, hf_config: dict | None = None,
         rollout_rows: int | None = None, mesh: tuple[int, int, int] | None = None,
         suggest: bool = True) -> PlanReport:
    """Per-device memory of the train step and the rollout for `cfg` on `devices` x `hbm_gib`."""
    check_devices(devices, hbm_gib)
    name, model = resolve_model(cfg, hf_config)
    if mesh is None:
        mesh = MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor).resolve(devices)
    problem = mesh_problem(model, mesh)
    if problem:
        raise ValueError(f"mesh (data, fsdp, tensor)={mesh} cannot hold {name}: {problem}; "
                         "set mesh.data / mesh.fsdp / mesh.tensor to one of suggest_meshes(...)")
    hbm = int(hbm_gib * GIB)
    train, mb = train_phase(cfg, model, mesh, hbm)
    rollout, rs = rollout_phase(cfg, model, mesh, hbm, rollout_rows or turn_rows(cfg))
    report = PlanReport(name, model, devices, hbm_gib, tuple(mesh), train, rollout, mb, rs,
                        max_rollout_rows(cfg, model, mesh, hbm))
    if suggest:
        report.suggestions = suggest_meshes(cfg, devices, hbm_gib, hf_config=hf_config,
                                            rollout_rows=rollout_rows)
    return report


def suggest_meshes(cfg: Config, devices: int, hbm_gib: float, *, hf_config: dict | None = None,
                   rollout_rows: int | None = None, require_rollout: bool = False
                   ) -> list[MeshSuggestion]:
    """Valid (data, fsdp, tensor) factorizations of `devices` whose train step fits (and rollout,
    with `require_rollout`), best first: fewer tensor, then more fsdp, then more rollout rows."""
    check_devices(devices, hbm_gib)
    _, model = resolve_model(cfg, hf_config)
    out = []
    for t in range(1, devices + 1):
        if devices % t:
            continue
        for f in range(1, devices // t + 1):
            if (devices // t) % f:
                continue
            mesh = (devices // (t * f), f, t)
            if mesh_problem(model, mesh):
                continue
            r = plan(cfg, devices, hbm_gib, hf_config=hf_config, rollout_rows=rollout_rows,
                     mesh=mesh, suggest=False)
            if r.train.fits and (r.rollout.fits or not require_rollout):
                out.append(MeshSuggestion(*mesh, r.train.total, r.rollout.total, r.max_rollout_rows,
                                          r.train.fits, r.rollout.fits))
    return sorted(out, key=lambda s: (s.tensor, -s.fsdp, -s.max_rollout_rows))


# ----------------------------------------------------------------------------- printing
def fmt_gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_plan(report: PlanReport, max_suggestions: int = 5) -> str:
    m = report.model
    d, f, t = report.mesh
    lines = [
        f"model {report.model_name}: {m.num_layers} layers, hidden {m.hidden_size}, heads "
        f"{m.num_heads}/{m.num_kv_heads} kv"
        f"{'' if m.head_dim * m.num_heads == m.hidden_size else f' x head_dim {m.head_dim}'}"
        f"{', q/k norm' if m.qk_norm else ''}, mlp {m.intermediate_size}, vocab {m.vocab_size}; "
        f"params {m.param_dtype}, compute {m.dtype}, remat {m.remat}",
        f"{report.devices} devices x {report.hbm_gib:g} GiB; mesh data={d} fsdp={f} tensor={t}; "
        f"budget {fmt_gib(int((1 - HEADROOM) * report.hbm_gib * GIB))} GiB per device "
        f"({HEADROOM:.0%} headroom)",
    ]
    for phase in (report.train, report.rollout):
        lines += ["", f"{phase.name:<68} {'GiB/device':>10}"]
        lines += [f"  {label:<66} {fmt_gib(b):>10}" for label, b in phase.items]
        verdict = "FITS" if phase.fits else "DOES NOT FIT"
        lines.append(f"  {'total':<66} {fmt_gib(phase.total):>10}  {verdict}")
        lines += [f"  - {n}" for n in phase.notes]
    rows = report.max_rollout_rows
    lines.append(f"\nrollout rows per generate call: configured {report.rollout_shape['rows']}, "
                 f"largest that fits {rows}" + ("" if report.rollout.fits or not rows else
                                                " (needs a rows-per-call cap)"))
    lines.append("verdict: " + ("FITS" if report.fits else "DOES NOT FIT"))
    if report.suggestions:
        lines += ["", f"meshes whose train step fits, best first (at rl.micro_batch_tokens="
                      f"{report.micro_batch['micro_batch_tokens']}):",
                  f"  {'data':>4} {'fsdp':>4} {'tensor':>6} {'train GiB':>10} {'rollout GiB':>12} "
                  f"{'max rollout rows':>17}"]
        for s in report.suggestions[:max_suggestions]:
            lines.append(f"  {s.data:>4} {s.fsdp:>4} {s.tensor:>6} {fmt_gib(s.train_bytes):>10} "
                         f"{fmt_gib(s.rollout_bytes):>12}{'' if s.fits_rollout else '*':1} "
                         f"{s.max_rollout_rows:>16}")
        if any(not s.fits_rollout for s in report.suggestions[:max_suggestions]):
            lines.append("  * rollout over budget at the configured rows per generate call")
    elif report.suggestions is not None:
        lines.append("\nno mesh of these devices fits the train step")
    return "\n".join(lines)


def check_devices(devices: Any, hbm_gib: Any) -> None:
    """InputError unless `devices` >= 1 and `hbm_gib` is a positive finite number."""
    if isinstance(devices, bool) or not isinstance(devices, numbers.Integral) or devices < 1:
        raise InputError(f"--devices {devices} is not a number of accelerators", None,
                         "pass --devices N with N >= 1 (e.g. --devices 8)")
    if isinstance(hbm_gib, bool) or not isinstance(hbm_gib, numbers.Real) or not (
            math.isfinite(hbm_gib) and hbm_gib > 0):
        raise InputError(f"--hbm-gib {hbm_gib} is not an amount of memory", None,
                         "pass the GiB of one accelerator, e.g. --hbm-gib 80")
