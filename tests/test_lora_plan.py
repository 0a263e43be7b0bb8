"""`plan` and `compile` count a LoRA policy: the base frozen in model.dtype, the adapters and
their AdamW state, no reference copy; the shipped LoRA configs fit their smallest hardware."""

from __future__ import annotations

import pytest

from memagent_jax.config import load_config
from memagent_jax.errors import InputError
from memagent_jax.plan import plan


def test_7b_lora_fits_one_80gib_gpu_where_full_parameter_does_not():
    lora = plan(load_config("qwen2_5_7b_memagent_lora"), 1, 80, suggest=False)
    assert lora.fits and lora.model.param_dtype == "bfloat16" and lora.model.lora.rank == 64
    items = dict(lora.train.items)
    base = items["frozen base (bfloat16, fsdp x tensor shards)"]
    assert 14.0 * 2**30 < base < 14.4 * 2**30  # 7.6B weights x 2 bytes
    adapters = items["LoRA adapters (rank 64, float32, 7 targets)"]
    assert items["reference: zero adapters over the base (no second copy)"] == adapters
    assert items["AdamW mu + nu of the adapters (float32) + scalars"] == 2 * adapters + 64
    assert items["gradients x2 (float32: accumulator + micro-batch)"] == 2 * adapters
    full = plan(load_config("qwen2_5_7b_memagent_lora", ["model.lora.rank=0"]), 1, 80, suggest=False)
    assert not full.fits and full.train.total > 3 * lora.train.total


def test_14b_lora_fits_one_80gib_gpu_with_applied_adapters():
    report = plan(load_config("qwen2_5_14b_memagent_lora"), 1, 80, suggest=False)
    assert report.fits
    merged = plan(load_config("qwen2_5_14b_memagent_lora", ["model.lora.rollout=merged"]), 1, 80,
                  suggest=False)
    assert merged.rollout.total > report.rollout.total + 20 * 2**30  # the merged targets' copy
    assert not merged.fits


def test_plan_checks_the_rank_against_the_shape():
    with pytest.raises(InputError, match="rank=600 is larger than k_proj's dimension"):
        plan(load_config("qwen2_5_7b_memagent_lora", ["model.lora.rank=600"]), 1, 80, suggest=False)
    with pytest.raises(InputError, match="model.lora.rollout='fast'"):
        load_config("qwen2_5_7b_memagent_lora", ["model.lora.rollout=fast"])


@pytest.mark.slow  # ~70 s: six TPU programs compiled on this CPU host
def test_lora_programs_compile_for_v5p_and_agree_with_plan():
    pytest.importorskip("libtpu", reason="libtpu not installed (part of memagent-jax[test])")
    from test_compile_tpu import TINY, WITHIN

    from memagent_jax.compile import compile_rl_step

    cfg = load_config("memagent", TINY + ["model.architecture=qwen2", "model.lora.rank=16"])
    report = compile_rl_step(cfg, "v5p:2x2x1")
    assert report.ok, report.failures
    grad = next(p for p in report.programs if p.name == "micro-batch gradient")
    update = next(p for p in report.programs if p.name == "optimizer update")
    assert "frozen base" in update.resident_what and grad.outputs < 0.1 * 2**30  # adapter grads
    formulas = plan(cfg, 4, 95.74, suggest=False)
    for phase, total in (("train", formulas.train.total), ("rollout", formulas.rollout.total)):
        compiled = report.phase_peak(phase)
        assert abs(total / compiled - 1) <= WITHIN, (phase, total, compiled)
