"""`memagent-jax train` and `export`: wiring config -> mesh -> policy -> data -> Trainer, and
orbax checkpoint -> HF directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from flax import nnx

from memagent_jax.config import AgentSection, Config, load_config, validate_config
from memagent_jax.data.loader import loader_state, make_loader, restore_loader
from memagent_jax.data.sources import training_source
from memagent_jax.policy import build_mesh, init_distributed, load_policy
from memagent_jax.rl.trainer import RewardFn, Trainer


def make_trainer(cfg: Config, *, reward_fn: RewardFn | None = None, model: Any = None,
                 tokenizer: Any = None) -> Trainer:
    """A Trainer for `cfg` with the configured data source and a grain loader (exact resume)."""
    validate_config(cfg)  # numeric knobs, before anything is loaded or written
    init_distributed(cfg)
    mesh = build_mesh(cfg)
    if model is None or tokenizer is None:
        model, tokenizer = load_policy(cfg, mesh, seed=cfg.trainer.seed)
    source = training_source(cfg.data)
    if cfg.rl.gen_batch_size % jax.process_count():
        raise ValueError(f"rl.gen_batch_size={cfg.rl.gen_batch_size} must be a multiple of the "
                         f"{jax.process_count()} processes (each loads its share of documents)")
    it = make_loader(source, batch_size=cfg.rl.gen_batch_size // jax.process_count(),
                     seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    return Trainer(cfg, model, tokenizer, it, mesh=mesh, reward_fn=reward_fn,
                   data_state=(lambda: loader_state(it), lambda s: restore_loader(it, s)))


def run_training(cfg: Config, *, reward_fn: RewardFn | None = None) -> str:
    """Trains, then exports the final policy to `<out_dir>/hf` (process 0). Returns the status.

    The run folder is locked for the whole run (`run_lock.py`; process 0 holds it): a second run
    on the same `trainer.out_dir` stops with `RunFolderBusy` before it writes anything.
    """
    from memagent_jax.run_lock import run_folder_lock

    validate_config(cfg)  # before the lock: a bad config fails the same way, busy folder or not
    init_distributed(cfg)
    with run_folder_lock(cfg.trainer.out_dir, collective=True):
        trainer = make_trainer(cfg, reward_fn=reward_fn)
        try:
            save_run_base(trainer.model(), trainer.tokenizer, cfg.trainer.out_dir)
            status = trainer.run()
            if status == "done":
                export_model(trainer.model(), trainer.tokenizer, Path(cfg.trainer.out_dir) / "hf",
                             agent=cfg.agent)
        finally:
            trainer.close()
    return status


#: `<run>/base`: the policy's config.json and tokenizer, saved at train start, so that `export`
#: can rebuild the model's shape without the base model folder (the checkpoint holds the weights).
RUN_BASE = "base"


def save_run_base(model: Any, tokenizer: Any, run_dir: str | Path) -> Path:
    """Writes the model's config.json and the tokenizer files to `<run_dir>/base` (process 0)."""
    import json

    from memagent_jax.tokenizer import save_tokenizer

    out = Path(run_dir) / RUN_BASE
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
        save_tokenizer(tokenizer, out)
    return out


def export_model(model: Any, tokenizer: Any, out_dir: str | Path, *, agent: AgentSection | None = None,
                 max_shard_bytes: int | None = None) -> Path:
    """An HF directory (config.json + safetensors + tokenizer files) servable by transformers/vLLM.

    `agent`: the agent settings the policy was trained with, written beside the weights as
    `memagent_agent.json` (`agent/settings_file.py`) so that `answer` and `eval` use them; None for
    a model that is not a trained agent (the demo's base). `max_shard_bytes`: shard the
    safetensors above this size (default: `save_pretrained`'s).
    """
    from memagent_jax.agent.settings_file import write_agent_settings
    from memagent_jax.models import save_pretrained
    from memagent_jax.tokenizer import save_tokenizer

    out = Path(out_dir)
    shard = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    save_pretrained(model, out, **shard)  # collective in a multi-process job; process 0 writes
    if jax.process_index() == 0:
        save_tokenizer(tokenizer, out)
    if agent is not None:
        write_agent_settings(out, agent)
    return out


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Restores a run's orbax checkpoint (latest or `step`) and writes an HF directory."""
    from memagent_jax.checkpoint import RunCheckpointer
    from memagent_jax.rl.train_step import init_train_state, make_optimizer

    run = Path(run_dir)
    if run.name == "checkpoints":
        run = run.parent
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: pass a run folder written by memagent-jax train")
    cfg = load_config(cfg_path)
    model, tokenizer = _policy_shape(cfg, run, cfg_path)
    tx = make_optimizer(cfg.optim.lr, 1, 1)
    graphdef, state = init_train_state(model, tx)
    ckpt = RunCheckpointer(run / "checkpoints", async_save=False)
    try:
        state, _ = ckpt.restore(state, step)
    finally:
        ckpt.close()
    return export_model(nnx.merge(graphdef, state.params), tokenizer, out_dir, agent=cfg.agent)


def _policy_shape(cfg: Config, run: Path, cfg_path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) for restoring a run's checkpoint into: built from `<run>/base` when the
    run saved one (the base model folder may have moved; the weights come from the checkpoint),
    else from the config (model.path or a random init)."""
    from memagent_jax.errors import InputError
    from memagent_jax.models import ModelConfig, init_model
    from memagent_jax.tokenizer import load_tokenizer

    base = run / RUN_BASE
    if (base / "config.json").is_file():
        config = ModelConfig.from_pretrained_dir(base, param_dtype=cfg.model.param_dtype,
                                                 dtype=cfg.model.dtype, remat=cfg.model.remat,
                                                 attention=cfg.model.attention,
                                                 scan_layers=cfg.model.scan_layers)
        return init_model(config, seed=0), load_tokenizer(base)
    for key, path in (("model.path", cfg.model.path), ("tokenizer", cfg.tokenizer)):
        if path and not Path(path).is_dir():
            raise InputError(f"{key} {path} is missing and {run} has no {RUN_BASE}/ folder "
                             "(config.json + tokenizer) to rebuild the model from", cfg_path,
                             f"put the folder back, or pass {key}'s new place in {cfg_path.name}")
    return load_policy(cfg)
