"""The decoder's hyperparameters and their mapping to/from HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from memagent_jax.models.attention import ATTENTION_IMPLS

SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}
_HF_ARCHITECTURE = {short: hf for hf, short in SUPPORTED_ARCHITECTURES.items()}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str | Any) -> Any:
    """'bfloat16' -> jnp.bfloat16; a jnp dtype passes through."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    return jnp.dtype(name).type


def dtype_name(dtype: Any) -> str:
    """jnp.bfloat16 (or any dtype-like) -> 'bfloat16'."""
    return jnp.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Qwen2/Qwen2.5, Qwen3 (dense) and Llama family decoder.

    `param_dtype` is the storage dtype of weights; `dtype` the compute dtype of activations.
    Attention softmax, logits and log-softmax are always fp32.

    `head_dim` 0 means hidden_size // num_heads (Qwen3 sets it independently). `qkv_bias` and
    `qk_norm` None take the architecture's default: q/k/v bias for qwen2 and llama (the latter
    for backward compatibility; HF Llama checkpoints say attention_bias=false and load as such),
    none for qwen3; per-head RMSNorm of q and k (after the projection, before RoPE) for qwen3
    only, which Qwen3 checkpoints always have.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    architecture: str = "qwen2"  # "qwen2" | "qwen3" | "llama"
    qkv_bias: bool | None = None  # None -> True for qwen2/llama, False for qwen3
    qk_norm: bool | None = None  # None -> True for qwen3, False otherwise
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # Llama-3 "llama3" scaling as sorted items
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    # An int, or a tuple of ints (Llama-3.x and Qwen2.5 list several); never a list: the config is
    # hashed as part of the model's graphdef, a static argument of every jitted program.
    eos_token_id: int | tuple[int, ...] | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    # False: the layer loop is unrolled (lax.scan(unroll=True)); one program per layer, faster
    # steps for shallow models on CPU (-10% train step at 4 layers), compile time grows with depth
    scan_layers: bool = True
    attention: str = "auto"  # models/attention.py: xla | cudnn | splash | blocked | auto (a runtime choice, not saved)
    # Low-rank adapters over the frozen projections (models/lora.py: LoraConfig); None = no adapters.
    # Not part of config.json: an exported model is merged, a PEFT adapter has its own config.
    lora: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_id", _eos_ids(self.eos_token_id))
        if self.architecture not in SUPPORTED_ARCHITECTURES.values():
            raise ValueError(f"architecture={self.architecture!r}; expected one of "
                             f"{sorted(SUPPORTED_ARCHITECTURES.values())}")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be a positive even number (RoPE "
                             "rotates pairs of dimensions); set head_dim in the config")
        is_qwen3 = self.architecture == "qwen3"
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", not is_qwen3)
        if self.qk_norm is None:
            object.__setattr__(self, "qk_norm", is_qwen3)
        if is_qwen3 and self.qkv_bias:
            raise ValueError("architecture='qwen3' with qkv_bias=True is not supported (HF Qwen3's "
                             "attention_bias also adds an o_proj bias); set qkv_bias=False")
        if is_qwen3 != self.qk_norm:
            raise ValueError(
                f"qk_norm={self.qk_norm} with architecture={self.architecture!r}: q/k RMSNorm is "
                "part of Qwen3 and of no other supported architecture; leave qk_norm unset (None) "
                "or use architecture='qwen3' exactly when qk_norm=True")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} must be a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r}; expected one of {ATTENTION_IMPLS}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        """`rope_scaling` as a dict (None when RoPE is unscaled)."""
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Builds a config from an HF `config.json` dict (Qwen2ForCausalLM, Qwen3ForCausalLM or
        LlamaForCausalLM); settings this decoder does not implement raise a ValueError."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and model_type in SUPPORTED_ARCHITECTURES.values():
            arch = model_type
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or model_type!r} in config.json; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"]
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"config.json is missing {missing}; an HF Qwen2/Qwen3/Llama config "
                             "has them")
        _check_unsupported(hf, arch)
        scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
        scaling = dict(scaling) if scaling else {}
        rope_theta = hf.get("rope_theta", scaling.get("rope_theta", 10000.0))
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type in (None, "default"):
            scaling_items = None
        elif rope_type == "llama3":
            keep = ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")
            scaling_items = tuple(sorted((k, scaling[k] if k != "rope_type" else "llama3")
                                         for k in keep if k in scaling or k == "rope_type"))
        else:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (default, llama3)")
        qkv_bias = hf.get("attention_bias", arch == "qwen2")
        kwargs = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or 0,
            architecture=arch,
            qkv_bias=bool(qkv_bias),
            qk_norm=arch == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_theta=float(rope_theta),
            rope_scaling=scaling_items,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_pretrained_dir(cls, path: str | Path, **overrides: Any) -> "ModelConfig":
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"{cfg_path} not found: a model directory needs an HF config.json "
                "(and safetensors weights)"
            )
        return cls.from_hf_dict(json.loads(cfg_path.read_text()), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` that transformers/vLLM load this model with."""
        hf: dict[str, Any] = {
            "architectures": [_HF_ARCHITECTURE[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.param_dtype,
            "initializer_range": 0.02,
            "use_cache": True,
            "attention_dropout": 0.0,
        }
        if self.architecture == "qwen2":
            hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers)
            if not self.qkv_bias:
                raise ValueError("Qwen2 checkpoints always have q/k/v bias; use architecture=llama")
        elif self.architecture == "qwen3":
            hf.update(attention_bias=False, use_sliding_window=False, sliding_window=None,
                      max_window_layers=self.num_layers)
        else:
            hf.update(attention_bias=self.qkv_bias, mlp_bias=False, pretraining_tp=1)
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            eos = self.eos_token_id
            hf["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
        return hf


def _eos_ids(value: Any) -> int | tuple[int, ...] | None:
    """config.json's eos_token_id (None, an int, or a list of ints) as a hashable value."""
    def is_id(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if value is None:
        return None
    if is_id(value):
        return int(value)
    if isinstance(value, (list, tuple)) and all(is_id(v) for v in value):
        return tuple(int(v) for v in value)
    raise ValueError(f"eos_token_id={value!r} in the model config: expected an integer token id "
                     "or a list of them (as HF config.json writes it); fix eos_token_id in "
                     "config.json")


def _sliding_layers(hf: dict[str, Any]) -> list[int]:
    """Layers that HF would run with sliding-window attention under this config.json.

    An explicit `layer_types` list wins; otherwise (Qwen2/Qwen3 rule) layers i >=
    max_window_layers slide when use_sliding_window is true and sliding_window is set.
    """
    layer_types = hf.get("layer_types")
    if layer_types:
        return [i for i, t in enumerate(layer_types) if t != "full_attention"]
    if not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return []
    start = hf.get("max_window_layers", 0) or 0
    return list(range(start, hf["num_hidden_layers"]))


def _check_unsupported(hf: dict[str, Any], arch: str) -> None:
    """Raises a ValueError naming the config.json field this decoder would silently get wrong."""
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise ValueError(f"config.json has a quantization_config (quant_method {method!r}): quantized "
                         "checkpoints are not supported; use the unquantized checkpoint (float32, "
                         "bfloat16 or float16 safetensors)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r} is not supported: the MLP is SwiGLU "
                         "(silu); use a checkpoint with hidden_act='silu'")
    if hf.get("mlp_bias"):
        raise ValueError("config.json mlp_bias=true is not supported (the MLP has no biases); "
                         "use a checkpoint with mlp_bias=false")
    if arch == "qwen3" and hf.get("attention_bias"):
        raise ValueError("config.json attention_bias=true is not supported for Qwen3 (it also "
                         "adds an o_proj bias); use a checkpoint with attention_bias=false")
    sliding = _sliding_layers(hf)
    if sliding:
        raise ValueError(
            f"config.json asks for sliding-window attention (use_sliding_window="
            f"{hf.get('use_sliding_window')}, sliding_window={hf.get('sliding_window')}, "
            f"max_window_layers={hf.get('max_window_layers')}, layer_types marks layers "
            f"{sliding[:4]}{' ...' if len(sliding) > 4 else ''}), which this decoder does not "
            "implement (every layer attends to the full context); set use_sliding_window=false "
            "(and drop non-'full_attention' layer_types) in config.json")
