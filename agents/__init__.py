"""Agents: observation encoder + memory backbone + policy/value heads."""

from .agent import ActOutput, EvalOutput, MemoryAgent, build_agent
from .distributions import action_dtype, action_shape, continuous_actions, make_action_head
from .encoders import make_encoder

__all__ = [
    "ActOutput",
    "EvalOutput",
    "MemoryAgent",
    "action_dtype",
    "action_shape",
    "build_agent",
    "continuous_actions",
    "make_action_head",
    "make_encoder",
]
