"""memagent_jax.plan: hand-computed bytes for a small config, the 7B/14B verdicts on their targets,
mesh suggestions, and every shipped config loading."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from memagent_jax.config import CONFIG_DIR, load_config
from memagent_jax.plan_cli import add_plan_arguments, run_plan_cli
from memagent_jax.plan import (
    GIB,
    KNOWN_SHAPES,
    format_plan,
    mesh_problem,
    plan,
    resolve_model,
    suggest_meshes,
)

SMALL = [
    "model.path=", "model.vocab_size=1000", "model.hidden_size=64", "model.intermediate_size=128",
    "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.tie_word_embeddings=false", "model.architecture=qwen2",
    "model.param_dtype=float32", "model.dtype=float32", "model.remat=full", "model.attention=xla",
    "agent.chunk_size=100", "agent.question_budget=20", "agent.max_memory_tokens=30",
    "agent.max_final_new_tokens=10",
    "rl.micro_batch_tokens=800", "rl.logprob_chunk=64", "rl.kl_coef=0.0",
    "rl.gen_batch_size=2", "rl.train_batch_size=2", "rl.mini_batch_size=1", "rollout.group_size=4",
    "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1", "rollout.engine=static",
]


def test_small_config_by_hand():
    """2 layers, hidden 64, 4 heads (hd 16), 2 kv heads, mlp 128, vocab 1000, untied, qkv bias,
    fp32 everywhere, remat full, on 4 devices -> mesh (1, 4, 1)."""
    report = plan(load_config(None, SMALL), 4, 80.0, suggest=False)
    assert report.mesh == (1, 4, 1)

    # Weights per device (TRAIN_RULES: embed dims over fsdp=4), in elements:
    embed = 1000 * 64 // 4          # [V, D]
    lm_head = 64 // 4 * 1000        # [D, V]
    norms = 64 + 2 * 64 + 2 * 64    # final, input, post (not sharded)
    attn = 2 * (16 * 64 + 16 * 32 + 16 * 32 + 64 * 16)   # q, k, v, o: D/4 x out
    mlp = 2 * (16 * 128 * 2 + 128 * 16)                   # gate, up, down
    bias = 2 * (64 + 32 + 32)
    params = (embed + lm_head + norms + attn + mlp + bias) * 4
    assert params == 204032
    items = dict(report.train.items)
    assert items["params (float32, fsdp x tensor shards)"] == params
    assert not any("reference" in k for k in items)  # kl_coef = 0: no frozen copy
    assert items["AdamW mu + nu (float32, as optax keeps them) + scalars"] == 2 * params + 64
    assert items["gradients x2 (float32: accumulator + micro-batch)"] == 2 * params

    # Longest conversation: 200 + 20 + 30 + 100 prompt + 30 new = 380 tokens -> 800 // 380 = 2
    # rows, padded to 4 (the batch shards) -> 1 row per device, width bucket(380) = 384.
    assert report.micro_batch["rows_per_device"] == 1 and report.micro_batch["width"] == 384
    tok, scores = 384, 4 * 384 * 384
    a_tok = 64 * (4 * 4 + 8) + 16 * (2 * 4 + 2 * 2) * 4 + 4 * 128 * 4
    layer_weights = (64 + 64 + 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 64 + 32 + 32)
    layer_phase = tok * a_tok + scores * (10 + 4) + 4 * 3 * layer_weights
    logits_phase = 1 * 64 * 1000 * 12 + 4 * 2 * 1000 * 64
    assert layer_phase > logits_phase
    assert items["activations saved by the scan, 2 layers (remat=full)"] == 2 * tok * 64 * 4
    assert items["embeddings / final hidden + cotangents"] == tok * 64 * (2 * 4 + 8)
    assert items["backward of one layer: recompute + cotangents (+ gathered weights)"] == layer_phase
    train_total = 5 * params + 64 + 2 * tok * 64 * 4 + tok * 64 * 16 + layer_phase
    assert report.train.total == train_total == 11984192

    # Rollout: 2 docs x 4 = 8 rows -> 2 per device; prompt 350 -> bucket 384 (one 384-token
    # prefill chunk), 30 new tokens -> 32 slots; S = 416.
    assert report.rollout_shape == {"rows": 8, "rows_per_device": 2, "cache_length": 416,
                                    "prompt_bucket": 384, "new_tokens": 32}
    kv = 2 * 2 * 2 * 416 * 2 * 16 * 4                    # 2 (k, v) * L * rows * S * K * hd * 4
    prefill = kv + 2 * 4 * 384 * 416 * (4 + 4)           # + rows * H * chunk * S * (4 + cb)
    assert prefill > 2 * kv                              # larger than the gather's two caches
    decode_copy = (1000 * 64 * 2 + 64 + 2 * layer_weights) * 4   # DECODE_RULES: not sharded
    ritems = dict(report.rollout.items)
    assert ritems["decode weights (float32, DECODE_RULES: replicated over fsdp)"] == decode_copy
    assert report.rollout.total == 3 * params + 64 + decode_copy + prefill == 12070976

    # Verdict with 10% headroom.
    assert plan(load_config(None, SMALL), 4, train_total / 0.9 / GIB + 1e-6, suggest=False).train.fits
    assert not plan(load_config(None, SMALL), 4, train_total / 0.9 / GIB - 1e-6,
                    suggest=False).train.fits


def test_remat_policies_order():
    """none keeps the most, full the least; dots_no_batch sits between."""
    totals = {}
    for remat in ("none", "dots", "dots_no_batch", "full"):
        cfg = load_config(None, SMALL + [f"model.remat={remat}"])
        totals[remat] = plan(cfg, 4, 80.0, suggest=False).train.total
    assert totals["none"] > totals["dots"] > totals["dots_no_batch"] > totals["full"]


def test_flash_attention_memory_is_linear_in_the_row_length():
    """xla materialises T x T scores (a layer's backward grows ~4x when T doubles); cudnn /
    splash (and auto, planned as them) keep O(T) (about 2x); blocked keeps the causal blocks'
    probabilities (O(T^2), but below xla); the 7B recipe's train step shrinks with a kernel."""
    from memagent_jax.models import ModelConfig
    from memagent_jax.plan import activation_bytes

    base = ModelConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8,
                       num_kv_heads=2, dtype="bfloat16", remat="none")
    totals = {}
    for impl, low, high in (("xla", 3.0, 4.1), ("splash", 1.9, 2.1), ("cudnn", 1.9, 2.1),
                            ("auto", 1.9, 2.1), ("blocked", 3.0, 4.1)):
        model = dataclasses.replace(base, attention=impl)
        small, big = (sum(v for _, v in activation_bytes(model, 1, w, 1, 256)) for w in (4096, 8192))
        assert low <= big / small <= high, (impl, big / small)
        totals[impl] = big
    assert totals["cudnn"] < totals["blocked"] < 0.7 * totals["xla"]
    xla = plan(_cfg("qwen2_5_7b_memagent", "model.attention=xla"), 8, 80, suggest=False).train.total
    flash = plan(_cfg("qwen2_5_7b_memagent", "model.attention=splash"), 8, 80, suggest=False).train.total
    assert flash < xla - 5 * GIB


