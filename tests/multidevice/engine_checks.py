"""Engine on 8 simulated CPU devices == the engine (and sampler.generate) on one device.

Run by tests/test_engine.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8;
prints one JSON line {check: {ok, error}}.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (tiny_policy)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import jax  # noqa: E402
import numpy as np  # noqa: E402

from memagent_jax import engine, sampler  # noqa: E402
from memagent_jax.models.sharding import MeshConfig, make_mesh  # noqa: E402
from tiny_policy import tiny_model  # noqa: E402

MESHES = {"d8": MeshConfig(data=8, fsdp=1, tensor=1), "d2_f2_t2": MeshConfig(data=2, fsdp=2, tensor=2)}


def check(name: str) -> None:
    mesh = make_mesh(MESHES[name])
    model = tiny_model(vocab_size=128, hidden_size=64, intermediate_size=128, num_heads=4,
                       num_kv_heads=2)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in [5, 17, 9, 30, 2, 11, 7, 21, 3, 14]]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=7, eos_ids=(5, 9))):
        ref = sampler.generate(model, prompts, max_new_tokens=10, **kw)
        one = engine.engine_generate(model, prompts, max_new_tokens=10, slots=4, decode_steps=4, **kw)
        out = engine.engine_generate(model, prompts, max_new_tokens=10, slots=4, decode_steps=4,
                                     mesh=mesh, **kw)
        for got in (one, out):
            assert got.tokens == ref.tokens, f"{kw}: {got.tokens} != {ref.tokens}"
            assert got.finish_reasons == ref.finish_reasons
            np.testing.assert_allclose(np.concatenate(got.logps), np.concatenate(ref.logps), atol=1e-4)


if __name__ == "__main__":
    assert jax.device_count() == 8, f"expected 8 simulated devices, got {jax.devices()}"
    results = {}
    for n in MESHES:
        try:
            check(n)
            results[n] = {"ok": True, "error": None}
        except Exception:
            results[n] = {"ok": False, "error": traceback.format_exc()}
    print(json.dumps(results))
