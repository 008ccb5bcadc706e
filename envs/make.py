"""``make_env``: one environment by id, with our presets and wrappers applied."""

from __future__ import annotations

import difflib
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from .cue_recall import CUE_RECALL_ID
from .memory_gym import (
    EPISODE_METRICS,
    MEMORY_GYM_IDS,
    make_memory_gym,
    memory_gym_id,
)
from .minigrid_memory import MEMORY_MAX_STEPS, make_minigrid_memory
from .popgym import MazeSeed, is_maze, is_popgym_id, popgym_problem
from .wrappers import (
    ClipBoxAction,
    PreviousAction,
    RecordSuccess,
    UntupleObservation,
    has_tuple,
    positive_final_reward,
)

# Short names accepted by make_env (and the trainer's --env).
ENV_ALIASES: dict[str, str] = {
    "MiniGrid-Memory": "MiniGrid-MemoryS9-v0",
    "CueRecall": CUE_RECALL_ID,
}


class UnknownEnvError(ValueError):
    """An environment id that is neither one of ours nor registered with gymnasium, or one
    whose optional package is not installed (the message says how to install it)."""


def list_env_ids() -> list[str]:
    """All ids :func:`make_env` accepts: our short names, every gymnasium/minigrid id and
    Memory Gym's (installed or not)."""
    import minigrid  # noqa: F401  (registers the MiniGrid ids)

    return sorted(ENV_ALIASES) + sorted({*gym.registry, *MEMORY_GYM_IDS})


def _unknown_env(env_id: str) -> UnknownEnvError:
    close = difflib.get_close_matches(env_id, list_env_ids(), n=3)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return UnknownEnvError(
        f"unknown environment id {env_id!r}; {hint}"
        "list all ids with trxl_rl.envs.list_env_ids()"
    )


def make_env(env_id: str, prev_action: bool | None = None, **kwargs: Any) -> gym.Env:
    """Build one environment.

    With ``prev_action=True`` observations become ``{"obs": ..., "prev_action": ...}``, see
    :class:`PreviousAction` (Discrete, MultiDiscrete and Box action spaces). ``None`` (the
    default) means on for POPGym ids (as in POPGym's own baselines), off for all others.

    - MiniGrid-Memory ids (or the short name ``"MiniGrid-Memory"`` = S9): kwargs ``obs``,
      ``view_size``, ``max_steps``, ``full_actions``; see :mod:`trxl_rl.envs.minigrid_memory`.
    - ``"trxl_rl/CueRecall-v0"`` (or ``"CueRecall"``): kwargs ``delay``, ``num_cues``.
    - ``"popgym/<ClassName>-v0"``: POPGym's environments (optional extra,
      ``pip install -e ".[popgym]"``), kwargs those of the class; see
      :mod:`trxl_rl.envs.popgym`.
    - Memory Gym's ids (``"MortarMayhem-Grid-v0"``, ... or ``"memory_gym:<id>"``), headless;
      see :mod:`trxl_rl.envs.memory_gym` for the install command and what they report.
    - any other registered gymnasium id (``"module:Id"`` imports the module first):
      ``gymnasium.make(env_id, **kwargs)``.

    Every env is wrapped in :class:`RecordSuccess`: for MiniGrid-Memory and CueRecall the
    final step's info holds ``success`` (final reward > 0); other envs get the key only if
    they report ``success``/``is_success`` themselves. ``Tuple`` observations are turned
    into ``MultiDiscrete``/``Dict`` ones (:class:`UntupleObservation`) and ``Box`` actions
    are clipped to their bounds before they reach the env (:class:`ClipBoxAction`; the
    action space stays as it is).

    :raises UnknownEnvError: the id is not known (the message suggests close ids), or it
        needs an optional package that is not installed (the message names the pip command).
    :raises ValueError: a MiniGrid-Memory or CueRecall argument is invalid (named).
    """
    env_id = ENV_ALIASES.get(env_id, env_id)
    env = _make(env_id, **kwargs)
    if has_tuple(env.observation_space):
        env = UntupleObservation(env)
    if isinstance(env.action_space, spaces.Box):
        env = ClipBoxAction(env)
    if prev_action is None:
        prev_action = is_popgym_id(env_id)
    return PreviousAction(env) if prev_action else env


def episode_metric_names(env_id: str) -> tuple[str, ...]:
    """What ``env_id``'s episodes report at their end besides return, length and success
    (``completed_episodes`` gives them as ``metrics/<name>``; the trainer logs
    ``charts/<name>``): Memory Gym's, see :data:`trxl_rl.envs.memory_gym.EPISODE_METRICS`."""
    name = memory_gym_id(ENV_ALIASES.get(env_id, env_id))
    return EPISODE_METRICS[name] if name else ()


def _make(env_id: str, **kwargs: Any) -> gym.Env:
    if memory_gym_id(env_id):
        try:
            return make_memory_gym(env_id, **kwargs)
        except ImportError as err:
            raise UnknownEnvError(str(err)) from None
    if env_id in MEMORY_MAX_STEPS:
        return make_minigrid_memory(env_id, **kwargs)
    if env_id == CUE_RECALL_ID:
        return RecordSuccess(gym.make(env_id, **kwargs), positive_final_reward)
    if is_popgym_id(env_id):
        problem = popgym_problem(env_id)
        if problem is not None:
            raise UnknownEnvError(problem)
        env = gym.make(env_id, **kwargs)
        return RecordSuccess(MazeSeed(env) if is_maze(env) else env)
    if ":" not in env_id and env_id not in gym.registry:
        import minigrid  # noqa: F401  (registers the MiniGrid ids)

        if env_id not in gym.registry:
            raise _unknown_env(env_id)
    return RecordSuccess(gym.make(env_id, **kwargs))
