"""Memory Gym (Pleines et al., ICLR 2023; JMLR 2025) by the package's own ids, headless.

    pip install -e ".[memory-gym]" && pip install --no-deps memory-gym==1.0.2

``memory-gym`` 1.0.2 pins gymnasium 0.29 and pygame 2.4 in its metadata, which pip would
enforce by downgrading gymnasium; installed without its pins it runs under gymnasium 1.x
with ``pygame-ce`` (the extra ``memory-gym`` installs that). All ten environments:

=============================  ===========================  ===================  ==========
id                             observation                  actions              success
=============================  ===========================  ===================  ==========
``MortarMayhem-Grid-v0``       84x84x3 uint8                ``Discrete(4)``      yes
``MortarMayhem-v0``            84x84x3 uint8                ``MultiDiscrete``    yes
``MortarMayhemB-Grid-v0``      Dict: image, vector (180,)   ``Discrete(4)``      yes
``MortarMayhemB-v0``           Dict: image, vector (180,)   ``MultiDiscrete``    yes
``MysteryPath-Grid-v0``        84x84x3 uint8                ``Discrete(4)``      yes
``MysteryPath-v0``             84x84x3 uint8                ``MultiDiscrete``    yes
``SearingSpotlights-v0``       84x84x3 uint8                ``MultiDiscrete``    yes
``Endless-MortarMayhem-v0``    84x84x3 uint8                ``MultiDiscrete``    endless
``Endless-MysteryPath-v0``     84x84x3 uint8                ``Discrete(4)``      endless
``Endless-SearingSpotlights``  84x84x3 uint8                ``MultiDiscrete``    endless
=============================  ===========================  ===================  ==========

(``MultiDiscrete([3, 3])``: horizontal and vertical movement.) ``memory_gym:<id>``, gymnasium's
``module:id`` form, gives the same env. The episode's end is the env's own (its time limits
end episodes as terminated, as the package does). Success is the env's ``success``; every env
also reports, at the end of an episode, what the papers report for it
(:data:`EPISODE_METRICS`: the commands completed, tiles visited, coins collected ...), logged
as ``charts/<name>`` and kept in evaluation results; the steps an endless episode survived are
its length.

Headless: ``SDL_VIDEODRIVER`` and ``SDL_AUDIODRIVER`` default to ``dummy`` (no display, no
sound device, no ALSA messages) unless they are set already.
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np

from .wrappers import RecordEpisodeMetrics, RecordSuccess

PREFIX = "memory_gym:"
INSTALL = 'pip install -e ".[memory-gym]" && pip install --no-deps memory-gym==1.0.2'
# What each task's papers report at the end of an episode (keys of the env's final info).
EPISODE_METRICS: dict[str, tuple[str, ...]] = {
    "MortarMayhem-Grid-v0": ("commands_completed",),
    "MortarMayhem-v0": ("commands_completed",),
    "MortarMayhemB-Grid-v0": ("commands_completed",),
    "MortarMayhemB-v0": ("commands_completed",),
    "MysteryPath-Grid-v0": ("num_fails",),
    "MysteryPath-v0": ("num_fails",),
    "SearingSpotlights-v0": ("coins_collected", "agent_health"),
    "Endless-MortarMayhem-v0": ("commands_completed", "max_command_sequence"),
    "Endless-MysteryPath-v0": ("tiles_visited", "max_x", "num_fails"),
    "Endless-SearingSpotlights-v0": ("coins_collected", "agent_health"),
}
MEMORY_GYM_IDS = tuple(EPISODE_METRICS)


def memory_gym_id(env_id: str) -> str | None:
    """The package's id of a Memory Gym env (``"MysteryPath-v0"`` or
    ``"memory_gym:MysteryPath-v0"``), or None for any other id."""
    name = env_id.removeprefix(PREFIX)
    return name if name in EPISODE_METRICS else None


def memory_gym_problem() -> str | None:
    """Why Memory Gym envs cannot be made here (naming the install command), or None. Imports
    the package (headless)."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    try:
        import memory_gym  # noqa: F401  (registers the ids)
    except ImportError as err:
        return f"Memory Gym environments need the package {err.name or 'memory_gym'}: {INSTALL}"
    return None


class FreshObservation(gym.ObservationWrapper):
    """Copy every observation: Memory Gym returns the same array object from one step to the
    next (gymnasium's checker warns of it), and a kept observation must not change."""

    def observation(self, observation: Any) -> Any:
        if isinstance(observation, dict):
            return {key: np.array(value) for key, value in observation.items()}
        return np.array(observation)


def make_memory_gym(env_id: str, **kwargs: Any) -> gym.Env:
    """One Memory Gym env by id (either form), headless, with ``success`` and the episode
    metrics recorded at the end of every episode.

    :param kwargs: passed to ``gymnasium.make`` (e.g. ``render_mode="rgb_array"``).
    :raises ImportError: the package is missing (the message names the install command;
        ``make_env`` turns it into an ``UnknownEnvError``).
    """
    name = memory_gym_id(env_id)
    problem = memory_gym_problem()
    if problem is not None:
        raise ImportError(problem)
    env = FreshObservation(gym.make(name, disable_env_checker=True, **kwargs))
    return RecordEpisodeMetrics(RecordSuccess(env), EPISODE_METRICS[name])
