"""The agent settings of an `answer` / `eval` call: flags, else the model folder's saved settings.

A model folder exported by `train`, `export` or the demo holds the agent settings the policy was
trained with (`memagent_agent.json`, `agent/settings_file.py`). `answer` and `eval` take them as
their defaults: a flag given on the command line wins, a setting neither given nor saved is left
to the command's own default (budgets fitted to the window, the largest chunk that fits, the
reference templates). A saved question budget is a lower bound, not a limit: it reserved room
for the trained questions, and a longer question is read whole. `FolderSettings.summary` is the
one stderr line naming what came from the folder; `far_from_training` lists what departs far from
the saved settings (a chunk several times the trained one, other templates, smaller budgets), for
one warning.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memagent_jax.agent.prompts import FINAL_STYLES, templates_from_config
from memagent_jax.agent.settings_file import SETTINGS_FILE, read_agent_settings
from memagent_jax.config import AgentSection

#: A chunk this many times longer (or shorter) than the trained one is far from training.
CHUNK_FACTOR = 2.0

#: The settings a flag can set; values None mean "not given".
FLAG_FIELDS = ("policy", "chunk_size", "max_memory_tokens", "max_final_new_tokens", "question_budget",
               "final_style", "enable_thinking")


@dataclasses.dataclass(frozen=True)
class FolderSettings:
    """The agent settings of one call. Fields left None are for the command to fill (window fit)."""

    agent: AgentSection  # templates, policy, policy_kwargs, final_style, thinking: always set
    chunk_size: int | None
    max_memory_tokens: int | None
    max_final_new_tokens: int | None
    question_budget: int | None
    saved: AgentSection | None  # the folder's settings (None: the folder has no settings file)
    path: Path  # where they were (or would be) read from
    from_folder: tuple[str, ...]  # the settings that came from the folder (no flag given)

    def summary(self, flags: Mapping[str, str]) -> str | None:
        """One line: which settings came from the folder's file (None without a file)."""
        if self.saved is None:
            return None
        s = self.saved
        shown = {"policy": f"policy {s.policy}" + (f" {s.policy_kwargs}" if s.policy_kwargs else ""),
                 "chunk_size": f"chunk {s.chunk_size}", "max_memory_tokens": f"memory {s.max_memory_tokens}",
                 "max_final_new_tokens": f"answer {s.max_final_new_tokens}",
                 "question_budget": f"question budget at least {s.question_budget}",
                 "final_style": f"final style {s.final_style}",
                 "templates": f"templates and first memory {s.first_memory!r}",
                 "enable_thinking": f"thinking {'on' if s.enable_thinking else 'off'}"}
        taken = [shown[k] for k in shown if k in self.from_folder]
        given = [flags.get(k, k) for k in FLAG_FIELDS if k not in self.from_folder]
        line = f"agent settings from {self.path}: " + (", ".join(taken) if taken else "none")
        return line + (f" (given: {', '.join(given)})" if given else "")


def folder_settings(model_dir: str | Path, given: Mapping[str, Any]) -> FolderSettings:
    """The settings of a call on `model_dir`: `given` (the flags, None = not given, keys in
    FLAG_FIELDS) over the folder's saved settings, over nothing (None budgets, MemAgent's
    reference templates, policy overwrite, boxed, non-thinking).

    A --final-style other than the saved one takes that style's reference final template; a
    --policy other than the saved one drops the saved policy_kwargs (they belong to that policy).
    """
    unknown = set(given) - set(FLAG_FIELDS)
    if unknown:
        raise TypeError(f"folder_settings: unknown settings {sorted(unknown)}")
    saved = read_agent_settings(model_dir)
    path = Path(model_dir) / SETTINGS_FILE
    base = saved if saved is not None else AgentSection()
    pick = {k: (given.get(k) if given.get(k) is not None else getattr(saved, k, None)) for k in FLAG_FIELDS}
    from_folder = tuple(k for k in FLAG_FIELDS if given.get(k) is None and saved is not None)
    policy = pick["policy"] or "overwrite"
    style = pick["final_style"] or "boxed"
    agent = dataclasses.replace(
        base, policy=policy, final_style=style, enable_thinking=bool(pick["enable_thinking"]),
        policy_kwargs=dict(base.policy_kwargs) if policy == base.policy else {},
        final_template=base.final_template if style == base.final_style else FINAL_STYLES[style])
    if saved is not None:
        from_folder += ("templates",)
    return FolderSettings(agent=agent, chunk_size=pick["chunk_size"], max_memory_tokens=pick["max_memory_tokens"],
                          max_final_new_tokens=pick["max_final_new_tokens"], question_budget=pick["question_budget"],
                          saved=saved, path=path, from_folder=from_folder)


def far_from_training(saved: AgentSection | None, used: AgentSection, *,
                      question_tokens: int | None = None) -> list[str]:
    """What in `used` departs far from the settings the policy was trained with (`saved`): a
    chunk more than CHUNK_FACTOR times longer or shorter, smaller memory or answer budgets, a
    longer question than the trained budget, another policy, templates or thinking mode.
    Empty when nothing does, or when nothing is known of the training (`saved` None)."""
    if saved is None:
        return []
    out = []
    if used.policy == saved.policy:
        ratio = used.chunk_size / saved.chunk_size
        if ratio > CHUNK_FACTOR or ratio < 1 / CHUNK_FACTOR:
            out.append(f"chunk {used.chunk_size} tokens vs {saved.chunk_size} trained ({ratio:.3g}x)")
    else:
        out.append(f"policy {used.policy} vs {saved.policy} trained")
    if used.max_memory_tokens < saved.max_memory_tokens:
        out.append(f"memory {used.max_memory_tokens} tokens vs {saved.max_memory_tokens} trained")
    if used.max_final_new_tokens < saved.max_final_new_tokens:
        out.append(f"answer budget {used.max_final_new_tokens} tokens vs {saved.max_final_new_tokens} trained")
    if question_tokens is not None and question_tokens > saved.question_budget:
        out.append(f"the question is {question_tokens} tokens, over the trained budget {saved.question_budget}")
    a, b = templates_from_config(used), templates_from_config(saved)
    names = {"memory_update": "memory template", "final": "final template", "first_memory": "first memory"}
    changed = [names[f] for f in names if getattr(a, f) != getattr(b, f)]
    if changed:
        out.append(f"{' and '.join(changed)} other than the saved one{'s' if len(changed) > 1 else ''}")
    if used.enable_thinking != saved.enable_thinking:
        out.append(f"thinking {'on' if used.enable_thinking else 'off'} vs "
                   f"{'on' if saved.enable_thinking else 'off'} trained")
    return out


def warn_far_from_training(settings: FolderSettings, used: AgentSection, *, question_tokens: int | None = None
                           ) -> list[str]:
    """One warning listing `far_from_training`'s findings (none when there are none); returns them."""
    found = far_from_training(settings.saved, used, question_tokens=question_tokens)
    if found:
        warnings.warn(f"this model was trained with other agent settings ({settings.path}): {'; '.join(found)}; "
                      "its answers may be poor: leave those flags out to use the trained settings",
                      stacklevel=2)
    return found
