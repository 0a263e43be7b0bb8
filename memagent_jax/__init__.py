"""memagent-jax: MemAgent (chunked reading with an overwritten memory, multi-conversation DAPO) in JAX.

Submodules are imported lazily so `import memagent_jax` stays cheap:
`from memagent_jax import models, sampler, rl`.
"""

import importlib
from typing import Any

from memagent_jax.tpu_topology import quiet_libtpu_env

quiet_libtpu_env()  # before jax starts: libtpu (the [test] extra, `compile`) stays silent on CPU hosts

__version__ = "0.1.0"
_SUBMODULES = ("models", "sampler", "rl", "agent", "data", "tokenizer", "config", "types")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"memagent_jax.{name}")
    raise AttributeError(f"module 'memagent_jax' has no attribute {name!r}")
