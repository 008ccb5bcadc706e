"""Small single-purpose wrappers used by :func:`trxl_rl.envs.make_env`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces

SuccessCriterion = Callable[[SupportsFloat, dict[str, Any]], bool]


def positive_final_reward(reward: SupportsFloat, info: dict[str, Any]) -> bool:
    """Success criterion: the episode's last reward is > 0 (MiniGrid-Memory, CueRecall)."""
    return float(reward) > 0.0


class RecordSuccess(gym.Wrapper):
    """Put ``info["success"]`` (bool) into the info of an episode's final step.

    :param criterion: ``criterion(final_reward, final_info) -> bool``. ``None`` means the
        env has no success criterion of ours: its own ``info["success"]`` or
        ``info["is_success"]`` (the gymnasium-robotics key) is passed on as a bool when it
        reports one, and otherwise no key is added.
    """

    def __init__(self, env: gym.Env, criterion: SuccessCriterion | None = None) -> None:
        super().__init__(env)
        self.criterion = criterion

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            if self.criterion is not None:
                info = {**info, "success": bool(self.criterion(reward, info))}
            elif "success" in info or "is_success" in info:
                info = {**info, "success": bool(info.get("success", info.get("is_success")))}
        return obs, reward, terminated, truncated, info


class MovementActions(gym.ActionWrapper):
    """Restrict MiniGrid to ``Discrete(3)``: 0 = turn left, 1 = turn right, 2 = forward.

    These are MiniGrid's own action ids 0, 1, 2, so an action passes through unchanged; the
    wrapper only shrinks the action space the agent samples from.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.action_space = spaces.Discrete(3)

    def action(self, action: Any) -> int:
        if not self.action_space.contains(action):
            raise ValueError(f"action must be in {{0, 1, 2}}, got {action!r}")
        return int(action)


class SymbolicView(gym.ObservationWrapper):
    """Keep only MiniGrid's partial-view grid ``image`` (uint8 ``[V, V, 3]``).

    Channels are (object index, colour index, state) with tight upper bounds
    ``(len(OBJECT_TO_IDX) - 1, len(COLOR_TO_IDX) - 1, 2)``, so encoders may one-hot them.
    """

    def __init__(self, env: gym.Env) -> None:
        from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX

        super().__init__(env)
        view = env.observation_space["image"].shape[0]
        high = np.array(
            [len(OBJECT_TO_IDX) - 1, len(COLOR_TO_IDX) - 1, len(STATE_TO_IDX) - 1], dtype=np.uint8
        )
        self.observation_space = spaces.Box(
            low=0, high=np.broadcast_to(high, (view, view, 3)).copy(), dtype=np.uint8
        )

    def observation(self, observation: dict[str, Any]) -> np.ndarray:
        return observation["image"]


class PreviousAction(gym.Wrapper):
    """Add the action that led to each observation: ``Dict(obs=..., prev_action=...)``.

    An agent cannot see its own actions, and in MiniGrid-Memory's hallway the 3x3 view facing
    left is identical to the view facing right, so without them it cannot tell which way it
    turned. ``prev_action`` is ``Discrete(n + 1)``: the previous action, or ``n`` ("none") on
    the first observation of an episode. Only ``Discrete`` action spaces are supported.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.action_space
        if not isinstance(space, spaces.Discrete):
            raise ValueError(f"prev_action needs a Discrete action space, got {space}")
        self._none = int(space.n)
        self.observation_space = spaces.Dict(
            {"obs": env.observation_space, "prev_action": spaces.Discrete(self._none + 1)})

    def reset(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        return {"obs": obs, "prev_action": self._none}, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        index = int(action) - int(self.env.action_space.start)
        return {"obs": obs, "prev_action": index}, reward, terminated, truncated, info
