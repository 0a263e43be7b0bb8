"""Typed configuration: dataclasses for every knob, YAML files with `base:` inheritance, and
dotted `key.sub=value` overrides from the command line. Unknown keys are errors."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from memagent_jax.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclasses.dataclass
class LoraSection:
    """Low-rank adapters over the frozen projections (models/lora.py); rank 0 = full-parameter.

    With rank > 0 the base weights are stored, frozen, in model.dtype and only the adapters (in
    model.param_dtype) are trained: they alone have gradients, optimizer state and checkpoints.
    """

    rank: int = 0
    alpha: float = 0.0  # 0 = rank (scale alpha / rank = 1)
    dropout: float = 0.0  # PEFT's lora_dropout: share of the adapter input zeroed in training, in [0, 1)
    targets: list = dataclasses.field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # merged: the rollout decodes W + (alpha/rank) A @ B (faster; new buffers for the targets);
    # applied: it runs the adapters at every step (no copy of the targeted weights)
    rollout: str = "merged"


@dataclasses.dataclass
class ModelSection:
    """The policy. `path` = an HF directory; empty = random init with the shape below."""

    path: str = ""
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True  # false: unroll the layer loop (shallow models on CPU; compile time grows with depth)
    attention: str = "auto"  # xla | cudnn (GPU) | splash (TPU; interpret mode on CPU) | blocked | auto
    # Random-init shape (used when path is empty).
    architecture: str = "qwen2"
    vocab_size: int = 0  # 0 = the tokenizer's vocabulary
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)


@dataclasses.dataclass
class MeshSection:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # rollout.mode: async only. Devices given to the rollout mesh: N >= 1 devices, a fraction in
    # (0, 1) of them, or 0 = rollout and training share the one mesh (their host work overlaps).
    # The train mesh (data, fsdp, tensor above) takes the rest; the rollout mesh has its own shape.
    rollout_devices: float = 0
    rollout_data: int = -1
    rollout_fsdp: int = 1
    rollout_tensor: int = 1


@dataclasses.dataclass
class AgentSection:
    """The memory workflow (docs/reference.md section 1); defaults are MemAgent's released budgets."""

    policy: str = "overwrite"  # a registered name or "module.path:ClassName"
    policy_kwargs: dict = dataclasses.field(default_factory=dict)
    chunk_size: int = 5000
    max_chunks: int = 8
    max_memory_tokens: int = 1024
    final_style: str = "boxed"  # boxed | answer_is
    # Template overrides (empty = MemAgent's, docs/reference.md section 1); slots {prompt} {memory} {chunk}.
    memory_template: str = ""
    final_template: str = ""
    first_memory: str = ""
    question_budget: int = 1024
    max_final_new_tokens: int = 1024
    # Passed to the chat template (Qwen3): false renders non-thinking prompts (an empty think block
    # after the generation prompt). Either way the overwrite policy cuts any <think>...</think>
    # block from a reply before it becomes the memory.
    enable_thinking: bool = False


@dataclasses.dataclass
class RolloutSection:
    group_size: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # Conversations decoded at once: the continuous engine's slots (KV-cache rows) and the static
    # path's rows per sampler call; 0 = all of a turn's (gen_batch_size x group_size). `plan` and
    # `compile` size the rollout by this same key (plan.rollout_rows).
    max_rows_per_call: int = 64
    engine: str = "continuous"  # continuous (memagent_jax.engine) | static (one batched call per turn)
    # sync: all of a step's rollout, then its update, on one mesh. async: a rollout thread on its
    # own mesh (mesh.rollout_devices) streams scored generation batches to the trainer while it
    # updates (rl/async_trainer.py; rl.max_staleness bounds how old a kept sample may be)
    mode: str = "sync"
    engine_prefill_rows: int = 0  # continuous: requests prefilled per engine call (0 = all free slots)
    engine_max_len: int = 0  # continuous: cache positions per slot (0 = bound from agent budgets)
    engine_decode_steps: int = 32  # continuous: decode steps per engine call
    # continuous: with requests waiting, a decode call returns once this many slots finished, to
    # refill them in one prefill (0 = an eighth of the slots; 1 = refill at every finish)
    engine_refill_batch: int = 0


@dataclasses.dataclass
class DataSection:
    """Where training documents come from."""

    source: str = "ruler_hotpotqa"  # ruler_hotpotqa | memagent_rows | jsonl
    path: str = ""
    num_docs: int = 200
    seed: int = 0
    shuffle: bool = True
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class OverlongSection:
    enable: bool = False
    max_len: int = 1024
    cache_len: int = 256
    factor: float = 1.0


