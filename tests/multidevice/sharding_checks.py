"""Multi-device checks on 8 simulated CPU devices; run by tests/test_sharding.py in a subprocess.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python sharding_checks.py CKPT_DIR [QWEN3_DIR]
CKPT_DIR is a tiny HF Qwen2 checkpoint (4 heads, 2 kv heads, hidden 64, mlp 128, vocab 128);
QWEN3_DIR, when given, a tiny Qwen3 one of the same shape with head_dim 24 and q/k norm, which
gets a smaller set of checks (one forward mesh, its weight layouts, one sampler mesh).
Each check runs independently; the last stdout line is one JSON object
{check name: {"ok": bool, "error": traceback or null}}.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from memagent_jax import models, sampler  # noqa: E402
from memagent_jax.models.sharding import (  # noqa: E402
    DECODE_RULES, TRAIN_RULES, MeshConfig, batch_sharding, make_mesh, param_shardings,
)
from memagent_jax.models.transformer import param_logical_axes, param_shapes  # noqa: E402

CKPTS = {"qwen2": Path(sys.argv[1])}
if len(sys.argv) > 2:
    CKPTS["qwen3"] = Path(sys.argv[2])
CKPT = CKPTS["qwen2"]
BATCH = 8
FORWARD_MESHES = {"d1_f4_t2": MeshConfig(data=1, fsdp=4, tensor=2),
                  "d2_f4_t1": MeshConfig(data=2, fsdp=4, tensor=1)}
SAMPLER_MESHES = {"d2_f2_t2": MeshConfig(data=2, fsdp=2, tensor=2),
                  "d8": MeshConfig(data=8, fsdp=1, tensor=1)}
PROMPT_LENS = [5, 17, 9, 30, 2]  # 5 rows: the sampler pads the batch to its shard multiple


def _padded(spec: P, ndim: int) -> tuple:
    """A PartitionSpec as a full-length tuple with 1-tuples unwrapped (for comparison)."""
    out = [a[0] if isinstance(a, tuple) and len(a) == 1 else a for a in spec]
    return tuple(out) + (None,) * (ndim - len(out))


def _forward(model: nnx.Module, ids: jax.Array) -> np.ndarray:
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    return np.asarray(fwd(state, ids))


def _mesh_model(name: str, arch: str = "qwen2") -> tuple[jax.sharding.Mesh, nnx.Module]:
    mesh = make_mesh(FORWARD_MESHES[name])
    return mesh, models.from_pretrained(CKPTS[arch], mesh=mesh)


IDS = np.random.default_rng(0).integers(0, 128, size=(BATCH, 24)).astype(np.int32)
_singles: dict[str, nnx.Module] = {}
_loaded: dict[tuple[str, str], tuple] = {}


def _single_model(arch: str = "qwen2") -> nnx.Module:
    """The checkpoint on one device: the reference of every sharded result."""
    if arch not in _singles:
        _singles[arch] = models.from_pretrained(CKPTS[arch],
                                                mesh=make_mesh(devices=jax.devices()[:1]))
    return _singles[arch]


_single = _single_model()


def _cached(name: str, arch: str = "qwen2") -> tuple:
    if (arch, name) not in _loaded:
        _loaded[(arch, name)] = _mesh_model(name, arch)
    return _loaded[(arch, name)]


def check_forward(name: str, arch: str = "qwen2") -> None:
    """Sharded forward (batch over data x fsdp, weights by TRAIN_RULES) == 1-device forward."""
    mesh, model = _cached(name, arch)
    ids = jax.device_put(IDS, batch_sharding(mesh))
    assert _padded(ids.sharding.spec, 2) == (("data", "fsdp"), None), ids.sharding.spec
    assert len(ids.addressable_shards) == 8
    got = _forward(model, ids)
    want = _forward(_single_model(arch), jnp.asarray(IDS))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{arch} mesh {name}")


def check_param_specs(name: str, arch: str = "qwen2") -> None:
    """Every weight's NamedSharding is what TRAIN_RULES implies; shard shapes match."""
    mesh, model = _cached(name, arch)
    cfg = model.config
    _, state = nnx.split(model)
    values = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    axes, shapes = param_logical_axes(cfg), param_shapes(cfg)
    assert set(values) == set(axes), (sorted(values), sorted(axes))
    bad = []
    for path, names in axes.items():
        arr = values[path]
        want = tuple(None if n is None else TRAIN_RULES[n] for n in names)
        got = _padded(arr.sharding.spec, arr.ndim)
        if arr.sharding.mesh.shape != mesh.shape or got != want:
            bad.append(f"{path} {names}: spec {got}, expected {want}")
        shard = tuple(s // (1 if a is None else mesh.shape[a]) for s, a in zip(shapes[path], want))
        if {tuple(s.data.shape) for s in arr.addressable_shards} != {shard}:
            bad.append(f"{path}: shard shapes {[s.data.shape for s in arr.addressable_shards]}, "
                       f"expected {shard}")
    assert not bad, "\n".join(bad)
    q = values["layers/q_proj"]
    L, D, Q = q.shape
    assert _padded(q.sharding.spec, 3) == (None, "fsdp", "tensor")
    f, t = mesh.shape["fsdp"], mesh.shape["tensor"]
    assert all(s.data.shape == (L, D // f, Q // t) for s in q.addressable_shards)
    # The sampler's layout drops fsdp from weights.
    dec = param_shardings(cfg, mesh, DECODE_RULES)["layers/q_proj"]
    assert _padded(dec.spec, 3) == (None, None, "tensor"), dec.spec
    if cfg.qk_norm:  # Qwen3's q/k norm weights [layers, head_dim] are replicated, whole
        for path in ("layers/q_norm", "layers/k_norm"):
            arr = values[path]
            assert _padded(arr.sharding.spec, 2) == (None, None), (path, arr.sharding.spec)
            assert all(s.data.shape == (cfg.num_layers, cfg.head_dim)
                       for s in arr.addressable_shards)


def check_sampler(name: str, arch: str = "qwen2") -> None:
    """Greedy and seeded temperature-1 sampling on the mesh == single device, token for token."""
    mesh = make_mesh(SAMPLER_MESHES[name])
    single = _single_model(arch)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in PROMPT_LENS]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=7)):
        ref = sampler.generate(single, prompts, max_new_tokens=10, **kw)
        out = sampler.generate(single, prompts, max_new_tokens=10, mesh=mesh, **kw)
        assert out.tokens == ref.tokens, f"{kw}: {out.tokens} != {ref.tokens}"
        assert out.finish_reasons == ref.finish_reasons
        np.testing.assert_allclose(np.concatenate(out.logps), np.concatenate(ref.logps), atol=1e-4)


