"""Random streams: every sampling key derives from one seed through `jax.random.fold_in`.

A seed is an int (`--seed`, `trainer.seed`) or a PRNG key (uint32[2] key data) derived from one.
`derive(seed, *path)` folds each entry of `path` into the seed's key in turn: the trainer derives a
generation batch's seed from (seed, RL step, batch), the rollout a turn's from (batch seed, turn),
the sampler a row's from (turn seed, global row). Distinct paths give unrelated streams; adding
integers did not (seed + k of one batch was seed' + k' of another).
"""

from __future__ import annotations

from typing import Union

import jax
import numpy as np

#: An int seed or a PRNG key's data (uint32[2]); what `generate_fn(..., seed=...)` receives.
Seed = Union[int, np.integer, np.ndarray]


def as_key(seed: Seed) -> np.ndarray:
    """The key data (uint32[2]) of `seed`: `PRNGKey(seed)` for an int, the key itself for a key."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        if not 0 <= int(seed) < 2**32:
            raise ValueError(f"seed={seed} must be in [0, 2**32) (a larger int would be cut to "
                             "32 bits and repeat another seed's stream); pick a smaller seed")
        return np.asarray(jax.random.PRNGKey(int(seed)), np.uint32)
    key = np.asarray(seed)
    if key.shape != (2,) or key.dtype != np.uint32:
        raise ValueError(f"seed must be an int or a PRNG key's uint32[2] data "
                         f"(memagent_jax.seeds.derive), got {type(seed).__name__} "
                         f"{getattr(key, 'dtype', '')}{list(key.shape)}")
    return key


_fold_in = jax.jit(jax.random.fold_in)  # one dispatch per fold (called per engine request)


def derive(seed: Seed, *path: int) -> np.ndarray:
    """The key of stream `path` under `seed`: fold_in(... fold_in(as_key(seed), path[0]) ...)."""
    key = as_key(seed)
    for p in path:
        if not 0 <= int(p) < 2**32:
            raise ValueError(f"stream index {p} must be in [0, 2**32)")
        key = _fold_in(key, np.uint32(p))
    return np.asarray(key, np.uint32)