@dataclasses.dataclass
class RLSection:
    """DAPO / MemAgent RL knobs (docs/reference.md sections 2-3)."""

    train_batch_size: int = 128  # groups (documents) per RL step
    gen_batch_size: int = 128  # documents per generation batch
    max_num_gen_batches: int = 0  # 0 = unbounded
    filter_groups: bool = True
    filter_metric: str = "accuracy"  # accuracy | reward: what a kept group's members must differ in
    mini_batch_size: int = 8  # whole groups per optimizer step (a group never straddles two)
    micro_batch_tokens: int = 16384  # tokens per micro-batch (gradient accumulation)
    ppo_epochs: int = 1
    eps_low: float = 0.2
    eps_high: float = 0.28
    clip_c: float = 10.0  # dual-clip constant; <= 0 disables
    agg: str = "token-mean"
    norm_adv_by_std: bool = False
    adv_eps: float = 1e-6
    kl_coef: float = 0.0  # low_var_kl to the frozen initial policy (MemAgent: 0.001)
    entropy_coef: float = 0.0
    overlong: OverlongSection = dataclasses.field(default_factory=OverlongSection)
    overlong_filter: bool = False
    tis_cap: float = 0.0  # truncated importance sampling cap vs sampler log-probs; 0 = off
    tis_level: str = "token"  # token | sequence: TIS weight per token, or one per conversation row
    # masked importance sampling bound c > 1: tokens (or whole rows) whose trainer/sampler ratio
    # is outside [1/c, c] are masked out of the loss (kept in its denominator); 0 = off
    mis_cap: float = 0.0
    mis_level: str = "token"  # token | sequence: mask single tokens, or whole conversation rows
    logprob_chunk: int = 2048  # tokens per device per LM-head slice (rows x positions)
    reward: str = "boxed"  # boxed | sub_em
    # rollout.mode: async: a kept group's oldest token may come from weights at most this many
    # updates old (older groups are dropped and counted); 0 = strictly on-policy (the rollout
    # waits for each update: the same samples and update as sync)
    max_staleness: int = 1
    async_queue: int = 2  # rollout.mode: async: scored generation batches waiting for the trainer


@dataclasses.dataclass
class OptimSection:
    lr: float = 1e-6
    warmup_steps: int = 20
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclasses.dataclass
class TrainerSection:
    total_steps: int = 200
    save_every: int = 10
    keep: int = 3
    out_dir: str = "runs/train"
    seed: int = 0
    async_checkpoint: bool = True
    progress: bool = True


@dataclasses.dataclass
class DistributedSection:
    """jax.distributed: empty coordinator = single process (or auto-detected on TPU/SLURM)."""

    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0
    auto: bool = False


