"""Threefry random bits on CPU without a rolled loop inside every sampling step.

JAX lowers its threefry2x32 hash on CPU as a `fori_loop` of 5 rolled iterations (short compiles),
elsewhere unrolled. Inside a decode loop that draws Gumbel noise at every step, the two rolled
loops per step (the key's fold-in and the noise's bits) cost XLA:CPU a while-loop dispatch per
iteration: ~9% of a sampled engine rollout (bench/rollout_engine.py's model, 2-core AMD EPYC:
2.30 -> 2.07 s per rollout). `unroll_on_cpu` registers JAX's own unrolled lowering for CPU too:
the same hash, the same bits (tests/test_cpu_threefry.py), a larger program.

It uses JAX internals (`jax._src`); where a JAX release moved them, it leaves the lowering alone
(slower sampling on CPU, the same results) instead of failing.
"""

from __future__ import annotations

import functools


@functools.cache
def unroll_on_cpu() -> bool:
    """Registers the unrolled threefry2x32 lowering for CPU (once per process); returns whether
    it did (False: this JAX release keeps its internals elsewhere, the rolled lowering stays)."""
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32 as threefry
    except ImportError:
        return False
    rule = getattr(threefry, "_threefry2x32_lowering_rule", None)
    primitive = getattr(threefry, "threefry2x32_p", None)
    if rule is None or primitive is None:
        return False
    mlir.register_lowering(primitive, rule, platform="cpu")
    return True
