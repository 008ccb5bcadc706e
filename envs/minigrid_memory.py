"""MiniGrid-Memory: see an object in the start room, walk the hallway, touch its twin.

Presets (ids registered by minigrid; ``max_steps`` default per id):

=============================  ==========  ============================================
id                             max_steps   note
=============================  ==========  ============================================
MiniGrid-MemoryS7-v0           64
MiniGrid-MemoryS9-v0           96          published TrXL-PPO setups use 96 for S9
MiniGrid-MemoryS11-v0          128
MiniGrid-MemoryS13-v0          160
MiniGrid-MemoryS13Random-v0    160         random hallway length
MiniGrid-MemoryS17Random-v0    224         random hallway length
=============================  ==========  ============================================

Defaults follow published TrXL-PPO setups: a 3x3 partial view, three actions
(left, right, forward) and, for ``obs="rgb"``, the view rendered at 28 px per tile (84x84).

Time limit: ``max_steps`` is passed both to minigrid (its reward for success is
``1 - 0.9 * step_count / max_steps``, so the reward scale follows the limit) and to a
gymnasium ``TimeLimit``. Both fire on the same step and both report ``truncated=True``,
never ``terminated``; the episode is terminated only by touching one of the two objects.
If that happens on the last allowed step, the step is ``terminated=True, truncated=True``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from .wrappers import MovementActions, RecordSuccess, SymbolicView, positive_final_reward

MEMORY_MAX_STEPS: dict[str, int] = {
    "MiniGrid-MemoryS7-v0": 64,
    "MiniGrid-MemoryS9-v0": 96,
    "MiniGrid-MemoryS11-v0": 128,
    "MiniGrid-MemoryS13-v0": 160,
    "MiniGrid-MemoryS13Random-v0": 160,
    "MiniGrid-MemoryS17Random-v0": 224,
}
RGB_TILE_SIZE = 28
OBS_MODES = ("symbolic", "rgb")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def make_minigrid_memory(
    env_id: str,
    obs: str = "symbolic",
    view_size: int = 3,
    max_steps: int | None = None,
    full_actions: bool = False,
    **minigrid_kwargs: Any,
) -> gym.Env:
    """Build one MiniGrid-Memory env (``env_id`` one of :data:`MEMORY_MAX_STEPS`).

    :param obs: ``"symbolic"`` -> uint8 ``[V, V, 3]`` grid encoding;
        ``"rgb"`` -> uint8 ``[28V, 28V, 3]`` image of the partial view (84x84 for V = 3).
    :param view_size: side ``V`` of the agent's square partial view; odd and >= 3 (minigrid).
    :param max_steps: time limit in steps; ``None`` = the preset in the module table.
    :param full_actions: keep all 7 MiniGrid actions instead of left/right/forward.
    :param minigrid_kwargs: passed on to ``gymnasium.make`` (e.g. ``render_mode="rgb_array"``).
    :return: the env, with ``info["success"]`` on the final step (final reward > 0).
    """
    if obs not in OBS_MODES:
        raise ValueError(f"obs must be one of {OBS_MODES}, got {obs!r}")
    if not _is_int(view_size) or view_size < 3 or view_size % 2 == 0:
        raise ValueError(f"view_size must be an odd integer >= 3 (minigrid), got {view_size!r}")
    if max_steps is None:
        max_steps = MEMORY_MAX_STEPS[env_id]
    if not _is_int(max_steps) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1 or None, got {max_steps!r}")

    import minigrid  # noqa: F401  (registers the MiniGrid ids)
    from minigrid.wrappers import ImgObsWrapper, RGBImgPartialObsWrapper

    env = gym.make(
        env_id,
        agent_view_size=int(view_size),
        max_steps=int(max_steps),
        max_episode_steps=int(max_steps),
        **minigrid_kwargs,
    )
    if obs == "rgb":
        env = ImgObsWrapper(RGBImgPartialObsWrapper(env, tile_size=RGB_TILE_SIZE))
    else:
        env = SymbolicView(env)
    if not full_actions:
        env = MovementActions(env)
    return RecordSuccess(env, positive_final_reward)