@dataclasses.dataclass
class Config:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    tokenizer: str = ""  # directory; empty = the model's directory
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    agent: AgentSection = dataclasses.field(default_factory=AgentSection)
    rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    rl: RLSection = dataclasses.field(default_factory=RLSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    trainer: TrainerSection = dataclasses.field(default_factory=TrainerSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _Raw(str):
    """An override's text, parsed once the target field's type is known."""


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if isinstance(value, _Raw):
        value = str(value) if typ is str else yaml.safe_load(value) if value.strip() else ""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a mapping, got {value!r}")
        return from_dict(typ, value, prefix=key + ".")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if typ in (int, float, str, bool) and not isinstance(value, typ):
        raise ValueError(f"config key {key!r} expects {typ.__name__}, got {value!r}")
    if typ is int and isinstance(value, bool):
        raise ValueError(f"config key {key!r} expects int, got {value!r}")
    if origin in (dict,) or typ is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} expects a mapping, got {value!r}")
    return value


def turn_rows(cfg: Config) -> int:
    """Conversations decoded at once as the config asks (before rounding to the mesh):
    rollout.max_rows_per_call, or all of a turn's (gen_batch_size x group_size) when 0. The
    engine's slots and the static path's rows per call both come from here."""
    full = cfg.rl.gen_batch_size * cfg.rollout.group_size
    cap = cfg.rollout.max_rows_per_call
    return min(cap, full) if cap > 0 else full


# Keys that configs once had: setting one is an error that says what replaced it.
REMOVED_KEYS: dict[str, str] = {
    # Accepted and never read: the trainer runs no validation pass.
    "rollout.val_temperature": "memagent-jax eval --temperature T on the exported model (MemAgent "
                               "validated at temperature 1.0)",
    "rollout.val_top_p": "memagent-jax eval --top-p P on the exported model (MemAgent validated at "
                         "top_p 0.7)",
    "rollout.engine_slots": "rollout.max_rows_per_call (one key now sizes the engine's slots and the "
                            "static path's rows per call, as plan and compile count them)",
}


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass `cls` from a nested dict; unknown keys raise naming the valid ones."""
    hints = _field_types(cls)
    for k in data:
        if prefix + k in REMOVED_KEYS:
            raise KeyError(f"config key {prefix + k!r} was removed: use {REMOVED_KEYS[prefix + k]}")
    unknown = [k for k in data if k not in hints]
    if unknown:
        raise KeyError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys here: {sorted(hints)}"
        )
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(name: str | Path) -> Path:
    """A path, or a name under configs/ (with or without .yaml)."""
    p = Path(name)
    for cand in (p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    names = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {name!r} not found (looked in . and {CONFIG_DIR}): give a YAML "
                            f"path or one of: {names}")


def _read_yaml(path: Path) -> dict[str, Any]:
    """One YAML file as a dict; InputError naming the file, line and column on a syntax error."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"invalid YAML: {problem}{where}", path,
                         "fix the syntax (indentation, 'key: value' pairs)") from None
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason} at byte {e.start})", path,
                         "save the config as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"a config is a mapping of sections (model:, agent:, ...), got a "
                         f"{type(data).__name__}", path, "write 'section:' blocks of 'key: value'")
    return data


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Reads a YAML config, resolving `base:` (a file or a list of files, relative to it).

    Syntax errors, bad or missing `base:` entries and `base:` cycles are InputErrors naming the file.
    """
    path = resolve_config_path(path)
    if path.resolve() in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path.resolve()))
        raise InputError(f"base: cycle {cycle}", path, "remove the base: entry that leads back")
    data = _read_yaml(path)
    bases = data.pop("base", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise InputError(f"base: must be a file name or a list of them, got {bases!r}", path,
                         "write base: memagent.yaml (paths are relative to this file)")
    merged: dict[str, Any] = {}
    for b in bases:
        bpath = path.parent / b if (path.parent / b).is_file() else b
        try:
            resolved = resolve_config_path(bpath)
        except FileNotFoundError:
            raise InputError(f"base config {b!r} not found", path,
                             "fix the base: entry (a path relative to this file, or a name under "
                             f"{CONFIG_DIR})") from None
        merged = _merge(merged, load_yaml(resolved, (*_chain, path.resolve())))
    return _merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), _Raw(raw)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = dict(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node[k] = dict(node.get(k) or {})
            node = node[k]
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Config from a YAML file (or defaults) plus `key.sub=value` overrides, validated.

    A demo config (a top-level `demo:` section, configs/tiny.yaml) is an InputError pointing at
    `memagent-jax demo`, which reads it.
    """
    source = resolve_config_path(path) if path else None
    data = load_yaml(source) if source else {}
    if "demo" in data:
        raise InputError(f"{source.name} is a demo config (its demo: section is read by "
                         "`memagent-jax demo`), not a train config", source,
                         f"run `memagent-jax demo{'' if source.stem == 'tiny' else ' --config ' + source.stem}`"
                         " to train and evaluate it; `memagent-jax train` and `plan` take configs "
                         "such as memagent.yaml")
    return validate_config(from_dict(Config, apply_overrides(data, overrides or [])), source, overrides)


def save_config(cfg: Config, path: str | Path, *, keep_previous: bool = False) -> Path | None:
    """Writes the resolved config as YAML.

    With `keep_previous`, an existing file with other settings (a run resumed with changed
    settings) is kept as `config.prev-<UTC time>.yaml` beside it, with a warning naming the
    changed keys. Returns the kept file's path, or None.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    kept = None
    if keep_previous and path.is_file() and path.read_text() != text:
        import time
        import warnings

        try:
            old = _flatten(yaml.safe_load(path.read_text()) or {})
        except yaml.YAMLError:
            old = {}
        new = _flatten(yaml.safe_load(text))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        kept = path.with_name(f"{path.stem}.prev-{stamp}{path.suffix}")
        n = 1
        while kept.exists():  # two resumes within a second
            n += 1
            kept = path.with_name(f"{path.stem}.prev-{stamp}-{n}{path.suffix}")
        path.rename(kept)
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:8])
        more = f" (+{len(changed) - 8} more)" if len(changed) > 8 else ""
        warnings.warn(f"{path.parent} was run with other settings ({shown}{more}); "
                      f"the earlier config is kept as {kept.name}", stacklevel=2)
    path.write_text(text)
    return kept


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# The checks live beside the schema (config_checks.py); importing them last keeps
# `from memagent_jax.config import validate_config` working without an import cycle.
from memagent_jax.config_checks import POSITIVE_SETTINGS, validate_config  # noqa: E402,F401
