"""`memagent-jax compile`: the report of `compile.compile_rl_step` as a table or one JSON
object, and the command's arguments."""

from __future__ import annotations

import dataclasses
from typing import Any

from memagent_jax.compile import GIB, CompileReport, compile_rl_step, step_estimate
from memagent_jax.models.sharding import MESH_AXES
from memagent_jax.plan import HEADROOM


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def format_report(report: CompileReport) -> str:
    """The table `memagent-jax compile` prints: one row per program."""
    tgt = report.target
    d, f, t = report.mesh
    lines = [f"{report.config or 'config'}: {report.model_name} on {tgt.topology} ({tgt.chips} chips, "
             f"{tgt.devices} devices x {tgt.hbm_bytes / GIB:.2f} GiB HBM); mesh data={d} fsdp={f} "
             f"tensor={t}; attention {report.attention}; budget {_gib(report.budget)} GiB per device "
             f"({HEADROOM:.0%} headroom)", *_split_line(report), "",
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
                      f"estimate {est['compiler_seconds']:.0f} s (MFU {est['compiler_mfu']:.1%})",
                  f"  rollout programs {est['rollout_seconds']:.0f} s, train programs "
                  f"{est['train_seconds']:.0f} s (the compiler's: {est['rollout_compiler_seconds']:.0f} / "
                  f"{est['train_compiler_seconds']:.0f} s); "
                  + ("async: each on its own devices, the step is the slower one" if report.rollout_mesh
                     else "sync: one after the other")]
        if rec:
            lines.append(f"  from the model's arithmetic instead: {rec['seconds']:.0f} s (compute-bound "
                         f"{rec['compute_seconds']:.0f} s + HBM-bound decode {rec['decode_seconds']:.0f} s) "
                         f"at 100% of peak; {rec['model_flops'] / report.target.devices / 1e12:.0f} TFLOP "
                         f"per device vs the compiler's {est['flops_per_device'] / 1e12:.0f}")
    lines.append("verdict: " + ("every program compiles and fits" if report.ok else "DOES NOT FIT"
                                if not report.failures else "a program did not compile"))
    return "\n".join(lines)


def _split_line(report: CompileReport) -> list[str]:
    if report.rollout_mesh is None:
        return []
    d, f, t = report.rollout_mesh
    train = report.target.devices - report.rollout_devices
    return [f"rollout.mode async: rollout programs on {report.rollout_devices} devices (mesh data={d} "
            f"fsdp={f} tensor={t}), training on the other {train} (the mesh above)"]


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
    if report.rollout_mesh is not None:
        out["rollout_mesh"] = dict(zip(MESH_AXES, report.rollout_mesh))
        out["rollout_devices"] = report.rollout_devices
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
