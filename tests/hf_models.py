"""Tiny random HF checkpoints built locally (no hub): the parity peers of the tests."""

from __future__ import annotations

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
    'qwen3' (untied, q/k norm, head_dim 24), 'qwen3_tied'."""
    torch.manual_seed({"qwen2": 0, "qwen2_tied": 1, "llama": 2, "qwen3": 3, "qwen3_tied": 4}[kind])
    kwargs = {**TINY, **overrides}
    if kind.startswith("qwen3"):
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
    model = make_hf_model(kind, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    return model
