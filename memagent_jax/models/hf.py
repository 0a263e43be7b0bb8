"""HF checkpoint directories in and out: config.json + safetensors (single file or sharded index).

Loading builds the model abstractly (`nnx.eval_shape`) and creates every weight with
`jax.make_array_from_callback`, whose callback reads from the safetensors files only the slice
each device holds; the full model never materialises on one device. Only safetensors are read:
no pickle, no remote code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from memagent_jax.models.model_config import ModelConfig, dtype_name
from memagent_jax.models.sharding import TRAIN_RULES, Rules, make_mesh, param_shardings
from memagent_jax.models.transformer import Decoder, param_shapes

_LAYER_KEYS = {
    # our stacked name -> (HF per-layer key, transpose?)
    "input_norm": ("input_layernorm.weight", False),
    "post_norm": ("post_attention_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True),
    "k_proj": ("self_attn.k_proj.weight", True),
    "v_proj": ("self_attn.v_proj.weight", True),
    "o_proj": ("self_attn.o_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),  # Qwen3: [head_dim], applied per head
    "k_norm": ("self_attn.k_norm.weight", False),
    "gate_proj": ("mlp.gate_proj.weight", True),
    "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
}
_TOP_KEYS = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class _WeightFiles:
    """Index over the safetensors files of a directory: key -> file, lazy slice reads."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.key_to_file = {k: path / f for k, f in weight_map.items()}
        elif single.is_file():
            self.key_to_file = {}
            with safe_open(single, framework="numpy") as f:
                self.key_to_file = {k: single for k in f.keys()}
        else:
            if list(path.glob("*.bin")) or list(path.glob("*.pt")):
                raise FileNotFoundError(
                    f"{path} holds only pickle weights (*.bin/*.pt); memagent-jax reads safetensors "
                    "only: convert with transformers (model.save_pretrained(dir, safe_serialization=True))"
                )
            raise FileNotFoundError(
                f"no weights in {path}: expected model.safetensors or model.safetensors.index.json"
            )
        missing = sorted({str(f) for f in self.key_to_file.values() if not Path(f).is_file()})
        if missing:
            raise FileNotFoundError(f"weight file(s) listed in the index are missing: {missing}")
        self._handles: dict[Path, Any] = {}

    def slice(self, key: str) -> Any:
        file = self.key_to_file[key]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="numpy").__enter__()
        return self._handles[file].get_slice(key)

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


def _hf_keys(config: ModelConfig) -> dict[str, tuple[list[str], bool]]:
    """Our param path -> (HF keys: one per layer for stacked params, transpose?)."""
    keys: dict[str, tuple[list[str], bool]] = {}
    for path in param_shapes(config):
        if path.startswith("layers/"):
            hf_key, transpose = _LAYER_KEYS[path.split("/", 1)[1]]
            keys[path] = ([f"model.layers.{i}.{hf_key}" for i in range(config.num_layers)], transpose)
        else:
            hf_key, transpose = _TOP_KEYS[path]
            keys[path] = ([hf_key], transpose)
    return keys


