"""Two local processes x 4 CPU devices (jax.distributed + gloo) run one full RL step and a
checkpoint save/restore; the final weights equal a single-process 8-device run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).resolve().parent / "multidevice" / "multihost_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def test_two_processes_equal_one_process(tmp_path):
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), str(i), "2", port],
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    multi = json.loads(outs[0][0].strip().splitlines()[-1])
    ref = subprocess.run([sys.executable, str(WORKER), str(tmp_path), "0", "1", "0"], env=_env(8),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-4000:]
    single = json.loads(ref.stdout.strip().splitlines()[-1])
    assert multi["restore_equal"] and single["restore_equal"] and multi["meta_step"] == 1
    # 4 documents, 2 all-correct groups filtered out: 2 groups x 4 members kept.
    assert multi["kept"] == single["kept"] == 8
    assert multi["conversations"] == single["conversations"]
    assert multi["moved"] > 1e-3 and abs(multi["moved"] - single["moved"]) < 1e-6  # a real update
    a = np.load(tmp_path / "params_2proc.npz")
    b = np.load(tmp_path / "params_1proc.npz")
    assert len(a.files) == len(b.files) > 0
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=0)
