"""Tiny random HF checkpoints built locally (no hub): the parity peers of the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


# Qwen3: head_dim 24 != hidden 64 / 4 heads, so q is 96 wide and o_proj maps 96 -> 64.
QWEN3_HEAD_DIM = 24


def make_hf_model(kind: str, **overrides: Any) -> transformers.PreTrainedModel:
    """kind: 'qwen2' (untied, q/k/v bias), 'qwen2_tied', 'llama' (GQA, llama3 rope scaling),
    'qwen3' (untied, q/k norm, head_dim 24), 'qwen3_tied', and two shaped like real releases
    (RELEASE_CONFIGS): 'llama3' (Llama-3.2-Instruct) and 'qwen2_5' (Qwen2.5-Instruct)."""
    torch.manual_seed({"qwen2": 0, "qwen2_tied": 1, "llama": 2, "qwen3": 3, "qwen3_tied": 4,
                       "llama3": 5, "qwen2_5": 6}[kind])
    kwargs = {**TINY, **overrides}
    if kind in RELEASE_CONFIGS:
        arch = RELEASE_CONFIGS[kind]["architectures"][0]
        cfg = transformers.AutoConfig.for_model(**{**RELEASE_CONFIGS[kind], **overrides})
        model = getattr(transformers, arch)(cfg)
    elif kind.startswith("qwen3"):
        kwargs.setdefault("head_dim", QWEN3_HEAD_DIM)
        cfg = transformers.Qwen3Config(**kwargs, rope_theta=1000000.0,
                                       tie_word_embeddings=(kind == "qwen3_tied"))
        model = transformers.Qwen3ForCausalLM(cfg)
    elif kind.startswith("qwen2"):
        cfg = transformers.Qwen2Config(**kwargs, rope_theta=10000.0,
                                       tie_word_embeddings=(kind == "qwen2_tied"))
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "llama":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                   "rope_theta": 500000.0}
        cfg = transformers.LlamaConfig(**kwargs, rope_scaling=scaling, rope_theta=500000.0,
                                       tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    # Random (not zero) biases and norms so every weight matters in the comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_hf_model(kind: str, path: Path, **overrides: Any) -> transformers.PreTrainedModel:
    """The checkpoint in `path`. A release-shaped kind gets its config.json and
    generation_config.json as the release ships them (transformers would rewrite both)."""
    model = make_hf_model(kind, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    if kind in RELEASE_CONFIGS:
        (path / "config.json").write_text(json.dumps({**RELEASE_CONFIGS[kind], **overrides}, indent=2))
        (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIGS[kind], indent=2))
    return model


# config.json of real releases at the tiny size (every field the release has, same values except
# sizes and token ids). Llama-3.2-1B-Instruct: three eos ids in a list, "llama3" rope scaling, tied
# embeddings, no biases. Qwen2.5-7B-Instruct: one eos id here but two in generation_config.json,
# a sliding window declared but switched off.
RELEASE_CONFIGS: dict[str, dict[str, Any]] = {
    "llama3": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 0, "eos_token_id": [1, 2, 3], "head_dim": 16, "hidden_act": "silu",
        "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 112,
        "max_position_embeddings": 256, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 64, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 96},
    "qwen2_5": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
        "intermediate_size": 112, "max_position_embeddings": 256, "max_window_layers": 2,
        "model_type": "qwen2", "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000.0, "sliding_window": 256, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.43.1", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 96},
}
GENERATION_CONFIGS: dict[str, dict[str, Any]] = {
    "llama3": {"bos_token_id": 0, "do_sample": True, "eos_token_id": [1, 2, 3],
               "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.45.0.dev0"},
    "qwen2_5": {"bos_token_id": 1, "pad_token_id": 1, "do_sample": True, "eos_token_id": [2, 1],
                "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                "transformers_version": "4.37.0"},
}
