"""Ahead-of-time compile of every program of one RL step for a TPU topology, without a TPU.

`compile_rl_step(cfg, "v5p-32")` builds the config's mesh over the topology's devices
(libtpu + `jax.experimental.topologies`), abstract weights (`nnx.eval_shape`, nothing is
allocated) laid out by the training and decode rules, and lowers and compiles, with the SAME
jitted functions that `train` runs:

  rollout   engine prefill-into-slot + engine decode (rollout.engine: continuous), or the static
            sampler's whole generate (rollout.engine: static), at the config's rows per call and
            KV length
  log-prob  the old / reference log-prob pass over the largest micro-batch
  gradient  the micro-batch gradient over the largest micro-batch the batching can form
  accumulate, update   the gradient accumulation and the optimizer step (train state donated)

Each row reports the compiler's per-device memory (arguments, outputs, temporaries, aliased),
what else is resident in that phase (the train state, reference weights, accumulator), the
resulting peak, the compiler's FLOPs and bytes, and a verdict against the device's HBM with
`plan`'s headroom. Everything is traced under `jax.set_mesh(mesh)`, so backend choices
(`model.attention: auto` -> splash, the kernels' interpret flag) follow the target, not the host.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from memagent_jax.compile_state import abstract, abstract_params, abstract_train_state, tree_bytes
from memagent_jax.config import Config
from memagent_jax.engine_slots import abstract_new_rows, abstract_slots
from memagent_jax.models.attention import resolve as resolve_attention
from memagent_jax.models.model_config import ModelConfig
from memagent_jax.models.sharding import (
    DECODE_RULES, MESH_AXES, TRAIN_RULES, MeshConfig, batch_sharding, mesh_context,
)
from memagent_jax.plan import HEADROOM, rollout_lengths, micro_batch_shape, resolve_model, rollout_rows
from memagent_jax.tpu_topology import Target, load_target

GIB = 2**30


@dataclasses.dataclass
class ProgramReport:
    """One compiled program: the compiler's per-device figures and the phase's peak."""

    name: str
    shape: str  # the bucket it was compiled for, in words
    arguments: int
    outputs: int
    temporaries: int
    aliased: int  # outputs that reuse donated argument buffers
    resident: int  # live in this phase but not an argument (train state, reference, accumulator)
    resident_what: str
    flops: float
    bytes_accessed: float
    compile_seconds: float
    compiler_seconds: float = 0.0  # the compiler's own estimate of one call (cost "optimal_seconds")
    calls_per_step: float = 0.0  # how many times one RL step of the recipe runs it (estimate)

    @property
    def peak(self) -> int:
        """Arguments + outputs not aliased to them + temporaries + what else is resident."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.resident


@dataclasses.dataclass
class CompileReport:
    """Every program of one RL step for `cfg` on `target`."""

    config: str
    model_name: str
    target: Target
    mesh: tuple[int, int, int]
    attention: str
    programs: list[ProgramReport]
    failures: list[tuple[str, str]]  # (program, the compiler's error)
    costs_scaled: bool = False  # FLOPs/bytes are whole calls (compile_rl_step costs=True)
    # rollout.mode: async on split devices: the rollout mesh's shape and its device count (the
    # train mesh, `mesh`, has the rest); None when both phases share one mesh
    rollout_mesh: tuple[int, int, int] | None = None
    rollout_devices: int = 0
    recipe: dict[str, float] | None = None  # recipe_estimate: the step from the model's arithmetic

    @property
    def budget(self) -> int:
        return int((1 - HEADROOM) * self.target.hbm_bytes)

    def fits(self, p: ProgramReport) -> bool:
        return p.peak <= self.budget

    @property
    def ok(self) -> bool:
        return not self.failures and all(self.fits(p) for p in self.programs)

    def phase_peak(self, phase: str) -> int:
        """The largest peak of the programs of `phase` ("rollout" or "train")."""
        names = ROLLOUT_PROGRAMS if phase == "rollout" else TRAIN_PROGRAMS
        return max((p.peak for p in self.programs if p.name in names), default=0)