def _reader(files: _WeightFiles, hf_keys: list[str], transpose: bool, shape: tuple[int, ...],
            stacked: bool, np_dtype: Any) -> Callable[[Any], np.ndarray]:
    """Callback for make_array_from_callback: reads just the requested index of the weight."""

    def read(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        layer_ids = range(shape[0])[index[0]] if stacked else [None]
        inner = index[1:] if stacked else index
        parts = []
        for layer in layer_ids:
            key = hf_keys[layer] if stacked else hf_keys[0]
            src = files.slice(key)
            hf_index = tuple(reversed(inner)) if transpose else inner
            arr = np.asarray(src[hf_index])
            parts.append(arr.T if transpose else arr)
        out = np.stack(parts) if stacked else parts[0]
        return out.astype(np_dtype)

    return read


def _check_shapes(files: _WeightFiles, config: ModelConfig, path: Path) -> None:
    """Every expected key exists, is a float tensor (not quantized) and has the shape the config
    implies."""
    from memagent_jax.checks import check_weight_dtype

    shapes = param_shapes(config)
    for ours, (keys, transpose) in _hf_keys(config).items():
        expected = shapes[ours][1:] if ours.startswith("layers/") else shapes[ours]
        expected = tuple(reversed(expected)) if transpose else tuple(expected)
        for key in keys:
            if key not in files.key_to_file:
                if ours == "lm_head":
                    raise KeyError(
                        f"{path}: config.json says tie_word_embeddings=false but 'lm_head.weight' "
                        "is not in the safetensors files"
                    )
                raise KeyError(f"{path}: weight {key!r} (for {ours}) not found in the safetensors files")
            check_weight_dtype(key, files.slice(key).get_dtype(), files.key_to_file[key])
            got = tuple(files.slice(key).get_shape())
            if got != expected:
                raise ValueError(
                    f"{path}: weight {key!r} has shape {got} but config.json implies {expected}"
                )
    known = {k for keys, _ in _hf_keys(config).values() for k in keys}
    extra = [k for k in files.key_to_file if k not in known
             and not (k == "lm_head.weight" and config.tie_word_embeddings)
             and not re.search(r"rotary_emb\.inv_freq$", k)]
    if extra:
        raise KeyError(
            f"{path}: weights that do not map to the model: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''} (architecture {config.architecture})"
        )


def from_pretrained(
    path: str | Path,
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    *,
    compute_dtype: Any = None,
    rules: Rules = TRAIN_RULES,
    remat: str = "none",
    attention: str = "auto",
    scan_layers: bool = True,
) -> Decoder:
    """Loads an HF Qwen2/Qwen3/Llama checkpoint directory as a Decoder with weights in `dtype`.

    With a mesh, each weight is created sharded by the rules table; without one, a 1-device mesh.
    `attention` picks the cache-free attention kernel (models/attention.py: xla, cudnn, splash, blocked, auto;
    default auto); `scan_layers=False` unrolls the layer loop (ModelConfig.scan_layers).
    """
    path = Path(path)
    pdtype = dtype_name(dtype)
    config = ModelConfig.from_pretrained_dir(
        path, param_dtype=pdtype, dtype=dtype_name(compute_dtype or dtype), remat=remat, attention=attention,
        scan_layers=scan_layers,
    )
    files = _WeightFiles(path)
    try:
        _check_shapes(files, config, path)
        mesh = mesh or make_mesh(devices=jax.devices()[:1])
        shardings = param_shardings(config, mesh, rules)
        shapes = param_shapes(config)
        abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract)
        flat = {}
        for parts, _ in nnx.to_flat_state(abstract_state):
            key = "/".join(map(str, parts))
            hf_keys, transpose = _hf_keys(config)[key]
            read = _reader(files, hf_keys, transpose, shapes[key], key.startswith("layers/"),
                           _NP_DTYPES[pdtype])
            flat[parts] = jax.make_array_from_callback(shapes[key], shardings[key], read)
        return nnx.merge(graphdef, nnx.from_flat_state(flat))
    finally:
        files.close()


def _save_weights(tensors: dict[str, np.ndarray], path: Path, meta: dict[str, str]) -> None:
    """safetensors' save_file, then the usual file mode (0666 less the umask: 0644 by default).

    save_file creates its file 0600 (owner only), which a server running as another user cannot
    read.
    """
    save_file(tensors, path, metadata=meta)
    mask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_pretrained(model: Decoder, out_dir: str | Path, *, max_shard_bytes: int = 4 * 2**30) -> Path:
    """Writes an HF directory (config.json + safetensors, sharded above `max_shard_bytes`).

    Weights keep their dtype (bf16 stays bf16). Returns the directory path. In a multi-process
    job every process must call it (each weight is all-gathered, one at a time); only process 0
    writes.
    """
    from memagent_jax.distributed import to_host

    out = Path(out_dir)
    config: ModelConfig = model.config
    _, state = nnx.split(model)
    values = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    tensors: dict[str, np.ndarray] = {}
    for ours, (keys, transpose) in _hf_keys(config).items():
        full = to_host(values[ours])  # gathers one weight at a time
        for i, key in enumerate(keys):
            arr = full[i] if ours.startswith("layers/") else full
            tensors[key] = np.ascontiguousarray(arr.T if transpose else arr)
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        _save_weights(shards[0], out / "model.safetensors", meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _save_weights(shard, out / name, meta)
            weight_map.update({k: name for k in shard})
        total = sum(t.nbytes for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    return out
