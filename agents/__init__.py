"""Agents: observation encoder + memory backbone + policy/value heads."""

from .distributions import action_dtype, action_shape, make_action_head
from .encoders import make_encoder
from .trxl_agent import ActOutput, EvalOutput, TrXLAgent

__all__ = [
    "ActOutput",
    "EvalOutput",
    "TrXLAgent",
    "action_dtype",
    "action_shape",
    "make_action_head",
    "make_encoder",
]
