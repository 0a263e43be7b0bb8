"""Sharding on 8 simulated CPU devices: sharded forward and sampler equal one device, weight
layouts follow the rules table, bad meshes fail clearly; for Qwen2 and (fewer checks) Qwen3.

JAX fixes its device count at import, so the checks run in one subprocess
(tests/multidevice/sharding_checks.py) with XLA_FLAGS set; each test below asserts one of the
results it prints. Single-process rules-table checks run here directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memagent_jax.models import ModelConfig
from memagent_jax.models.sharding import MeshConfig, TRAIN_RULES, logical_to_spec

SCRIPT = Path(__file__).resolve().parent / "multidevice" / "sharding_checks.py"
CHECKS = [
    "forward_d1_f4_t2", "forward_d2_f4_t1", "param_specs_d1_f4_t2", "param_specs_d2_f4_t1",
    "sampler_d2_f2_t2", "sampler_d8", "paged_decode_d2_f2_t2", "bad_mesh_device_count", "bad_mesh_kv_heads",
    "qwen3_forward_d1_f4_t2", "qwen3_param_specs_d1_f4_t2", "qwen3_sampler_d2_f2_t2",
]
TINY_SHARDABLE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def multidevice_results(tmp_path_factory):
    """Runs every multi-device check once in an 8-device subprocess; name -> {ok, error}."""
    from hf_models import save_hf_model

    ckpt = tmp_path_factory.mktemp("shardable")
    save_hf_model("qwen2", ckpt, **TINY_SHARDABLE)
    qwen3 = tmp_path_factory.mktemp("shardable_qwen3")
    save_hf_model("qwen3", qwen3, **TINY_SHARDABLE)  # head_dim 24, q/k norm
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                         " --xla_force_host_platform_device_count=8").strip()}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(ckpt), str(qwen3)], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"multi-device script failed (rc={proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1])


def test_script_ran_every_check(multidevice_results):
    assert sorted(multidevice_results) == sorted(CHECKS)


@pytest.mark.parametrize("name", CHECKS)
def test_multidevice(multidevice_results, name):
    result = multidevice_results[name]
    assert result["ok"], f"{name} failed in the 8-device subprocess:\n{result['error']}"


def test_rules_table_maps_logical_axes():
    spec = logical_to_spec(("layers", "embed", "heads"), TRAIN_RULES)
    assert tuple(spec) == (None, "fsdp", "tensor")
    with pytest.raises(KeyError, match="no rule"):
        logical_to_spec(("nonsense",), TRAIN_RULES)


@pytest.mark.parametrize("cfg, devices, sizes", [
    (MeshConfig(), 8, (1, 8, 1)),
    (MeshConfig(data=2, tensor=2), 8, (2, 2, 2)),
    (MeshConfig(data=-1, fsdp=2, tensor=1), 8, (4, 2, 1)),
])
def test_mesh_config_resolves(cfg, devices, sizes):
    assert cfg.resolve(devices) == sizes


@pytest.mark.parametrize("cfg, match", [
    (MeshConfig(data=3), "does not divide the 8 devices"),
    (MeshConfig(data=2, fsdp=2, tensor=1), "uses 4 devices but 8"),
    (MeshConfig(data=-1, fsdp=-1), "at most one axis"),
    (MeshConfig(data=0), "positive"),
])
def test_bad_mesh_config_is_a_clear_error(cfg, match):
    with pytest.raises(ValueError, match=match):
        cfg.resolve(8)


def test_head_count_checked_even_when_flat_dim_divides():
    """2 kv heads x 16 dims = 32 divides tensor=4, but it would split heads: rejected."""
    from types import SimpleNamespace

    from memagent_jax.models.sharding import param_shardings

    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    mesh = SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 4})
    with pytest.raises(ValueError, match=r"'layers/k_proj'.*'kv_heads' \(2 heads\).*'tensor'"):
        param_shardings(cfg, mesh)
