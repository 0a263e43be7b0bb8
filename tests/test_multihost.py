"""Two local processes x 4 CPU devices (jax.distributed + gloo) run one full RL step and a
checkpoint save/restore; the final weights equal a single-process 8-device run, greedy and
sampled (T = 1: every row's random stream is keyed by its row over all processes)."""

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


def _two_processes(tmp_path, engine: str, temperature: float = 0.0) -> list[dict]:
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), str(i), "2", port, engine,
                               str(temperature)],
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def _one_process(tmp_path, engine: str, temperature: float = 0.0) -> dict:
    ref = subprocess.run([sys.executable, str(WORKER), str(tmp_path), "0", "1", "0", engine,
                          str(temperature)], env=_env(8),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-4000:]
    return json.loads(ref.stdout.strip().splitlines()[-1])


def test_two_processes_equal_one_process(tmp_path):
    multi = _two_processes(tmp_path, "static")[0]
    single = _one_process(tmp_path, "static")
    assert multi["restore_equal"] and single["restore_equal"] and multi["meta_step"] == 1
    # 4 documents, 2 all-correct groups filtered out: 2 groups x 4 members kept.
    assert multi["kept"] == single["kept"] == 8
    assert multi["conversations"] == single["conversations"]
    assert multi["moved"] > 1e-3 and abs(multi["moved"] - single["moved"]) < 1e-6  # a real update
    assert multi["sampled"] == single["sampled"]
    _assert_same_params(tmp_path / "params_2proc_static_t0.0.npz", tmp_path / "params_1proc_static_t0.0.npz")


def _assert_same_params(path_a, path_b) -> None:
    a, b = np.load(path_a), np.load(path_b)
    assert len(a.files) == len(b.files) > 0
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=0)


def test_two_processes_on_the_continuous_engine_equal_one_process_sampled(tmp_path):
    """rollout.engine=continuous across 2 processes (2 slots each, 2 decode steps per call, so
    slots refill) at temperature 1: both processes join every engine call, and the step samples
    the same tokens and ends with the same weights as one process on the engine, as the static
    sampler on one process and on two (row keys are global: process 1's rows follow process 0's,
    and the processes hold different numbers of rows at turns 1 and 2)."""
    first, second = _two_processes(tmp_path, "continuous", 1.0)
    assert first["engine_calls"] == second["engine_calls"] and first["engine_calls"][1] > 3
    single = _one_process(tmp_path, "continuous", 1.0)
    static = _one_process(tmp_path, "static", 1.0)
    static_2proc = _two_processes(tmp_path, "static", 1.0)[0]
    greedy = _one_process(tmp_path, "static", 0.0)
    assert first["restore_equal"] and first["kept"] == single["kept"] == static["kept"] == 8
    assert first["conversations"] == single["conversations"] == static["conversations"]
    assert first["sampled"] == single["sampled"] == static["sampled"] == static_2proc["sampled"]
    assert first["sampled"] != greedy["sampled"]  # the noise is used
    assert abs(first["moved"] - static["moved"]) < 1e-6
    for other in ("1proc_continuous", "1proc_static", "2proc_static"):
        _assert_same_params(tmp_path / "params_2proc_continuous_t1.0.npz",
                            tmp_path / f"params_{other}_t1.0.npz")
