"""The agent settings a policy was trained with, saved next to its exported weights.

An exported HF folder (config.json, safetensors, tokenizer) says nothing about the memory
workflow the policy learned: chunk size, memory and answer budgets, templates, first memory.
A policy trained with its own settings (the demo's 32-token chunks, 8-token memory and short
templates) reads a document badly with anyone else's. So every export writes them into one small
JSON file beside config.json, `memagent_agent.json` (HF tools ignore files they do not know):

    {"format": "memagent-jax agent settings", "version": 1,
     "policy": "overwrite", "policy_kwargs": {}, "chunk_size": 32, "max_chunks": 3,
     "max_memory_tokens": 8, "max_final_new_tokens": 16, "question_budget": 64,
     "final_style": "boxed", "memory_template": "...", "final_template": "...",
     "first_memory": "none", "enable_thinking": false}

The keys are the fields of `config.AgentSection`; the templates are written out in full (the
reference texts too), so the file does not depend on this package's defaults. `max_chunks` is the
training cap on chunks per document (`answer` and `eval` read every chunk).

`answer` and `eval` take it as their defaults (`agent/cli_settings.py`); flags override.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from memagent_jax.agent.prompts import templates_from_config
from memagent_jax.config import AgentSection
from memagent_jax.errors import InputError

#: The file's name inside an exported model folder.
SETTINGS_FILE = "memagent_agent.json"
FORMAT = "memagent-jax agent settings"
VERSION = 1
_FIELDS = {f.name: f for f in dataclasses.fields(AgentSection)}
_INTS = ("chunk_size", "max_chunks", "max_memory_tokens", "max_final_new_tokens", "question_budget")
_STRS = ("policy", "final_style", "memory_template", "final_template", "first_memory")


def settings_dict(agent: AgentSection) -> dict[str, Any]:
    """The file's content for `agent`: its fields, with the templates resolved to their full text."""
    t = templates_from_config(agent)
    return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(agent),
            "memory_template": t.memory_update, "final_template": t.final, "first_memory": t.first_memory}


def write_agent_settings(out_dir: str | os.PathLike[str], agent: AgentSection) -> Path:
    """Writes `<out_dir>/memagent_agent.json`: the agent settings the exported policy was trained with.

    Every path that exports a trained policy calls this one function beside its weights: the
    full-model export (`train_run.export_model`, single or sharded safetensors, used by `train`,
    `export` and the demo's warm start and RL stages) and any later adapter export (a LoRA
    adapter folder is served with the same agent settings, so it must call this too). Only
    process 0 writes in a multi-process job; returns the file's path.
    """
    import jax

    path = Path(out_dir) / SETTINGS_FILE
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(settings_dict(agent), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return path


def read_agent_settings(model_dir: str | os.PathLike[str]) -> AgentSection | None:
    """The agent settings saved in a model folder, or None when it has no `memagent_agent.json`.

    A file that is not valid JSON, of another format or version, with unknown keys or values of
    the wrong type is an InputError naming the file and the key.
    """
    path = Path(model_dir) / SETTINGS_FILE
    if not path.is_file():
        return None
    fix = f"re-export the model with `memagent-jax export`, or delete {SETTINGS_FILE} to use the defaults"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"the agent settings file is not valid JSON ({e})", path, fix) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"the agent settings file lacks \"format\": \"{FORMAT}\"", path, fix)
    if data.get("version") != VERSION:
        raise InputError(f"agent settings version {data.get('version')!r}; this memagent-jax reads version "
                         f"{VERSION}", path, "upgrade memagent-jax, or " + fix)
    fields = {k: v for k, v in data.items() if k not in ("format", "version")}
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise InputError(f"unknown agent setting(s) {unknown}; known: {sorted(_FIELDS)}", path, fix)
    for key, value in fields.items():
        bad = ((key in _INTS and (not isinstance(value, int) or isinstance(value, bool) or value < 1))
               or (key in _STRS and not isinstance(value, str))
               or (key == "enable_thinking" and not isinstance(value, bool))
               or (key == "policy_kwargs" and not isinstance(value, dict)))
        if bad:
            want = ("a positive integer" if key in _INTS else "a string" if key in _STRS
                    else "true or false" if key == "enable_thinking" else "an object")
            raise InputError(f"agent setting {key!r} is {value!r}, not {want}", path, fix)
    return AgentSection(**fields)
