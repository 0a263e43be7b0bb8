"""`memagent-jax plan`: the command line over plan.py (formulas) and, with --topology and libtpu,
compile.py (the TPU compiler)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from memagent_jax.config import load_config
from memagent_jax.errors import InputError
from memagent_jax.plan import GIB, PlanReport, check_devices, fmt_gib, format_plan, plan


def compare_line(formulas: PlanReport, compiled: Any) -> str:
    """`plan` (formulas) vs the compiler's phase peaks, per device: one line."""
    parts = []
    for phase, mine in (("train", formulas.train.total), ("rollout", formulas.rollout.total)):
        theirs = compiled.phase_peak(phase)
        parts.append(f"{phase} {fmt_gib(mine)} vs {fmt_gib(theirs)} GiB "
                     f"({(mine / theirs - 1) if theirs else 0:+.1%})")
    return "formulas vs compiler: " + "; ".join(parts)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `memagent-jax plan CONFIG [key=value ...] (--devices N --hbm-gib G | --topology T)`."""
    parser.add_argument("config", help="a YAML file or a name under configs/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    parser.add_argument("--devices", type=int, default=None, help="number of accelerators")
    parser.add_argument("--hbm-gib", type=float, default=None, help="memory per accelerator, GiB")
    parser.add_argument("--topology", default=None,
                        help="a TPU slice or topology (v5p-32, v5p:2x2x4): with libtpu installed the "
                             "figures come from the TPU compiler (`memagent-jax compile`), else from "
                             "the formulas with that slice's devices and HBM")


def run_plan_cli(args: argparse.Namespace) -> int:
    """Prints the plan table; exit status 0 if both phases fit, 1 if not. With --topology and
    libtpu installed, the phase totals are the TPU compiler's (the line `source:` says which)."""
    if args.topology:
        from memagent_jax.tpu_topology import KINDS, parse_topology

        kind, shape = parse_topology(args.topology)
        chips = math.prod(shape)
        try:
            import libtpu  # noqa: F401
        except ImportError:
            per_chip = 2 if kind.name in ("v4", "tpu7x") else 1  # devices per chip (tpu_topology)
            args.devices = chips * per_chip
            args.hbm_gib = KINDS[kind.name].hbm_gib_per_chip / per_chip
            print("source: formulas (libtpu not installed: pip install 'libtpu==0.0.42.*' to ask "
                  "the TPU compiler)")
        else:
            from memagent_jax.compile import compile_rl_step
            from memagent_jax.compile_cli import format_report

            cfg = load_config(args.config, list(args.overrides or []))
            report = compile_rl_step(cfg, args.topology, config_name=str(args.config))
            print("source: the TPU compiler (libtpu), per-device peaks of every program")
            print(format_report(report))
            formulas = plan(cfg, report.target.devices, report.target.hbm_bytes / GIB,
                            mesh=report.mesh, suggest=False)
            print(compare_line(formulas, report))
            return 0 if report.ok else 1
    if args.devices is None or args.hbm_gib is None:
        raise InputError("plan needs the accelerators", None,
                         "pass --devices N --hbm-gib G, or --topology T for a TPU slice")
    check_devices(args.devices, args.hbm_gib)  # before reading any config
    report = plan(load_config(args.config, list(args.overrides or [])), args.devices, args.hbm_gib)
    print(format_plan(report))
    print("source: formulas (--topology T with libtpu installed asks the TPU compiler)")
    return 0 if report.fits else 1
