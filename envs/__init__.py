"""Environments for trxl_rl: MiniGrid-Memory presets, CueRecall, POPGym and Memory Gym
(optional), vector envs."""

from .cue_recall import CUE_RECALL_ID, CueRecall, register_cue_recall
from .make import ENV_ALIASES, UnknownEnvError, episode_metric_names, list_env_ids, make_env
from .memory_gym import MEMORY_GYM_IDS
from .minigrid_memory import MEMORY_MAX_STEPS
from .popgym import register_popgym
from .replay import EpisodeReplay, ReplayError, restore_vector_env, vector_env_state
from .vector import completed_episodes, final_observations, make_vector_env
from .wrappers import RecordSuccess

register_cue_recall()
register_popgym()  # popgym/<ClassName>-v0 ids, where the optional popgym package is installed

__all__ = [
    "CUE_RECALL_ID",
    "ENV_ALIASES",
    "MEMORY_GYM_IDS",
    "MEMORY_MAX_STEPS",
    "CueRecall",
    "EpisodeReplay",
    "RecordSuccess",
    "ReplayError",
    "UnknownEnvError",
    "completed_episodes",
    "episode_metric_names",
    "final_observations",
    "list_env_ids",
    "make_env",
    "make_vector_env",
    "register_popgym",
    "restore_vector_env",
    "vector_env_state",
]
