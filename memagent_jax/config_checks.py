"""Checks of a built Config before anything is loaded or written: numeric knobs, LoRA, the
off-policy correction and async RL keys. Each failure is one InputError naming the key, where it
came from (the file, or the command line) and the fix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from memagent_jax.config import Config
from memagent_jax.errors import InputError


#: Settings that must be >= 1, with what they count (validate_config).
POSITIVE_SETTINGS: dict[str, str] = {
    "trainer.total_steps": "RL steps to run",
    "trainer.save_every": "steps between checkpoints",
    "agent.chunk_size": "tokens per chunk",
    "agent.max_memory_tokens": "memory tokens",
    "agent.max_final_new_tokens": "answer tokens",
    "agent.question_budget": "question tokens",
    "rollout.group_size": "rollouts per document",
    "rl.train_batch_size": "documents per RL step",
    "rl.gen_batch_size": "documents per generation batch",
    "rl.mini_batch_size": "documents per optimizer step",
    "rl.micro_batch_tokens": "tokens per micro-batch",
    "rl.ppo_epochs": "epochs per RL step",
    "rl.logprob_chunk": "tokens per device per log-prob chunk (rows x positions)",
    "rl.async_queue": "generation batches queued for the trainer",
}


def validate_config(cfg: Config, source: str | Path | None = None,
                    overrides: list[str] | None = None) -> Config:
    """Check the numeric knobs up front (POSITIVE_SETTINGS >= 1); returns `cfg`.

    The InputError names the setting, where it came from (`source`, or "command line" when an
    override set it) and the fix, before anything is trained or written.
    """
    given = {o.split("=", 1)[0].strip() for o in overrides or []}
    defaults = Config()
    for key, what in POSITIVE_SETTINGS.items():
        value = cfg
        default: Any = defaults
        for part in key.split("."):
            value, default = getattr(value, part), getattr(default, part)
        if value < 1:
            where = "command line" if key in given else (os.fspath(source) if source else None)
            raise InputError(f"{key}={value} is not a positive number of {what}", where,
                             f"set {key} >= 1 (default {default})")
    from memagent_jax.models.lora import lora_from_section  # rank >= 0, known targets, dropout

    lora_where = ("command line" if any(k.startswith("model.lora") for k in given)
                  else (os.fspath(source) if source else None))
    lora_from_section(cfg.model.lora, cfg.model.param_dtype, lora_where)
    if cfg.model.lora.rollout not in ("merged", "applied"):
        raise InputError(f"model.lora.rollout={cfg.model.lora.rollout!r}", lora_where,
                         "set model.lora.rollout to merged (faster decode) or applied (no copy "
                         "of the adapted weights)")
    _validate_async(cfg, given, source)
    _validate_off_policy(cfg, given, source)
    return cfg


def _validate_off_policy(cfg: Config, given: set[str], source: str | Path | None) -> None:
    """The off-policy correction keys (rl/off_policy.py): rl.tis_cap, rl.tis_level, rl.mis_cap,
    rl.mis_level."""
    def where(key: str) -> str | None:
        return "command line" if key in given else (os.fspath(source) if source else None)

    rl = cfg.rl
    for key in ("tis_level", "mis_level"):
        if getattr(rl, key) not in ("token", "sequence"):
            raise InputError(f"rl.{key}={getattr(rl, key)!r}", where(f"rl.{key}"),
                             f"set rl.{key} to token (one ratio per token) or sequence (one ratio "
                             "per conversation row)")
    if rl.tis_cap < 0:
        raise InputError(f"rl.tis_cap={rl.tis_cap} is negative", where("rl.tis_cap"),
                         "set rl.tis_cap to the truncation cap (> 0, e.g. 2.0) or 0 (off)")
    if rl.mis_cap != 0 and rl.mis_cap <= 1:
        raise InputError(f"rl.mis_cap={rl.mis_cap} is not a bound above 1", where("rl.mis_cap"),
                         "set rl.mis_cap to a bound c > 1 (tokens whose ratio is outside [1/c, c] "
                         "are masked, e.g. 2.0) or 0 (off)")


def _validate_async(cfg: Config, given: set[str], source: str | Path | None) -> None:
    """rollout.mode and the async keys (rl.max_staleness, mesh.rollout_devices)."""
    def where(key: str) -> str | None:
        return "command line" if key in given else (os.fspath(source) if source else None)

    if cfg.rollout.mode not in ("sync", "async"):
        raise InputError(f"rollout.mode={cfg.rollout.mode!r}", where("rollout.mode"),
                         "set rollout.mode to sync (rollout, then update) or async (rollout and "
                         "update at the same time on their own meshes)")
    if cfg.rl.max_staleness < 0:
        raise InputError(f"rl.max_staleness={cfg.rl.max_staleness} is negative", where("rl.max_staleness"),
                         "set rl.max_staleness >= 0 (0 = strictly on-policy)")
    n = cfg.mesh.rollout_devices
    if n < 0 or (n >= 1 and n != int(n)):
        raise InputError(f"mesh.rollout_devices={n}", where("mesh.rollout_devices"),
                         "set mesh.rollout_devices to a device count >= 1, a fraction in (0, 1), or "
                         "0 (rollout and training share one mesh)")
