"""Building the policy (model + tokenizer) and the device mesh from a Config; multi-host init."""

from __future__ import annotations

from typing import Any

import jax

from memagent_jax.checks import check_vocab, load_checked
from memagent_jax.config import Config
from memagent_jax.models import (
    MeshConfig,
    ModelConfig,
    init_model,
    make_mesh,
    shard_state,
)
from memagent_jax.models.model_config import dtype_from_name
from memagent_jax.tokenizer import load_tokenizer


def init_distributed(cfg: Config) -> None:
    """jax.distributed.initialize from config (or auto-detection on TPU / SLURM) when needed;
    a second call (the run-folder lock needs it before `make_trainer` calls it) does nothing."""
    d = cfg.distributed
    if d.num_processes <= 1 and not d.coordinator_address and not d.auto:
        return
    if jax.distributed.is_initialized():
        return
    # Must not touch the backend (jax.default_backend() would initialise it, and initialize()
    # then refuses). The CPU collectives setting only affects the CPU client: harmless elsewhere.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if d.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=d.coordinator_address,
                                   num_processes=d.num_processes, process_id=d.process_id)


def build_mesh(cfg: Config, devices: list | None = None) -> jax.sharding.Mesh:
    """The config's (data, fsdp, tensor) mesh over `devices` (default: all of them)."""
    return make_mesh(MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices)


def random_model_config(cfg: Config, vocab_size: int) -> ModelConfig:
    m = cfg.model
    return ModelConfig(
        vocab_size=m.vocab_size or vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size, num_layers=m.num_layers, num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads, architecture=m.architecture,
        qkv_bias=m.architecture == "qwen2", tie_word_embeddings=m.tie_word_embeddings,
        rope_theta=m.rope_theta, max_position_embeddings=m.max_position_embeddings,
        param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, attention=m.attention,
        scan_layers=m.scan_layers,
    )


def load_policy(cfg: Config, mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer): an HF directory when cfg.model.path is set, else a random init of the
    configured shape sized to the tokenizer (cfg.tokenizer). Weights are placed on `mesh`."""
    tok_dir = cfg.tokenizer or cfg.model.path
    if not tok_dir:
        raise ValueError("no tokenizer: set tokenizer=DIR (or model.path=DIR with tokenizer files)")
    if cfg.model.path:  # files checked (config.json, safetensors headers, vocabulary) before loading
        return load_checked(cfg.model.path, tok_dir, dtype=dtype_from_name(cfg.model.param_dtype),
                            compute_dtype=dtype_from_name(cfg.model.dtype), mesh=mesh,
                            remat=cfg.model.remat, attention=cfg.model.attention,
                            scan_layers=cfg.model.scan_layers)
    tokenizer = load_tokenizer(tok_dir)
    model_config = random_model_config(cfg, tokenizer.vocab_size)
    check_vocab(tokenizer, model_config.vocab_size, tok_dir,
                fix="set model.vocab_size=0 (the tokenizer's) or at least the tokenizer's size")
    model = init_model(model_config, seed=seed)
    if mesh is not None:
        shard_state(model, mesh)
    return model, tokenizer