ROLLOUT_PROGRAMS = ("engine prefill", "engine decode", "sampler generate")
TRAIN_PROGRAMS = ("log-prob pass", "micro-batch gradient", "accumulate", "optimizer update")


# ----------------------------------------------------------------------------- abstract inputs
_abstract, _bytes = abstract, tree_bytes


# ----------------------------------------------------------------------------------- compiling
def _compile(name: str, shape: str, fn: Callable[[], Any], resident: int, resident_what: str
             ) -> ProgramReport:
    t0 = time.perf_counter()
    compiled = fn()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    return ProgramReport(
        name, shape, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
        int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes), resident, resident_what,
        float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)), seconds,
        float(cost.get("optimal_seconds", 0.0)))


def compile_rl_step(cfg: Config, topology: str, *, config_name: str = "",
                    only: tuple[str, ...] | None = None,
                    progress: Callable[[str], None] | None = None,
                    costs: bool = False, layers: int | None = None) -> CompileReport:
    """Compiles every program of one RL step of `cfg` for `topology` (see the module doc).

    XLA's cost analysis counts the body of a loop once: the layer scan, the log-prob head's map
    over chunks, the engine's decode loop. With `costs`, each program is compiled again with 1
    and 2 layers (and one log-prob chunk) to count FLOPs, bytes and the compiler's time per
    layer: a program's cost = (1-layer cost) + (L - 1) x (2-layer - 1-layer), and a decode call
    = that x rollout.engine_decode_steps. Memory figures are always the real program's."""
    from memagent_jax.rl.train_step import (
        LossSettings, accumulate, make_apply_update, micro_batch_grads,
        sequence_logprobs,
    )
    from memagent_jax import engine as engine_mod
    from memagent_jax import sampler as sampler_mod
    from jax.experimental import topologies

    target, desc = load_target(topology)
    split = cfg.rollout.mode == "async" and cfg.mesh.rollout_devices > 0
    if split:  # async RL: the rollout on its devices, training on the rest (rl/async_trainer.py)
        from memagent_jax.rl.async_trainer import build_async_meshes

        mesh, rmesh = build_async_meshes(cfg, list(desc.devices))
        mesh_shape = tuple(mesh.devices.shape)
        rollout_shape = tuple(rmesh.devices.shape)
    else:
        mesh_shape = MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor).resolve(target.devices)
        mesh = rmesh = topologies.make_mesh(desc, mesh_shape, MESH_AXES)
        rollout_shape = mesh_shape
    name, model = resolve_model(cfg)
    if layers is not None:
        model = model.replace(num_layers=layers)
    attention = resolve_attention(model.attention, "tpu", jnp.dtype(model.dtype))
    model = model.replace(attention=attention)
    d, f, t = mesh_shape
    say = progress or (lambda _msg: None)
    want = lambda n: only is None or n in only  # noqa: E731
    programs: list[ProgramReport] = []
    failures: list[tuple[str, str]] = []
    repl = NamedSharding(mesh, PartitionSpec())

    def attempt(name_: str, shape: str, fn: Callable[[], Any], resident: int, what: str) -> None:
        if not want(name_):
            return
        say(f"compiling {name_} ({shape}) ...")
        try:
            with mesh_context(rmesh if name_ in ROLLOUT_PROGRAMS else mesh):
                programs.append(_compile(name_, shape, fn, resident, what))
        except Exception as e:  # the compiler's refusal (e.g. HLO temporaries exceed HBM)
            failures.append((name_, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))

    # ---------------------------------------------------------------- train state (abstract)
    ts = abstract_train_state(model, mesh, cfg.optim.lr)  # LoRA: adapters only, base apart
    graphdef, params, frozen, state, tx = ts.graphdef, ts.params, ts.frozen, ts.state, ts.tx
    p_bytes, o_bytes, base = ts.param_bytes, ts.opt_bytes, ts.frozen_bytes
    ref = p_bytes if cfg.rl.kl_coef > 0 else 0  # LoRA: zero adapters over the base
    ref_what = " + reference weights" if ref else ""
    base_what = " + frozen base" if base else ""

    # ------------------------------------------------------------------------------ rollout
    rows = rollout_rows(cfg, rollout_shape)
    prompt_len, new_tokens, max_len = rollout_lengths(cfg)
    merge = model.lora is not None and cfg.model.lora.rollout == "merged"
    decode_model = model.replace(lora=None) if merge else model  # trainer.rollout_model
    dgraph, dstate = abstract_params(decode_model, rmesh, DECODE_RULES, jnp.dtype(model.dtype))
    state_resident = p_bytes + o_bytes + ref + base
    state_what = "train state (weights + AdamW)" + ref_what + base_what
    if split:  # the rollout mesh holds decode weights only: the current and, during a weight
        # sync, the incoming version (WeightBroker.publish)
        state_resident = _bytes(dstate)
        state_what = "the incoming weight version (async weight sync)"
    elif f == 1 and model.lora is not None:  # the decode weights share the base's buffers
        shared = base - (_bytes([v for k, v in nnx.to_flat_state(frozen) if k[-1] in model.lora.targets])
                         if merge else 0)  # merged: new buffers for the targets
        state_resident -= shared
        state_what = "adapters + AdamW" + ref_what + " + the base's merged targets" * merge
    elif f == 1 and model.param_dtype == model.dtype:  # the decode state IS the train weights
        state_resident -= p_bytes
        state_what = "AdamW state" + ref_what
    if cfg.rollout.engine == "static":
        P = sampler_mod.bucket(prompt_len)
        chunk = min(512, P)
        P = -(-P // chunk) * chunk
        N = sampler_mod._pow2_bucket(new_tokens, 16)
        bs = lambda nd: batch_sharding(rmesh, DECODE_RULES, nd)  # noqa: E731
        args = (_abstract((rows, P), jnp.int32, bs(2)), _abstract((rows,), jnp.int32, bs(1)),
                _abstract((rows,), jnp.int32, bs(1)), _abstract((rows, 2), jnp.uint32, bs(2)),
                _abstract((rows,), jnp.int32, bs(1)))
        sp = dict(temperature=jnp.float32(1), top_p=jnp.float32(1), top_k=jnp.int32(0),
                  vocab_limit=jnp.int32(model.vocab_size),
                  stop_ids=np.full((sampler_mod.MAX_STOP_IDS,), -1, np.int32),
                  max_new_tokens=jnp.int32(new_tokens))
        rrepl = NamedSharding(rmesh, PartitionSpec())
        sp = {k: _abstract(np.shape(v), np.asarray(v).dtype, rrepl) for k, v in sp.items()}
        gen = sampler_mod._compiled(dgraph, N, chunk, rmesh)
        attempt("sampler generate", f"{rows} rows x {P} prompt + {N} new",
                lambda: gen.lower(dgraph, dstate, *args, sp).compile(), state_resident, state_what)
    else:
        slots = abstract_slots(model, rows, max_len, rmesh)
        P = min(sampler_mod.bucket(prompt_len), max_len)
        chunk = min(512, P)
        if P % chunk:
            P = min(-(-P // chunk) * chunk, max_len)
            chunk = chunk if P % chunk == 0 else P
        M = rollout_rows(cfg, rollout_shape, cfg.rollout.engine_prefill_rows) if cfg.rollout.engine_prefill_rows else rows
        M = min(M, rows)
        bs = lambda nd: batch_sharding(rmesh, DECODE_RULES, nd)  # noqa: E731
        rrepl = NamedSharding(rmesh, PartitionSpec())
        new = abstract_new_rows(M, rmesh)
        prefill = engine_mod._jitted_prefill(chunk, rmesh)
        attempt("engine prefill", f"{M} rows (all unique) x {P} prompt into {rows} slots x {max_len}",
                lambda: prefill.lower(dgraph, dstate, slots, _abstract((M, P), jnp.int32, bs(2)),
                                      _abstract((M,), jnp.int32, bs(1)),
                                      _abstract((M,), jnp.int32, bs(1)),
                                      _abstract((M,), jnp.int32, bs(1)), new).compile(),
                state_resident, state_what)
        decode = engine_mod._jitted_decode(cfg.rollout.engine_decode_steps, rmesh)
        attempt("engine decode", f"{rows} slots x {max_len}, {cfg.rollout.engine_decode_steps} steps/call",
                lambda: decode.lower(dgraph, dstate, slots, _abstract((), jnp.int32, rrepl),
                                     _abstract((), jnp.int32, rrepl)).compile(),
                state_resident, state_what)

    # ------------------------------------------------------------------------ train programs
    rows_dev, width, _ = micro_batch_shape(cfg, d * f, model, t)
    B = rows_dev * d * f
    bsh = batch_sharding(mesh, TRAIN_RULES, 2)
    tokens = _abstract((B, width), jnp.int32, bsh)
    settings = LossSettings(eps_low=cfg.rl.eps_low, eps_high=cfg.rl.eps_high,
                            clip_c=cfg.rl.clip_c if cfg.rl.clip_c > 0 else None, agg=cfg.rl.agg,
                            kl_coef=cfg.rl.kl_coef, entropy_coef=cfg.rl.entropy_coef,
                            tis_cap=cfg.rl.tis_cap, tis_level=cfg.rl.tis_level,
                            mis_cap=cfg.rl.mis_cap, mis_level=cfg.rl.mis_level,
                            logprob_chunk=cfg.rl.logprob_chunk)
    mb = f"{B} rows x {width} ({rows_dev} per device)"
    attempt("log-prob pass", mb,
            lambda: sequence_logprobs.lower(graphdef, params, tokens, temperature=1.0,
                                            chunk=cfg.rl.logprob_chunk, frozen=frozen).compile(),
            o_bytes + ref, "AdamW state" + ref_what)
    batch = {"tokens": tokens}
    for key in ("mask", "advantages", "sampler_logp") + (("ref_logp",) if ref else ()):
        batch[key] = _abstract((B, width), jnp.float32, bsh)
    den = _abstract((), jnp.float32, repl)
    dropping = model.lora is not None and model.lora.dropout > 0  # the adapters' dropout key
    dropout_rng = _abstract((2,), jnp.uint32, repl) if dropping else None
    attempt("micro-batch gradient", mb,
            lambda: micro_batch_grads.lower(graphdef, params, batch, den, settings, frozen,
                                            dropout_rng).compile(),
            o_bytes + p_bytes + ref, "AdamW state + gradient accumulator" + ref_what)
    attempt("accumulate", "gradients + accumulator",
            lambda: accumulate.lower(params, params).compile(), p_bytes + o_bytes + ref + base,
            "train state" + ref_what + base_what)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    apply = make_apply_update(tx, state_shardings)
    attempt("optimizer update", "train state (donated) + gradients",
            lambda: apply.lower(state, params).compile(), ref + base,
            (ref_what + base_what).strip(" +") or "-")
    _count_calls(cfg, programs, rows=rows, max_len=max_len, micro_rows=B, width=width)
    report = CompileReport(config_name, name, target, mesh_shape, attention, programs, failures,
                           rollout_mesh=rollout_shape if split else None,
                           rollout_devices=int(np.prod(rollout_shape)) if split else 0)
    if costs and layers is None and programs:
        say("counting costs per layer (1- and 2-layer compiles of the same programs) ...")
        _scale_costs(report, cfg, topology, model.num_layers, only)
        report.costs_scaled = True
        if not split:  # the model-arithmetic bound assumes one set of devices for both phases
            report.recipe = recipe_estimate(cfg, model, target)
    return report


def _scale_costs(report: CompileReport, cfg: Config, topology: str, num_layers: int,
                 only: tuple[str, ...] | None) -> None:
    """Replaces each program's FLOPs, bytes and compiler seconds with whole-call figures (see
    compile_rl_step): loop bodies counted once are scaled by their trip counts."""
    one_chunk = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, logprob_chunk=2**40))
    small = [{p.name: p for p in compile_rl_step(one_chunk, topology, only=only, costs=False,
                                                  layers=n).programs} for n in (1, 2)]
    steps = {"engine decode": cfg.rollout.engine_decode_steps}
    for p in report.programs:
        if p.name not in small[0] or p.name not in small[1]:
            continue
        a, b = small[0][p.name], small[1][p.name]
        whole = lambda x, y: max(0.0, x + (num_layers - 1) * (y - x)) * steps.get(p.name, 1)  # noqa: E731
        p.flops = whole(a.flops, b.flops)
        p.bytes_accessed = whole(a.bytes_accessed, b.bytes_accessed)
        p.compiler_seconds = whole(a.compiler_seconds, b.compiler_seconds)


def _count_calls(cfg: Config, programs: list[ProgramReport], *, rows: int, max_len: int,
                 micro_rows: int, width: int) -> None:
    """Calls per RL step of the recipe (an upper bound: every reply at its token budget, every
    document at agent.max_chunks chunks, every micro-batch at the largest shape)."""
    a, rl, r = cfg.agent, cfg.rl, cfg.rollout
    turns = a.max_chunks + 1
    conversations = rl.gen_batch_size * r.group_size * turns
    decode_tokens = rl.gen_batch_size * r.group_size * (a.max_chunks * a.max_memory_tokens
                                                       + a.max_final_new_tokens)
    micro = math.ceil(rl.train_batch_size * r.group_size * turns / micro_rows) * rl.ppo_epochs
    passes = (0 if rl.ppo_epochs == 1 and rl.tis_cap == 0 else 1) + (1 if rl.kl_coef > 0 else 0)
    updates = rl.train_batch_size // max(1, rl.mini_batch_size) * rl.ppo_epochs
    static_calls = math.ceil(rl.gen_batch_size * r.group_size / rows) * turns
    counts = {
        "engine prefill": math.ceil(conversations / rows),
        "engine decode": math.ceil(decode_tokens / (rows * r.engine_decode_steps)),
        "sampler generate": static_calls,
        "log-prob pass": math.ceil(rl.train_batch_size * r.group_size * turns / micro_rows) * passes,
        "micro-batch gradient": micro,
        "accumulate": max(0, micro - updates),
        "optimizer update": updates,
    }
    for p in programs:
        p.calls_per_step = float(counts.get(p.name, 0))


# ----------------------------------------------------------------------------------- estimate
def step_estimate(report: CompileReport) -> dict[str, float]:
    """Seconds of one RL step, two ways: the roofline from the compiler's FLOPs and bytes per
    program and the device's peak FLOP/s and HBM bandwidth (each call takes the larger of the
    two), and the sum of the compiler's own per-call estimates; and the MFU each implies. An
    estimate: real steps add host work, collectives the estimate misses and load imbalance, and
    the call counts are upper bounds (every reply at its budget)."""
    tgt = report.target
    phase = {"rollout": [0.0, 0.0], "train": [0.0, 0.0]}  # [roofline, compiler] seconds
    flops = 0.0
    for p in report.programs:
        lane = phase["rollout" if p.name in ROLLOUT_PROGRAMS else "train"]
        lane[0] += p.calls_per_step * max(p.flops / tgt.peak_flops, p.bytes_accessed / tgt.hbm_bandwidth)
        lane[1] += p.calls_per_step * p.compiler_seconds
        flops += p.calls_per_step * p.flops
    # sync: the phases one after the other; async on split devices: at the same time (the step
    # is the slower lane, assuming they overlap fully)
    combine = max if report.rollout_mesh is not None else (lambda a, b: a + b)
    roofline = combine(phase["rollout"][0], phase["train"][0])
    compiler = combine(phase["rollout"][1], phase["train"][1])
    mfu = lambda s: flops / (s * tgt.peak_flops) if s else 0.0  # noqa: E731
    return {"seconds": roofline, "compiler_seconds": compiler, "flops_per_device": flops,
            "mfu": mfu(roofline), "compiler_mfu": mfu(compiler),
            "rollout_seconds": phase["rollout"][0], "train_seconds": phase["train"][0],
            "rollout_compiler_seconds": phase["rollout"][1], "train_compiler_seconds": phase["train"][1]}


def recipe_estimate(cfg: Config, model: ModelConfig, target: Target) -> dict[str, float]:
    """The same RL step from the model's arithmetic (the usual MFU convention), for comparison
    with the compiler's counts: matmul FLOPs 2 x weights per token forward (x4 for a trained
    token under full remat: forward, recompute, backward; x3 without) plus causal attention,
    over every conversation at its longest; decode steps bound by HBM (each step reads this
    device's decode weights and, on average, half of its slots' KV cache). Upper bounds like
    the call counts: every document at agent.max_chunks chunks, every reply at its budget."""
    from memagent_jax.plan import conversation_lengths
    from memagent_jax.model_shapes import weight_bytes
    from memagent_jax.models.transformer import count_params

    a, rl, r = cfg.agent, cfg.rl, cfg.rollout
    L, D, H, hd, V = (model.num_layers, model.hidden_size, model.num_heads, model.head_dim,
                      model.vocab_size)
    head = D * V
    body = count_params(model) - head * (1 if model.tie_word_embeddings else 2)
    prompt, _, longest = conversation_lengths(cfg)
    turns = a.max_chunks + 1
    attn = lambda ctx: 4 * L * H * hd * ctx / 2  # noqa: E731  forward, causal: half the context
    trained = rl.train_batch_size * r.group_size * turns * longest
    train = trained * ((8 if model.remat == "full" else 6) * body + 6 * head + 3 * attn(longest))
    passes = (0 if rl.ppo_epochs == 1 and rl.tis_cap == 0 else 1) + (1 if rl.kl_coef > 0 else 0)
    logprob = passes * trained * (2 * (body + head) + attn(longest))
    conversations = rl.gen_batch_size * r.group_size * turns
    prefill = conversations * prompt * (2 * body + attn(prompt))
    generated = rl.gen_batch_size * r.group_size * (a.max_chunks * a.max_memory_tokens + a.max_final_new_tokens)
    decode_flops = generated * (2 * (body + head) + attn(2 * longest))
    devices = target.devices
    d_f = devices // cfg.mesh.tensor if cfg.mesh.tensor > 0 else devices
    slots = min(rollout_rows(cfg, (1, d_f, 1)), rl.gen_batch_size * r.group_size)
    steps = generated / slots
    mesh = MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor).resolve(devices)
    kv_per_device = (slots // (mesh[0] * mesh[1])) * rollout_lengths(cfg)[2] * 2 * L * (
        model.num_kv_heads // mesh[2]) * hd * jnp.dtype(model.dtype).itemsize
    step_bytes = weight_bytes(model, mesh, DECODE_RULES, jnp.dtype(model.dtype).itemsize) + kv_per_device / 2
    compute = (train + logprob + prefill) / (devices * target.peak_flops)
    decode = steps * step_bytes / target.hbm_bandwidth
    total = train + logprob + prefill + decode_flops
    seconds = compute + decode
    return {"seconds": seconds, "compute_seconds": compute, "decode_seconds": decode,
            "model_flops": total,
            # the two phases apart (async RL runs them on their own devices)
            "train_compute_seconds": (train + logprob) / (devices * target.peak_flops),
            "prefill_seconds": prefill / (devices * target.peak_flops),
            "decode_steps": steps, "generated_tokens": generated, "slots": slots}


# ----------------------------------------------------------------------------------- printing
