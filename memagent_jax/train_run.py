"""`memagent-jax train` and `export`: wiring config -> mesh -> policy -> data -> Trainer, and
orbax checkpoint -> HF directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax

from memagent_jax.config import AgentSection, Config, load_config, validate_config
from memagent_jax.data.loader import loader_state, make_loader, restore_loader
from memagent_jax.data.sources import training_source
from memagent_jax.policy import build_mesh, init_distributed, load_policy
from memagent_jax.rl.trainer import RewardFn, Trainer


def make_trainer(cfg: Config, *, reward_fn: RewardFn | None = None, model: Any = None,
                 tokenizer: Any = None, devices: list | None = None) -> Trainer:
    """A Trainer for `cfg` with the configured data source and a grain loader (exact resume);
    rollout.mode: async gives an AsyncTrainer. `devices`: the devices to use (default: all)."""
    validate_config(cfg)  # numeric knobs, before anything is loaded or written
    init_distributed(cfg)
    rollout_mesh = None
    if cfg.rollout.mode == "async":
        from memagent_jax.rl.async_trainer import build_async_meshes

        mesh, rollout_mesh = build_async_meshes(cfg, devices)
    else:
        mesh = build_mesh(cfg, devices)
    model, tokenizer = load_train_policy(cfg, mesh, seed=cfg.trainer.seed, model=model,
                                         tokenizer=tokenizer)
    source = training_source(cfg.data)
    if cfg.rl.gen_batch_size % jax.process_count():
        raise ValueError(f"rl.gen_batch_size={cfg.rl.gen_batch_size} must be a multiple of the "
                         f"{jax.process_count()} processes (each loads its share of documents)")
    it = make_loader(source, batch_size=cfg.rl.gen_batch_size // jax.process_count(),
                     seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    data_state = (lambda: loader_state(it), lambda s: restore_loader(it, s))
    if cfg.rollout.mode == "async":
        from memagent_jax.rl.async_trainer import AsyncTrainer

        return AsyncTrainer(cfg, model, tokenizer, it, mesh=mesh, rollout_mesh=rollout_mesh,
                            reward_fn=reward_fn, data_state=data_state)
    return Trainer(cfg, model, tokenizer, it, mesh=mesh, reward_fn=reward_fn, data_state=data_state)


def load_train_policy(cfg: Config, mesh: jax.sharding.Mesh | None = None, seed: int = 0, *,
                      model: Any = None, tokenizer: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) to train: `load_policy`'s (or the given ones), and with model.lora.rank
    > 0 the base frozen in model.dtype with fresh adapters in model.param_dtype (models/lora.py).

    Bad LoRA settings (unknown target, rank above a target's dimension, a base that does not fit
    model.dtype) are InputErrors before anything is trained."""
    from memagent_jax.models.lora import add_lora, freeze_base, lora_from_section

    lora = lora_from_section(cfg.model.lora, cfg.model.param_dtype)
    if model is None or tokenizer is None:
        base_cfg = cfg
        if lora is not None:  # the base is loaded straight into its frozen dtype
            base_cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, param_dtype=cfg.model.dtype))
        model, tokenizer = load_policy(base_cfg, mesh, seed=seed)
    if lora is not None and getattr(model.config, "lora", None) is None:
        freeze_base(model, cfg.model.dtype)
        add_lora(model, lora, seed=seed, mesh=mesh)
    return model, tokenizer


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
            save_run_base(trainer.model(), trainer.tokenizer, cfg.trainer.out_dir,
                          base_model=cfg.model.path, seed=cfg.trainer.seed)
            status = trainer.run()
            if status == "done":
                export_model(trainer.model(), trainer.tokenizer, Path(cfg.trainer.out_dir) / "hf",
                             agent=cfg.agent)
        finally:
            trainer.close()
    return status


#: `<run>/base`: the policy's config.json and tokenizer, saved at train start, so that `export`
#: can rebuild the model's shape without the base model folder (the checkpoint holds the weights).
#: A LoRA run's checkpoints hold only the adapters: `<run>/base/lora.json` then names the frozen
#: base's folder (model.path; empty = the random init of `seed`) that export and resume load.
RUN_BASE = "base"
LORA_BASE = "lora.json"


