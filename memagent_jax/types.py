"""Data types shared across the pipeline: sampler output, conversations and trajectories.

A *trajectory* is one document x one group member: K memory-update conversations plus one final
conversation. A *conversation* is one independent (prompt, response) pair. The rollout returns a
flat batch of conversations (what the loss consumes) and per-trajectory records (what rewards and
advantages consume); advantages are computed per trajectory and broadcast to its conversations.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

FinishReason = Literal["eos", "length"]


@dataclasses.dataclass
class SampleOutput:
    """What `sampler.generate` returns, one entry per prompt row."""

    tokens: list[list[int]]  # generated ids per row, the EOS included when emitted
    logps: list[list[float]]  # fp32 log-softmax(logits / T) of each generated id
    finish_reasons: list[str]  # "eos" | "length"
    # The policy version (number of updates) of the weights that sampled these rows; None when the
    # caller does not track versions (read as 0). Async RL (rl/async_trainer.py) sets it.
    version: int | None = None

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]


@dataclasses.dataclass
class Conversation:
    """One independent (prompt, response) pair of a trajectory."""

    prompt: list[int]
    response: list[int]
    sampler_logps: list[float]
    trajectory_id: int
    group_id: int
    turn: int  # 0..K-1 memory turns, K = final turn
    is_final: bool
    finish_reason: str
    policy_version: int = 0  # version of the weights that sampled the response (async RL)


@dataclasses.dataclass
class Trajectory:
    """One document x one group member: its conversations, final answer, reward."""

    trajectory_id: int
    group_id: int  # the document (prompt) index: trajectories of one group share it
    conversation_ids: list[int]  # indices into the flat conversation list
    num_chunks: int
    answer_text: str
    ground_truths: list[str]
    memories: list[str] = dataclasses.field(default_factory=list)  # memory text after each turn
    # Written by the trainer: the reward function's (reward, accuracy), then the reward with
    # overlong shaping and the advantage (rollout leaves them 0).
    reward: float = 0.0
    accuracy: float = 0.0
    advantage: float = 0.0
    memory_capped_turns: int = 0  # memory replies cut at max_memory_tokens


@dataclasses.dataclass
class ConversationBatch:
    """Padded numpy arrays of a flat list of conversations, ready for the train step.

    prompt and response are concatenated into `tokens` [N, T]; `response_mask` marks the
    response positions whose log-prob is trained (the token at position t is predicted from the
    logits at t-1). `advantages` is per token (broadcast from the trajectory).
    """

    tokens: np.ndarray  # int32 [N, T]
    response_mask: np.ndarray  # float32 [N, T]
    advantages: np.ndarray  # float32 [N, T]
    sampler_logps: np.ndarray  # float32 [N, T] (0 outside the response)
    trajectory_ids: np.ndarray  # int32 [N]
    group_ids: np.ndarray  # int32 [N]
    is_final: np.ndarray  # bool [N]
