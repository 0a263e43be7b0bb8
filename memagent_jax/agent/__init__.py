"""The memory agent: prompt templates, memory policies and the multi-conversation rollout."""

from memagent_jax.agent.memory import (
    FullContextPolicy,
    MemoryPolicy,
    OverwritePolicy,
    available_policies,
    center_truncate,
    make_policy,
    register_policy,
)
from memagent_jax.agent.prompts import FINAL_STYLES, PromptBuilder, PromptTemplates
from memagent_jax.agent.rollout import RolloutResult, rollout, sampler_generate_fn
from memagent_jax.agent.window import WindowFit, fit_window

__all__ = [
    "FINAL_STYLES",
    "FullContextPolicy",
    "MemoryPolicy",
    "OverwritePolicy",
    "PromptBuilder",
    "PromptTemplates",
    "RolloutResult",
    "WindowFit",
    "available_policies",
    "center_truncate",
    "fit_window",
    "make_policy",
    "register_policy",
    "rollout",
    "sampler_generate_fn",
]
