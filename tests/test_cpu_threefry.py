"""The unrolled threefry lowering on CPU (cpu_threefry.py): the same bits as JAX's rolled one,
and no while loop left in a program that draws noise."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np

DRAW = ("import jax, numpy as np; k = jax.random.fold_in(jax.random.key(7), 3); "
        "print(np.asarray(jax.jit(lambda k: jax.random.gumbel(k, (5, 33)))(k)).tobytes().hex())")


def test_unrolled_threefry_draws_the_same_bits_without_a_loop() -> None:
    from memagent_jax import sampler  # noqa: F401  (registers the lowering on import)
    from memagent_jax.cpu_threefry import unroll_on_cpu

    assert unroll_on_cpu()
    rolled = subprocess.run([sys.executable, "-c", DRAW], capture_output=True, text=True, check=True)
    key = jax.random.fold_in(jax.random.key(7), 3)
    draw = jax.jit(lambda k: jax.random.gumbel(k, (5, 33)))
    assert np.asarray(draw(key)).tobytes().hex() == rolled.stdout.strip()
    assert "while" not in draw.lower(key).compile().as_text()
