"""The policy's shape for planning and compiling without weights: a config.json, a built-in hub
shape (KNOWN_SHAPES) or the config's random-init shape; whether a mesh can hold its weights, and
the bytes of one device's weight shards under a rules table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from memagent_jax.config import Config
from memagent_jax.models.lora import check_lora, lora_from_section
from memagent_jax.models.model_config import ModelConfig
from memagent_jax.models.sharding import DECODE_RULES, MESH_AXES, TRAIN_RULES
from memagent_jax.models.transformer import param_logical_axes, param_shapes

# Shapes only (for planning without the checkpoint); load real models from an HF directory.
_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "Qwen2.5-0.5B-Instruct": {**_QWEN2, "num_hidden_layers": 24, "hidden_size": 896,
                              "num_attention_heads": 14, "num_key_value_heads": 2,
                              "intermediate_size": 4864, "vocab_size": 151936,
                              "tie_word_embeddings": True},
    "Qwen2.5-7B-Instruct": {**_QWEN2, "num_hidden_layers": 28, "hidden_size": 3584,
                            "num_attention_heads": 28, "num_key_value_heads": 4,
                            "intermediate_size": 18944, "vocab_size": 152064,
                            "tie_word_embeddings": False},
    "Qwen2.5-14B-Instruct": {**_QWEN2, "num_hidden_layers": 48, "hidden_size": 5120,
                             "num_attention_heads": 40, "num_key_value_heads": 8,
                             "intermediate_size": 13824, "vocab_size": 152064,
                             "tie_word_embeddings": False},
    # Qwen3: head_dim 128 is set on its own (32 heads x 128 = 4096 != hidden 2560), q/k norm.
    "Qwen3-4B": {**_QWEN3, "num_hidden_layers": 36, "hidden_size": 2560,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "intermediate_size": 9728, "vocab_size": 151936, "tie_word_embeddings": True,
                 "rope_theta": 1000000.0, "max_position_embeddings": 40960},
}



def resolve_model(cfg: Config, hf_config: dict | None = None) -> tuple[str, ModelConfig]:
    """The policy's shape: model.path's config.json, else `hf_config`, else KNOWN_SHAPES by the
    path's basename (a hub name such as Qwen/Qwen2.5-7B-Instruct), else model.* (random init).
    With model.lora.rank > 0 the shape carries the adapters (`ModelConfig.lora`, its rank
    checked against the targets) and param_dtype is the frozen base's, model.dtype."""
    name, model = _resolve_model(cfg, hf_config)
    if model.lora is not None:
        check_lora(model.lora, model)
    return name, model


def _resolve_model(cfg: Config, hf_config: dict | None = None) -> tuple[str, ModelConfig]:
    m = cfg.model
    dtypes = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, attention=m.attention)
    lora = lora_from_section(m.lora, m.param_dtype)
    if lora is not None:  # the base is frozen in model.dtype; the adapters in model.param_dtype
        dtypes.update(param_dtype=m.dtype, lora=lora)
    path = Path(m.path) if m.path else None
    if path is not None and (path / "config.json").is_file():
        return str(path), ModelConfig.from_pretrained_dir(path, **dtypes)
    if hf_config is not None:
        return m.path or "hf_config", ModelConfig.from_hf_dict(hf_config, **dtypes)
    if path is not None:
        known = {k.lower(): k for k in KNOWN_SHAPES}
        key = known.get(path.name.lower())
        if key is None:
            raise FileNotFoundError(
                f"model.path={m.path!r}: no config.json there and {path.name!r} is not one of the "
                f"built-in shapes {sorted(KNOWN_SHAPES)}; point model.path at a local HF directory "
                "or pass hf_config")
        return key, ModelConfig.from_hf_dict(KNOWN_SHAPES[key], **dtypes)
    vocab = m.vocab_size
    if vocab <= 0 and cfg.tokenizer:
        from memagent_jax.tokenizer import load_tokenizer
        vocab = load_tokenizer(cfg.tokenizer).vocab_size
    if vocab <= 0:
        raise ValueError("model.vocab_size=0 (the tokenizer's) and no tokenizer directory is set: "
                         "pass model.vocab_size=N or tokenizer=DIR to plan a random-init model")
    return "random-init", ModelConfig(
        vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
        architecture=m.architecture, qkv_bias=m.architecture == "qwen2",
        tie_word_embeddings=m.tie_word_embeddings, **dtypes)


def _axes_size(sizes: dict[str, int], axes: Any) -> int:
    if axes is None:
        return 1
    return math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))


def mesh_problem(model: ModelConfig, mesh: tuple[int, int, int]) -> str | None:
    """Why weights cannot be laid out on `mesh` (train or decode rules), or None if they can."""
    sizes = dict(zip(MESH_AXES, mesh))
    if model.num_kv_heads % sizes["tensor"]:
        return f"tensor={sizes['tensor']} does not divide {model.num_kv_heads} kv heads"
    shapes, axes = param_shapes(model), param_logical_axes(model)
    for rules in (TRAIN_RULES, DECODE_RULES):
        for path, names in axes.items():
            for dim, name in zip(shapes[path], names):
                n = _axes_size(sizes, rules.get(name)) if name else 1
                if dim % n:
                    return f"weight {path}: dimension {name} ({dim}) is not divisible by {n}"
    return None


def weight_bytes(model: ModelConfig, mesh: tuple[int, int, int], rules: Any, nbytes: int) -> int:
    """Bytes of this device's shards of every weight under `rules` (ceil division per dim); the
    base's only for a LoRA shape (`adapter_bytes` counts the adapters)."""
    sizes = dict(zip(MESH_AXES, mesh))
    model = base_model(model)
    shapes, axes = param_shapes(model), param_logical_axes(model)
    total = 0
    for path, names in axes.items():
        total += math.prod(-(-dim // (_axes_size(sizes, rules.get(n)) if n else 1))
                           for dim, n in zip(shapes[path], names))
    return total * nbytes


def base_model(model: ModelConfig) -> ModelConfig:
    """The shape without adapters (the frozen base of a LoRA policy; the model itself otherwise)."""
    return model.replace(lora=None) if model.lora is not None else model


def adapter_bytes(model: ModelConfig, mesh: tuple[int, int, int], rules: Any = TRAIN_RULES) -> int:
    """Bytes of this device's shards of the LoRA adapters (their dtype: model.lora.dtype)."""
    if model.lora is None:
        return 0
    nbytes = {"float32": 4, "bfloat16": 2, "float16": 2}[model.lora.dtype]
    sizes = dict(zip(MESH_AXES, mesh))
    shapes, axes = param_shapes(model), param_logical_axes(model)
    return nbytes * sum(math.prod(-(-dim // (_axes_size(sizes, rules.get(n)) if n else 1))
                                  for dim, n in zip(shapes[p], axes[p]))
                        for p in axes if "_lora_" in p)


def target_bytes(model: ModelConfig, mesh: tuple[int, int, int], rules: Any, nbytes: int) -> int:
    """Bytes of this device's shards of the weights the adapters target (merged copies of them
    are what the rollout decodes with)."""
    sizes = dict(zip(MESH_AXES, mesh))
    shapes, axes = param_shapes(model), param_logical_axes(model)
    return nbytes * sum(math.prod(-(-dim // (_axes_size(sizes, rules.get(n)) if n else 1))
                                  for dim, n in zip(shapes[f"layers/{t}"], axes[f"layers/{t}"]))
                        for t in model.lora.targets)
