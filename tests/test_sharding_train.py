"""The DAPO update on 8 simulated devices (data x fsdp x tensor) equals the single-device update."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "multidevice" / "train_step_checks.py"


@pytest.mark.slow  # ~35 s; tests/test_sharding.py runs the sharded checks on 8 devices in the default run
def test_sharded_train_step_equals_single_device(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                         " --xla_force_host_platform_device_count=8").strip()}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["max_param_diff"] < 1e-5, result
    g1, g8 = result["grad_norm"]
    assert abs(g1 - g8) < 1e-4 * max(1.0, g1) and g1 > 0
    assert any("tensor" in s for s in result["specs"]) and any("fsdp" in s for s in result["specs"])