def _cfg(name, *extra):
    return load_config(name, list(extra))


@pytest.mark.parametrize("name,devices,hbm", [
    ("qwen2_5_7b_memagent", 8, 80), ("qwen2_5_7b_memagent_v5p32", 16, 95),
    ("qwen2_5_14b_memagent", 16, 80), ("qwen2_5_14b_memagent_v5p64", 32, 95),
])
def test_recipes_fit_their_targets(name, devices, hbm):
    report = plan(_cfg(name), devices, hbm, suggest=False)
    assert report.train.fits and report.rollout.fits, format_plan(report)
    # One generate call for every conversation of a turn (gen batch x 16 rows) does not fit;
    # the configs cap a call at rollout.max_rollout_rows (>= a few whole groups), which fits.
    assert not plan(_cfg(name, "rollout.max_rows_per_call=0"), devices, hbm,
                    suggest=False).rollout.fits
    assert report.max_rollout_rows >= 128
    assert _cfg(name).rollout.max_rows_per_call == report.max_rollout_rows
    capped = plan(_cfg(name), devices, hbm, suggest=False, rollout_rows=report.max_rollout_rows)
    assert capped.rollout.fits
    assert not plan(_cfg(name), devices, hbm, suggest=False,
                    rollout_rows=2 * report.max_rollout_rows).rollout.fits


def test_14b_does_not_fit_one_device():
    report = plan(_cfg("qwen2_5_14b_memagent", "mesh.tensor=1"), 1, 80, suggest=False)
    assert report.mesh == (1, 1, 1)
    assert not report.train.fits and not report.rollout.fits
    assert suggest_meshes(_cfg("qwen2_5_14b_memagent", "mesh.tensor=1"), 1, 80) == []


