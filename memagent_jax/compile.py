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
    mesh_shape = MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor).resolve(target.devices)
    mesh = topologies.make_mesh(desc, mesh_shape, MESH_AXES)
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
            with mesh_context(mesh):
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
    rows = rollout_rows(cfg, (d, f, t))
    prompt_len, new_tokens, max_len = rollout_lengths(cfg)
    merge = model.lora is not None and cfg.model.lora.rollout == "merged"
    decode_model = model.replace(lora=None) if merge else model  # trainer.rollout_model
    dgraph, dstate = abstract_params(decode_model, mesh, DECODE_RULES, jnp.dtype(model.dtype))
    state_resident = p_bytes + o_bytes + ref + base
    state_what = "train state (weights + AdamW)" + ref_what + base_what
    if f == 1 and model.lora is not None:  # the decode weights share the base's buffers
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
        bs = lambda nd: batch_sharding(mesh, DECODE_RULES, nd)  # noqa: E731
        args = (_abstract((rows, P), jnp.int32, bs(2)), _abstract((rows,), jnp.int32, bs(1)),
                _abstract((rows,), jnp.int32, bs(1)), _abstract((rows, 2), jnp.uint32, bs(2)),
                _abstract((rows,), jnp.int32, bs(1)))
        sp = dict(temperature=jnp.float32(1), top_p=jnp.float32(1), top_k=jnp.int32(0),
                  vocab_limit=jnp.int32(model.vocab_size),
                  stop_ids=np.full((sampler_mod.MAX_STOP_IDS,), -1, np.int32),
                  max_new_tokens=jnp.int32(new_tokens))
        sp = {k: _abstract(np.shape(v), np.asarray(v).dtype, repl) for k, v in sp.items()}
        gen = sampler_mod._compiled(dgraph, N, chunk, mesh)
        attempt("sampler generate", f"{rows} rows x {P} prompt + {N} new",
                lambda: gen.lower(dgraph, dstate, *args, sp).compile(), state_resident, state_what)
    else:
        slots = abstract_slots(model, rows, max_len, mesh)
        P = min(sampler_mod.bucket(prompt_len), max_len)
        chunk = min(512, P)
        if P % chunk:
            P = min(-(-P // chunk) * chunk, max_len)
            chunk = chunk if P % chunk == 0 else P
        M = rollout_rows(cfg, (d, f, t), cfg.rollout.engine_prefill_rows) if cfg.rollout.engine_prefill_rows else rows
        M = min(M, rows)
        bs = lambda nd: batch_sharding(mesh, DECODE_RULES, nd)  # noqa: E731
        new = abstract_new_rows(M, mesh)
        prefill = engine_mod._jitted_prefill(chunk, mesh)
        attempt("engine prefill", f"{M} rows (all unique) x {P} prompt into {rows} slots x {max_len}",
                lambda: prefill.lower(dgraph, dstate, slots, _abstract((M, P), jnp.int32, bs(2)),
                                      _abstract((M,), jnp.int32, bs(1)),
                                      _abstract((M,), jnp.int32, bs(1)),
                                      _abstract((M,), jnp.int32, bs(1)), new).compile(),
                state_resident, state_what)
        decode = engine_mod._jitted_decode(cfg.rollout.engine_decode_steps, mesh)
        attempt("engine decode", f"{rows} slots x {max_len}, {cfg.rollout.engine_decode_steps} steps/call",
                lambda: decode.lower(dgraph, dstate, slots, _abstract((), jnp.int32, repl),
                                     _abstract((), jnp.int32, repl)).compile(),
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
    report = CompileReport(config_name, name, target, mesh_shape, attention, programs, failures)
    if costs and layers is None and programs:
        say("counting costs per layer (1- and 2-layer compiles of the same programs) ...")
        _scale_costs(report, cfg, topology, model.num_layers, only)
        report.costs_scaled = True
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
    roofline = compiler = flops = 0.0
    for p in report.programs:
        roofline += p.calls_per_step * max(p.flops / tgt.peak_flops, p.bytes_accessed / tgt.hbm_bandwidth)
        compiler += p.calls_per_step * p.compiler_seconds
        flops += p.calls_per_step * p.flops
    mfu = lambda s: flops / (s * tgt.peak_flops) if s else 0.0  # noqa: E731
    return {"seconds": roofline, "compiler_seconds": compiler, "flops_per_device": flops,
            "mfu": mfu(roofline), "compiler_mfu": mfu(compiler)}


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
            "model_flops": total}


# ----------------------------------------------------------------------------------- printing
def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def format_report(report: CompileReport) -> str:
    """The table `memagent-jax compile` prints: one row per program."""
    tgt = report.target
    d, f, t = report.mesh
    lines = [f"{report.config or 'config'}: {report.model_name} on {tgt.topology} ({tgt.chips} chips, "
             f"{tgt.devices} devices x {tgt.hbm_bytes / GIB:.2f} GiB HBM); mesh data={d} fsdp={f} "
             f"tensor={t}; attention {report.attention}; budget {_gib(report.budget)} GiB per device "
             f"({HEADROOM:.0%} headroom)", "",
             f"{'program':<22} {'args':>7} {'out':>7} {'temp':>7} {'alias':>7} {'resident':>9} "
             f"{'peak':>7} {'TFLOP':>9} {'est. ms':>9} {'calls/step':>10} {'compile s':>9}  verdict   (GiB per device)"]
    for p in report.programs:
        lines.append(f"{p.name:<22} {_gib(p.arguments):>7} {_gib(p.outputs):>7} {_gib(p.temporaries):>7} "
                     f"{_gib(p.aliased):>7} {_gib(p.resident):>9} {_gib(p.peak):>7} "
                     f"{p.flops / 1e12:>9.2f} {p.compiler_seconds * 1e3:>9.2f} {p.calls_per_step:>10.0f} "
                     f"{p.compile_seconds:>9.1f}  "
                     f"{'FITS' if report.fits(p) else 'DOES NOT FIT'}")
    lines.append("  TFLOP, est. ms (the compiler's time estimate) per call: " + (
        "whole calls (loop bodies scaled by their trip counts)" if report.costs_scaled
        else "the compiler's cost analysis, each loop body once (--estimate counts whole calls)"))
    lines.append("")
    for p in report.programs:
        lines.append(f"  {p.name}: {p.shape}; resident besides its arguments: {p.resident_what}")
    for name, err in report.failures:
        lines.append(f"  {name}: DID NOT COMPILE: {err}")
    if report.programs and report.costs_scaled:
        est = step_estimate(report)
        rec = report.recipe or {}
        lines += ["", f"estimated RL step (upper-bound call counts): roofline of the compiler's FLOPs "
                      f"and bytes {est['seconds']:.0f} s (MFU {est['mfu']:.1%}); the compiler's own "
                      f"estimate {est['compiler_seconds']:.0f} s (MFU {est['compiler_mfu']:.1%})"]
        if rec:
            lines.append(f"  from the model's arithmetic instead: {rec['seconds']:.0f} s (compute-bound "
                         f"{rec['compute_seconds']:.0f} s + HBM-bound decode {rec['decode_seconds']:.0f} s) "
                         f"at 100% of peak; {rec['model_flops'] / report.target.devices / 1e12:.0f} TFLOP "
                         f"per device vs the compiler's {est['flops_per_device'] / 1e12:.0f}")
    lines.append("verdict: " + ("every program compiles and fits" if report.ok else "DOES NOT FIT"
                                if not report.failures else "a program did not compile"))
    return "\n".join(lines)


def report_json(report: CompileReport) -> dict[str, Any]:
    """The report as one JSON-able object (`--json`)."""
    tgt = report.target
    out = {"config": report.config, "model": report.model_name, "topology": tgt.topology,
           "chips": tgt.chips, "devices": tgt.devices, "hbm_bytes_per_device": tgt.hbm_bytes,
           "budget_bytes": report.budget, "mesh": dict(zip(MESH_AXES, report.mesh)),
           "attention": report.attention, "ok": report.ok,
           "programs": [dict(dataclasses.asdict(p), peak=p.peak, fits=report.fits(p))
                        for p in report.programs],
           "failures": [{"program": n, "error": e} for n, e in report.failures],
           "phase_peak_bytes": {"rollout": report.phase_peak("rollout"),
                                "train": report.phase_peak("train")}}
    if report.programs and report.costs_scaled:
        out["estimate"] = step_estimate(report)
        out["recipe_estimate"] = report.recipe
    return out


# ------------------------------------------------------------------------------------- the CLI
def add_compile_arguments(parser: Any) -> None:
    """Arguments of `memagent-jax compile CONFIG --topology T [key=value ...] [--json]`."""
    parser.add_argument("config", help="a YAML file or a name under configs/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    parser.add_argument("--topology", required=True,
                        help="TPU slice (v5p-32: 32 TensorCores = 16 chips; v5e-16, v6e-8: chips) "
                             "or topology string (v5p:2x2x4)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--estimate", action="store_true",
                        help="also estimate one RL step's seconds and MFU (compiles each program again "
                             "with 1 and 2 layers to count loop bodies: about 2x the time)")


def run_compile_cli(args: Any) -> int:
    """Compiles and prints the report; exit status 0 if every program compiles and fits, else 1."""
    import json
    import sys

    from memagent_jax.config import load_config
    from memagent_jax.tpu_topology import load_target

    load_target(args.topology)  # bad topology / no libtpu: exit 2 before reading the config
    cfg = load_config(args.config, list(args.overrides or []))
    progress = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    report = compile_rl_step(cfg, args.topology, config_name=str(args.config), progress=progress,
                             costs=args.estimate)
    print(json.dumps(report_json(report)) if args.json else format_report(report))
    return 0 if report.ok else 1
