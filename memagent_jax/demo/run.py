"""A demo run: its folder (stages' done files), its resolved configuration (the RL `Config` plus
the `demo:` section, `DemoSection`) and the memory agent those settings make.

The stages (`pipeline.py`) and the evaluation (`evaluation.py`) both read a run through this
module, so neither imports the other.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from memagent_jax.config import Config, apply_overrides, from_dict, load_yaml

STAGES = ("tokenizer", "data", "pretrain", "sft", "rl", "eval", "report")
TASKS = ("needle", "multivalue")


@dataclasses.dataclass
class DemoSection:
    """Knobs of the demo that are not part of an RL run's `Config`."""

    seed: int = 0
    # "needle": one key, one value (demo/task.py); "multivalue": one key with min_values to
    # max_values values in distinct chunks, all asked (demo/multivalue.py)
    task: str = "needle"
    min_values: int = 2
    max_values: int = 3
    # memory policies evaluated beside overwrite with the RL and warm-start models (registered
    # names or "module.path:ClassName"); each adds the rows "rl_<name>" and "warm_start_<name>"
    compare_policies: list = dataclasses.field(default_factory=list)
    vocab_size: int = 1024  # SentencePiece vocabulary
    num_keys: int = 8  # keys the questions ask about (values: the digits 0-9)
    train_chunks: int = 3  # training length, in chunks of agent.chunk_size tokens
    min_distractors: int = 1
    max_distractors: int = 3
    max_decoys: int = 3  # plain-word key mentions added to training documents (not evaluation ones)
    pretrain_docs: int = 4000  # documents of 1..pretrain_max_chunks chunks, every needle asked
    pretrain_max_chunks: int = 12
    pretrain_steps: int = 400
    pretrain_batch_size: int = 16
    pretrain_lr: float = 3e-3
    pretrain_copy_share: float = 1.0  # repeated random spans per lookup document (induction heads)
    pretrain_copy_steps: int = 0  # a first phase of repeated random spans only (induction heads form)
    context_window: int = 384  # document tokens the full-context baseline reads (center-truncated)
    careless: float = 0.5  # fraction of warm-start documents from a careless teacher
    sft_docs: int = 2000
    sft_max_chunks: int = 3  # warm-start documents have train_chunks..sft_max_chunks chunks
    sft_steps: int = 300
    sft_batch_size: int = 16
    sft_lr: float = 1e-3
    sft_warmup_steps: int = 20
    rl_docs: int = 800
    # RL documents have train_chunks..rl_max_chunks chunks (0: train_chunks only); the RL stage's
    # agent.max_chunks is the larger of the two
    rl_max_chunks: int = 0
    rl_short_share: float = 0.0  # with rl_max_chunks: this share of RL documents at train_chunks
    rl_min_distractors: int = 0  # RL documents: some with the target alone, so some chunks hold no needle
    eval_docs: int = 200  # unseen documents per length
    eval_multiples: list = dataclasses.field(default_factory=lambda: [1, 4, 16, 32, 64])
    eval_temperature: float = 0.0  # 0 = greedy
    eval_top_p: float = 1.0
    progress: bool = True
    # false: start from the base model shipped in memagent_jax/demo/base (tokenizer + pretrained
    # lookup model, made by `memagent-jax demo --from-scratch --ship-base`); true: train both here
    from_scratch: bool = False


def load_demo_config(config: str | Path | None = "tiny", overrides: list[str] | None = None
                     ) -> tuple[Config, DemoSection]:
    """(Config, DemoSection) from a YAML with a `demo:` section and `key=value` overrides."""
    data = load_yaml(config) if config else {}
    demo_data = dict(data.pop("demo", None) or {})
    rest, demo_over = [], []
    for o in overrides or []:
        (demo_over if o.strip().startswith("demo.") else rest).append(o)
    demo_data = apply_overrides({"demo": demo_data}, demo_over)["demo"]
    cfg = from_dict(Config, apply_overrides(data, rest))
    demo = from_dict(DemoSection, demo_data, prefix="demo.")
    if demo.task not in TASKS:
        raise ValueError(f"demo.task={demo.task!r}: known tasks are {', '.join(TASKS)}")
    if demo.eval_multiples != sorted(set(int(m) for m in demo.eval_multiples)) or demo.eval_multiples[0] < 1:
        raise ValueError(f"demo.eval_multiples must be increasing positive integers, got {demo.eval_multiples}")
    return cfg, demo


@dataclasses.dataclass
class Run:
    """A run folder and its resolved configuration."""

    root: Path
    cfg: Config
    demo: DemoSection

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def done_file(self, stage: str) -> Path:
        return self.path(stage, "done.json")

    def is_done(self, stage: str) -> bool:
        return self.done_file(stage).is_file()

    def mark_done(self, stage: str, seconds: float, info: dict[str, Any] | None = None) -> None:
        self.done_file(stage).parent.mkdir(parents=True, exist_ok=True)
        self.done_file(stage).write_text(json.dumps({"stage": stage, "seconds": seconds, **(info or {})},
                                                    indent=2))

    def stage_seconds(self) -> dict[str, float]:
        return {s: json.loads(self.done_file(s).read_text())["seconds"] for s in STAGES if self.is_done(s)}


def task_parts(run: Run) -> tuple[Any, Any]:
    """(sample builder for `task.generate`, warm-start teacher) of the run's `demo.task`."""
    d = run.demo
    if d.task == "multivalue":
        from memagent_jax.demo import multivalue as M

        return M.build_sample, M.MultiValueTeacher(d.careless)
    from memagent_jax.demo import task as T

    return T.build_sample, T.NeedleTeacher(d.careless)


def agent_parts(run: Run, tokenizer: Any, training_chunks: int | None) -> tuple[Any, Any]:
    """(overwrite memory policy, prompt builder) of the demo's agent config."""
    from memagent_jax.agent.memory import make_policy
    from memagent_jax.agent.prompts import PromptBuilder, templates_from_config

    a = run.cfg.agent
    policy = make_policy("overwrite", chunk_size=a.chunk_size, max_chunks=training_chunks,
                         max_memory_tokens=a.max_memory_tokens)
    return policy, PromptBuilder(tokenizer, templates_from_config(a))
