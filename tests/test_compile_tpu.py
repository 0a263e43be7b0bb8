"""`memagent-jax compile`: every program of an RL step AOT-compiles for a TPU topology on this CPU
host (libtpu + jax.experimental.topologies; splash goes through Mosaic for real), the report's
figures are the compiler's, and `plan`'s phase totals agree with them.

Skipped, with the reason, where libtpu is not installed (it comes with the [test] extra).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

libtpu = pytest.importorskip("libtpu", reason="libtpu not installed (pip install 'libtpu==0.0.42.*', "
                                               "part of memagent-jax[test])")

from memagent_jax.errors import InputError  # noqa: E402
from memagent_jax.tpu_topology import parse_topology  # noqa: E402

# A small policy on v5p:2x2x1 (4 chips) with fsdp 2 x tensor 2, in the shipped configs' regime:
# fp32 master weights, bf16 compute, full remat, head_dim 128 (the splash kernel's lane width),
# micro-batches of 16K tokens per device, and engine slots whose KV cache is the largest rollout
# item (as in qwen2_5_7b_memagent_v5p32: 42 of 63 GiB).
TINY = ["model.path=", "model.vocab_size=32768", "model.hidden_size=1024", "model.intermediate_size=5632",
        "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=2", "mesh.data=1", "mesh.fsdp=2",
        "mesh.tensor=2", "model.param_dtype=float32", "model.dtype=bfloat16", "model.remat=full",
        "agent.chunk_size=3584", "agent.max_memory_tokens=64", "agent.question_budget=64",
        "agent.max_final_new_tokens=32", "rl.micro_batch_tokens=32768", "rl.gen_batch_size=16",
        "rollout.group_size=16", "rollout.max_rows_per_call=256", "rollout.engine_prefill_rows=8",
        "rl.train_batch_size=16", "rl.mini_batch_size=8", "rl.kl_coef=0.001"]
WITHIN = 0.10  # plan's formulas vs the compiler, per phase


def _compile_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memagent_jax", "compile", *args],
                          capture_output=True, text=True, timeout=600)


def test_every_program_of_a_tiny_qwen3_compiles_for_v5p() -> None:
    out = _compile_cli("memagent", "--topology", "v5p:2x2x1", "--json", *TINY, "model.architecture=qwen3")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout)
    names = [p["name"] for p in report["programs"]]
    assert names == ["engine prefill", "engine decode", "log-prob pass", "micro-batch gradient",
                     "accumulate", "optimizer update"]
    assert report["failures"] == [] and report["ok"]
    assert report["attention"] == "splash"  # auto resolves by the target (TPU), not the CPU host
    assert report["devices"] == 4 and report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    grad = next(p for p in report["programs"] if p["name"] == "micro-batch gradient")
    assert grad["flops"] > 0 and grad["temporaries"] > 0 and grad["arguments"] > 0
    # the gradients come out sharded like the weights (fsdp x tensor), not fsdp-replicated
    acc = next(p for p in report["programs"] if p["name"] == "accumulate")  # arguments: 2 x weights
    assert grad["outputs"] <= 0.55 * acc["arguments"]
    assert report["phase_peak_bytes"]["train"] == max(
        p["peak"] for p in report["programs"] if p["name"] not in ("engine prefill", "engine decode"))

    from memagent_jax.config import load_config
    from memagent_jax.plan import plan

    formulas = plan(load_config("memagent", TINY + ["model.architecture=qwen3"]), 4, 95.74, suggest=False)
    for phase, total in (("train", formulas.train.total), ("rollout", formulas.rollout.total)):
        compiled = report["phase_peak_bytes"][phase]
        assert abs(total / compiled - 1) <= WITHIN, (phase, total, compiled)


@pytest.mark.slow  # ~110 s on 2 cores: a second set of compiles of the tiny policy
def test_async_split_compiles_rollout_and_train_on_their_own_devices() -> None:
    """rollout.mode=async with mesh.rollout_devices=4 on v5p:2x2x2: the rollout programs compile
    on 4 chips (fsdp 2 x tensor 2), the train programs on the other 4, and the rollout programs
    count the incoming weight version as resident (the switch holds two copies)."""
    out = _compile_cli("memagent", "--topology", "v5p:2x2x2", "--json", *TINY, "model.architecture=qwen2",
                       "rollout.mode=async", "mesh.rollout_devices=4", "mesh.rollout_data=1",
                       "mesh.rollout_fsdp=2", "mesh.rollout_tensor=2")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["ok"] and report["rollout_devices"] == 4
    assert report["rollout_mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    decode = next(p for p in report["programs"] if p["name"] == "engine decode")
    assert "incoming weight version" in decode["resident_what"] and decode["resident"] > 0
    # the resident copy is the decode weights: the same bytes as the program's weight arguments
    grad = next(p for p in report["programs"] if p["name"] == "micro-batch gradient")
    assert "AdamW" in grad["resident_what"]


@pytest.mark.slow  # ~45 s on 2 cores (the tiny Qwen3 compile test covers the compiler in the default run)
def test_plan_with_a_topology_uses_the_compiler_for_a_tiny_qwen2() -> None:
    out = subprocess.run([sys.executable, "-m", "memagent_jax", "plan", "memagent", "--topology",
                          "v5p:2x2x1", *TINY, "model.architecture=qwen2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "source: the TPU compiler (libtpu)" in out.stdout
    assert "verdict: every program compiles and fits" in out.stdout
    for program in ("engine prefill", "engine decode", "micro-batch gradient", "optimizer update"):
        assert program in out.stdout
    # formulas vs compiler: train A vs B GiB (+x.x%); rollout C vs D GiB (+y.y%)
    line = next(x for x in out.stdout.splitlines() if x.startswith("formulas vs compiler:"))
    gaps = [float(g) / 100 for g in re.findall(r"\(([+-][0-9.]+)%\)", line)]
    assert len(gaps) == 2 and all(abs(g) <= WITHIN for g in gaps), line


def test_topology_names_and_errors() -> None:
    assert parse_topology("v5p-32")[1] == (2, 2, 4)  # 32 TensorCores = 16 chips
    assert parse_topology("v5p-64")[1] == (2, 4, 4)
    assert parse_topology("v6e-8")[1] == (2, 4)  # v6e counts chips
    assert parse_topology("v5p:2x2x1")[1] == (2, 2, 1)
    with pytest.raises(InputError, match="not a known TPU"):
        parse_topology("v9-8")
    with pytest.raises(InputError, match="no standard v5p slice"):
        parse_topology("v5p-6")
    out = _compile_cli("memagent", "--topology", "h100-8")
    assert out.returncode == 2 and "not a known TPU" in out.stderr and "v5p-N" in out.stderr
    out = _compile_cli("memagent", "--topology", "v5p:2x2x1", "mesh.fsdp=3", "mesh.tensor=1")
    assert out.returncode == 2 and "does not divide" in out.stderr


def test_libtpu_keeps_cpu_runs_quiet() -> None:
    """With libtpu installed, a CPU run falls back to CPU without libtpu's warnings on stderr."""
    out = subprocess.run([sys.executable, "-c", "import memagent_jax, jax; print(jax.default_backend())"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "cpu"
    assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr


def test_the_tpu_engine_decode_gathers_logits_not_the_lm_head(monkeypatch) -> None:
    """The engine's decode program for a TPU slice with the vocabulary split over tensor: no
    all-gather of the LM head inside it (its logits come out vocab-sharded and the rows' logits
    are gathered: `sharding.constrain_vocab`); the paged kernels are in it (Mosaic custom calls)."""
    import memagent_jax.compile as compile_module
    from memagent_jax.compile import compile_rl_step
    from memagent_jax.config import load_config

    texts = {}

    def keep_text(name, shape, fn, *args):
        def compiled():
            out = fn()
            texts[name] = out.as_text()
            return out
        return real(name, shape, compiled, *args)

    real = compile_module._compile
    monkeypatch.setattr(compile_module, "_compile", keep_text)
    report = compile_rl_step(load_config("memagent", TINY + ["model.architecture=qwen3"]), "v5p:2x2x1",
                             only=("engine decode",))
    assert report.failures == [] and list(texts) == ["engine decode"]
    gathers = [line for line in texts["engine decode"].splitlines() if "all-gather(" in line]
    head = re.compile(r"\[(1024,32768|32768,1024)\]")
    assert gathers and not [g for g in gathers if head.search(g.split("all-gather(")[0])], gathers
    assert "tpu_custom_call" in texts["engine decode"]