def test_suggest_meshes_valid_and_ranked():
    cfg = _cfg("qwen2_5_7b_memagent")
    model = resolve_model(cfg)[1]
    out = suggest_meshes(cfg, 8, 80)
    assert out
    for s in out:
        assert s.data * s.fsdp * s.tensor == 8
        assert model.num_kv_heads % s.tensor == 0 and model.num_heads % s.tensor == 0
        assert mesh_problem(model, (s.data, s.fsdp, s.tensor)) is None
        assert s.fits_train and s.train_bytes <= 0.9 * 80 * GIB
    keys = [(s.tensor, -s.fsdp) for s in out]
    assert keys == sorted(keys)
    assert all(s.tensor in (1, 2, 4) for s in out)  # 8 does not divide 4 kv heads


def test_mesh_problem_names_the_axis():
    model = resolve_model(_cfg("qwen2_5_7b_memagent"))[1]
    assert "kv heads" in mesh_problem(model, (1, 1, 8))
    assert "not divisible" in mesh_problem(model, (1, 3, 1))  # 3 does not divide hidden 3584
    with pytest.raises(ValueError, match="cannot hold"):
        plan(_cfg("qwen2_5_7b_memagent", "mesh.tensor=8"), 8, 80)


def test_model_shape_sources(tmp_path):
    # Hub name -> built-in shape by basename.
    name, m = resolve_model(_cfg(None, "model.path=Qwen/Qwen2.5-14B-Instruct"))
    assert name == "Qwen2.5-14B-Instruct" and (m.num_layers, m.hidden_size, m.num_kv_heads) == (48, 5120, 8)
    assert set(KNOWN_SHAPES) == {"Qwen2.5-0.5B-Instruct", "Qwen2.5-7B-Instruct", "Qwen2.5-14B-Instruct",
                                 "Qwen3-4B"}
    assert resolve_model(_cfg(None, "model.path=x/qwen2.5-0.5b-instruct"))[1].tie_word_embeddings
    # A local directory's config.json wins over the basename.
    d = tmp_path / "Qwen2.5-7B-Instruct"
    d.mkdir()
    hf = dict(KNOWN_SHAPES["Qwen2.5-0.5B-Instruct"], num_hidden_layers=3)
    (d / "config.json").write_text(json.dumps(hf))
    assert resolve_model(_cfg(None, f"model.path={d}"))[1].num_layers == 3
    # hf_config when the path has no config.json.
    assert resolve_model(_cfg(None, "model.path=/nowhere/custom"), hf_config=hf)[1].num_layers == 3
    with pytest.raises(FileNotFoundError, match="built-in shapes"):
        resolve_model(_cfg(None, "model.path=/nowhere/custom"))


def test_format_and_cli(capsys):
    report = plan(_cfg("qwen2_5_7b_memagent"), 8, 80)
    text = format_plan(report)
    for needle in ("train step", "rollout", "FITS", "GiB/device", "data fsdp tensor", "verdict"):
        assert needle in text
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    args = parser.parse_args(["qwen2_5_7b_memagent", "rl.micro_batch_tokens=16384",
                              "rollout.max_rows_per_call=0", "--devices", "8", "--hbm-gib", "80"])
    assert run_plan_cli(args) == 1  # the uncapped rollout does not fit
    out = capsys.readouterr().out
    assert "rl.micro_batch_tokens=16384" in out and "DOES NOT FIT" in out


def test_every_config_loads():
    paths = sorted(CONFIG_DIR.glob("*.yaml"))
    assert {p.name for p in paths} >= {"dapo.yaml", "memagent.yaml", "qwen2_5_7b_memagent.yaml",
                                       "qwen2_5_14b_memagent.yaml"}
    from memagent_jax.demo import load_demo_config

    for p in paths:  # demo configs carry a `demo:` section read by the demo's own loader
        load_demo_config(p) if "demo:" in p.read_text() else load_config(p)
    dapo, mem = load_config("dapo"), load_config("memagent")
    assert (dapo.rl.eps_high, dapo.rl.clip_c, dapo.rl.kl_coef, dapo.optim.weight_decay) == (0.28, 10.0, 0.0, 0.1)
    assert dapo.rl.gen_batch_size == 3 * dapo.rl.train_batch_size and dapo.rl.overlong.enable
    assert (mem.rl.eps_high, mem.rl.clip_c, mem.rl.kl_coef, mem.rl.norm_adv_by_std) == (0.2, 3.0, 0.001, False)
    assert (mem.rollout.top_p, mem.agent.chunk_size, mem.agent.max_chunks) == (1.0, 5000, 8)
    big = load_config("qwen2_5_14b_memagent")
    assert (big.rl.train_batch_size, big.rl.mini_batch_size, big.rl.kl_coef) == (256, 16, 0.001)
