"""The policy model: Qwen2/Qwen3/Llama decoder in Flax NNX, HF checkpoints in/out, mesh sharding."""

from memagent_jax.models.hf import from_pretrained, save_pretrained
from memagent_jax.models.model_config import ModelConfig
from memagent_jax.models.sharding import (
    DECODE_RULES,
    TRAIN_RULES,
    MeshConfig,
    make_mesh,
    param_shardings,
    shard_state,
)
from memagent_jax.models.transformer import Decoder, KVCache, count_params, init_model

__all__ = [
    "DECODE_RULES", "TRAIN_RULES", "Decoder", "KVCache", "MeshConfig", "ModelConfig",
    "count_params", "from_pretrained", "init_model", "make_mesh", "param_shardings",
    "save_pretrained", "shard_state",
]
