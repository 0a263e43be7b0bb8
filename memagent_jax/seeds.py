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


_fold_in_rows = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))


def derive_rows(seed: Seed, rows: np.ndarray) -> np.ndarray:
    """`derive(seed, r)` for every r in `rows` in one device call: keys [len(rows), 2] (the
    rows padded to a power of two: few programs). The engine's rollout takes its requests' keys
    from here up front, so that submitting a request never waits on the device."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    if rows.size and not (0 <= rows.min() and rows.max() < 2**32):
        raise ValueError(f"stream indices must be in [0, 2**32), got {rows.min()}..{rows.max()}")
    padded = np.zeros((1 << max(0, int(rows.size) - 1).bit_length(),), np.uint32)
    padded[: rows.size] = rows
    return np.asarray(_fold_in_rows(as_key(seed), padded), np.uint32)[: rows.size]