def check_bad_mesh_device_count() -> None:
    try:
        make_mesh(MeshConfig(data=3))
    except ValueError as e:
        assert "3" in str(e) and "8 devices" in str(e), str(e)
    else:
        raise AssertionError("MeshConfig(data=3) on 8 devices did not raise")


def check_bad_mesh_kv_heads() -> None:
    """tensor=4 cannot split 2 kv heads: loading and generating both name the weight and axis."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    for call in (lambda: models.from_pretrained(CKPT, mesh=mesh),
                 lambda: sampler.generate(_single, [[1, 2]], max_new_tokens=2, mesh=mesh)):
        try:
            call()
        except ValueError as e:
            msg = str(e)
            assert "kv_heads" in msg and "tensor" in msg and "k_proj" in msg, msg
        else:
            raise AssertionError("tensor=4 with 2 kv heads did not raise")


def check_paged_decode_on_tpu_layout(name: str) -> None:
    """Programs traced for a TPU (rows cache, the Pallas paged kernel in interpret mode): the
    kernel runs per shard (rows over the batch axes, kv heads over tensor) and a bf16 model's
    greedy tokens on the mesh equal the single device's, token for token."""
    import memagent_jax.models.platform as platform_module
    from memagent_jax.models.attention import head_major_attention
    from memagent_jax.models.paged_attention import paged_decode_attention
    from memagent_jax.models.sharding import mesh_context

    mesh = make_mesh(SAMPLER_MESHES[name])
    real = platform_module.target_platform
    platform_module.target_platform = lambda: "tpu"
    jax.clear_caches()
    try:
        rng = np.random.default_rng(4)
        L, B, K, S, H, hd = 2, 4, 2, 64, 4, 16
        k, v = (jnp.asarray(rng.normal(size=(L, B, K, S, hd)), jnp.bfloat16) for _ in range(2))
        q = jnp.asarray(rng.normal(size=(B, 1, H, hd)), jnp.bfloat16)
        lengths = jnp.asarray([5, 64, 17, 30], jnp.int32)
        with mesh_context(mesh):
            program = jax.jit(paged_decode_attention)
            assert "shard_map" in str(program.trace(q, k, v, jnp.int32(1), lengths).jaxpr)
            got = program(q, k, v, jnp.int32(1), lengths)
        mask = jnp.arange(S)[None, None, :] < lengths[:, None, None]
        ref = head_major_attention(q.astype(jnp.float32), k[1].astype(jnp.float32),
                                   v[1].astype(jnp.float32), mask)
        np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=3e-2, rtol=3e-2)
        single = models.from_pretrained(CKPT, dtype=jnp.bfloat16)
        prompts = [rng.integers(3, 128, size=n).tolist() for n in PROMPT_LENS]
        ref_out = sampler.generate(single, prompts, max_new_tokens=6)
        out = sampler.generate(single, prompts, max_new_tokens=6, mesh=mesh)
        assert out.tokens == ref_out.tokens, f"{out.tokens} != {ref_out.tokens}"
    finally:
        platform_module.target_platform = real
        jax.clear_caches()


CHECKS = {
    "paged_decode_d2_f2_t2": lambda: check_paged_decode_on_tpu_layout("d2_f2_t2"),
    **{f"forward_{n}": (lambda n=n: check_forward(n)) for n in FORWARD_MESHES},
    **{f"param_specs_{n}": (lambda n=n: check_param_specs(n)) for n in FORWARD_MESHES},
    **{f"sampler_{n}": (lambda n=n: check_sampler(n)) for n in SAMPLER_MESHES},
    "bad_mesh_device_count": check_bad_mesh_device_count,
    "bad_mesh_kv_heads": check_bad_mesh_kv_heads,
}
if "qwen3" in CKPTS:  # a small parameterization: one mesh per kind of check
    CHECKS.update({
        "qwen3_forward_d1_f4_t2": lambda: check_forward("d1_f4_t2", "qwen3"),
        "qwen3_param_specs_d1_f4_t2": lambda: check_param_specs("d1_f4_t2", "qwen3"),
        "qwen3_sampler_d2_f2_t2": lambda: check_sampler("d2_f2_t2", "qwen3"),
    })

if __name__ == "__main__":
    assert jax.device_count() == 8, f"expected 8 simulated devices, got {jax.devices()}"
    results = {}
    for check_name, fn in CHECKS.items():
        try:
            fn()
            results[check_name] = {"ok": True, "error": None}
        except Exception:  # report every failure, keep running the others
            results[check_name] = {"ok": False, "error": traceback.format_exc()}
    print(json.dumps(results))