def save_run_base(model: Any, tokenizer: Any, run_dir: str | Path, *, base_model: str = "",
                  seed: int = 0) -> Path:
    """Writes the model's config.json and the tokenizer files to `<run_dir>/base` (process 0),
    and for a LoRA model `lora.json` (the base model's folder, the seed of a random base)."""
    from memagent_jax.tokenizer import save_tokenizer

    out = Path(run_dir) / RUN_BASE
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
        save_tokenizer(tokenizer, out)
        lora = getattr(model.config, "lora", None)
        if lora is not None:
            info = {"base_model": str(Path(base_model).absolute()) if base_model else "",
                    "seed": seed, **dataclasses.asdict(lora)}
            (out / LORA_BASE).write_text(json.dumps(info, indent=2))
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
    from memagent_jax.models.lora import merged
    from memagent_jax.tokenizer import save_tokenizer

    model = merged(model)  # LoRA: the adapters folded into the base (a plain HF model)
    out = Path(out_dir)
    shard = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    save_pretrained(model, out, **shard)  # collective in a multi-process job; process 0 writes
    if jax.process_index() == 0:
        save_tokenizer(tokenizer, out)
    if agent is not None:
        write_agent_settings(out, agent)
    return out


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, step: int | None = None, *,
                      adapter: bool = False) -> Path:
    """Restores a run's orbax checkpoint (latest or `step`) and writes an HF directory (a LoRA
    run's adapters merged into its base); with `adapter`, a LoRA run's adapters also as a PEFT
    folder `<out_dir>/adapter` (models/peft_adapter.py)."""
    from memagent_jax.checkpoint import RunCheckpointer
    from memagent_jax.errors import InputError
    from memagent_jax.models.peft_adapter import save_adapter
    from memagent_jax.rl.train_step import init_policy_state, make_optimizer, merge_policy

    run = Path(run_dir)
    if run.name == "checkpoints":
        run = run.parent
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: pass a run folder written by memagent-jax train")
    cfg = load_config(cfg_path)
    lora_info = run / RUN_BASE / LORA_BASE
    info = json.loads(lora_info.read_text()) if lora_info.is_file() else None
    if info is None and cfg.model.lora.rank > 0:  # a LoRA run without base/ (the demo's RL stage)
        info = {"base_model": cfg.model.path, "seed": cfg.trainer.seed}
        lora_info = cfg_path
    if info is not None:
        model, tokenizer = _lora_policy(cfg, info, lora_info)
    else:
        if adapter:
            raise InputError(f"--adapter: {run} is not a LoRA run (no {RUN_BASE}/{LORA_BASE})",
                             run, "drop --adapter (the HF directory holds the whole model)")
        model, tokenizer = _policy_shape(cfg, run, cfg_path)
    tx = make_optimizer(cfg.optim.lr, 1, 1)
    graphdef, state, frozen = init_policy_state(model, tx)
    ckpt = RunCheckpointer(run / "checkpoints", async_save=False)
    try:
        state, _ = ckpt.restore(state, step)
    finally:
        ckpt.close()
    policy = merge_policy(graphdef, state.params, frozen)
    out = export_model(policy, tokenizer, out_dir, agent=cfg.agent)
    if adapter:
        save_adapter(policy, out / "adapter", base_model=info["base_model"])
    return out


def _lora_policy(cfg: Config, info: dict[str, Any], info_path: Path) -> tuple[Any, Any]:
    """A LoRA run's policy shape for restoring its adapters: the frozen base (the folder in
    `<run>/base/lora.json`, or the random init of its seed) with fresh adapters."""
    from memagent_jax.errors import InputError

    base = info["base_model"]
    if base and not Path(base).is_dir():
        raise InputError(f"the LoRA run's base model {base} is missing (the checkpoints hold only "
                         "the adapters)", info_path,
                         "put the base model folder back, or write its new place as base_model here")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=base))
    if base and not cfg.tokenizer:
        cfg.tokenizer = base
    return load_train_policy(cfg, seed=int(info.get("seed", 0)))


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
