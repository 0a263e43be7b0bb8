"""LoRA adapters as a PEFT folder (adapter_model.safetensors + adapter_config.json).

transformers + peft (`PeftModel.from_pretrained(base, folder)`) and vLLM (`--enable-lora
--lora-modules name=folder`) load it on the base model. PEFT's layout: each adapted torch Linear
`model.layers.N.self_attn.q_proj` gets `lora_A` (Linear(in, r): weight [r, in]) and `lora_B`
(Linear(r, out): weight [out, r]) and adds lora_B(lora_A(x)) * lora_alpha / r; ours are
A [in, r] and B [r, out] per layer, so each is written transposed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

#: Our target name -> the HF submodule that holds it.
_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
            "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def peft_key(layer: int, target: str, which: str) -> str:
    """PEFT's saved key, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return f"base_model.model.model.layers.{layer}.{_MODULES[target]}.{target}.lora_{which}.weight"


def adapter_tensors(model: Any) -> dict[str, np.ndarray]:
    """PEFT-named host arrays of a LoRA model's adapters (fp32 kept, others as stored)."""
    from memagent_jax.distributed import to_host

    lora = model.config.lora
    out: dict[str, np.ndarray] = {}
    for t in lora.targets:
        a = to_host(getattr(model.layers, f"{t}_lora_a")[...])  # [L, in, r]
        b = to_host(getattr(model.layers, f"{t}_lora_b")[...])  # [L, r, out]
        for i in range(a.shape[0]):
            out[peft_key(i, t, "A")] = np.ascontiguousarray(a[i].T)
            out[peft_key(i, t, "B")] = np.ascontiguousarray(b[i].T)
    return out


def adapter_config(model: Any, base_model: str = "") -> dict[str, Any]:
    """PEFT's adapter_config.json for the model's LoraConfig."""
    lora = model.config.lora
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": list(lora.targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_adapter(model: Any, out_dir: str | Path, *, base_model: str = "") -> Path:
    """Writes the model's adapters as a PEFT folder (process 0 writes; every process calls it).

    `base_model`: the base model's folder or hub name, recorded as base_model_name_or_path."""
    import jax
    from safetensors.numpy import save_file

    if getattr(model.config, "lora", None) is None:
        raise ValueError("save_adapter: the model has no LoRA adapters (model.lora.rank is 0)")
    tensors = adapter_tensors(model)
    out = Path(out_dir)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(
            json.dumps(adapter_config(model, base_model), indent=2))
    return out
