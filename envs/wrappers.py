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


class RecordEpisodeMetrics(gym.Wrapper):
    """Put ``info["metrics"]`` (name -> float) into the info of an episode's final step: the
    ``names`` of the env's own final info that say how the episode went besides its return
    (e.g. Memory Gym's ``commands_completed``). A name the final info lacks is left out.
    """

    def __init__(self, env: gym.Env, names: tuple[str, ...]) -> None:
        super().__init__(env)
        self.names = names

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            metrics = {name: float(info[name]) for name in self.names if name in info}
            info = {**info, "metrics": metrics}
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


class ClipBoxAction(gym.ActionWrapper):
    """Clip ``Box`` actions to the action space's bounds on their way into the env.

    Unlike ``gymnasium.wrappers.ClipAction`` the action space is left as it is, so the agent
    still sees the true bounds (and checkpoints store them). The agent's Gaussian samples are
    unbounded and are stored and learned from as drawn (CleanRL's continuous PPO does the
    same); only the env gets the clipped copy, cast to the space's dtype.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        if not isinstance(env.action_space, spaces.Box):
            raise ValueError(f"ClipBoxAction needs a Box action space, got {env.action_space}")

    def action(self, action: Any) -> np.ndarray:
        return clip_to_box(self.env.action_space, action)


def clip_to_box(space: spaces.Box, action: Any) -> np.ndarray:
    """``action`` clipped to the bounds of ``space``, in its dtype (what the env executes)."""
    return np.clip(np.asarray(action), space.low, space.high).astype(space.dtype)


class UntupleObservation(gym.ObservationWrapper):
    """Replace ``Tuple`` observation spaces by ones the encoders and checkpoints know.

    A ``Tuple`` of ``Discrete`` spaces becomes ``MultiDiscrete`` (nvec and start of the
    parts; observation int64 ``[D]``), any other ``Tuple`` a ``Dict`` keyed ``"0"``,
    ``"1"``, ... in order. Tuples inside a ``Dict`` or ``Tuple`` are converted too; other
    spaces pass unchanged. (POPGym's Autoencode observes ``Tuple(Discrete(2), Discrete(4))``,
    gymnasium's Blackjack ``Tuple(Discrete(32), Discrete(11), Discrete(2))``.)
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = untuple_space(env.observation_space)

    def observation(self, observation: Any) -> Any:
        return _untuple(self.env.observation_space, observation)


def has_tuple(space: spaces.Space) -> bool:
    """Whether ``space`` is or contains (in a ``Dict`` or ``Tuple``) a ``Tuple`` space."""
    if isinstance(space, spaces.Tuple):
        return True
    return isinstance(space, spaces.Dict) and any(map(has_tuple, space.spaces.values()))


def _discrete_tuple(space: spaces.Space) -> bool:
    return isinstance(space, spaces.Tuple) and len(space.spaces) > 0 and all(
        isinstance(part, spaces.Discrete) for part in space.spaces)


def untuple_space(space: spaces.Space) -> spaces.Space:
    """The observation space :class:`UntupleObservation` gives for ``space``."""
    if _discrete_tuple(space):
        return spaces.MultiDiscrete([int(part.n) for part in space.spaces],
                                    start=[int(part.start) for part in space.spaces])
    if isinstance(space, spaces.Tuple):
        return spaces.Dict({str(i): untuple_space(part) for i, part in enumerate(space.spaces)})
    if isinstance(space, spaces.Dict):
        return spaces.Dict({key: untuple_space(part) for key, part in space.spaces.items()})
    return space


def _untuple(space: spaces.Space, obs: Any) -> Any:
    if _discrete_tuple(space):
        return np.array([int(part) for part in obs], dtype=np.int64)
    if isinstance(space, spaces.Tuple):
        return {str(i): _untuple(part, value)
                for i, (part, value) in enumerate(zip(space.spaces, obs, strict=True))}
    if isinstance(space, spaces.Dict):
        return {key: _untuple(part, obs[key]) for key, part in space.spaces.items()}
    return obs


class PreviousAction(gym.Wrapper):
    """Add the action that led to each observation: ``Dict(obs=..., prev_action=...)``.

    An agent cannot see its own actions, and in MiniGrid-Memory's hallway the 3x3 view facing
    left is identical to the view facing right, so without them it cannot tell which way it
    turned. What ``prev_action`` holds depends on the action space:

    - ``Discrete(n)``: ``Discrete(n + 1)``, the previous action's index (action - start), or
      ``n`` ("none") on the first observation of an episode;
    - ``MultiDiscrete(nvec)``: ``MultiDiscrete(nvec + 1)``, per dimension the same;
    - ``Box`` of ``k`` numbers (any shape): float32 ``Box(k + 1)``, the previous action as
      the env executed it (clipped to the bounds, flattened) followed by a first-step flag,
      1.0 on the first observation of an episode (the action part then holds the point of
      the bounds nearest to zero) and 0.0 after. A continuous space has no spare value to
      mean "none", hence the flag.

    Other action spaces raise ``ValueError``.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.action_space
        if isinstance(space, spaces.Discrete):
            prev = spaces.Discrete(int(space.n) + 1)
            self._none: Any = int(space.n)
        elif isinstance(space, spaces.MultiDiscrete):
            prev = spaces.MultiDiscrete(space.nvec + 1)
            self._none = space.nvec.astype(np.int64)
        elif isinstance(space, spaces.Box):
            low = np.append(space.low.reshape(-1).astype(np.float32), 0.0).astype(np.float32)
            high = np.append(space.high.reshape(-1).astype(np.float32), 1.0).astype(np.float32)
            prev = spaces.Box(low, high, dtype=np.float32)
            self._none = np.clip(np.zeros_like(low), low, high)
            self._none[-1] = 1.0
        else:
            raise ValueError(
                f"prev_action needs a Discrete, MultiDiscrete or Box action space, got {space}")
        self.observation_space = spaces.Dict({"obs": env.observation_space, "prev_action": prev})

    def reset(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        first = self._none.copy() if isinstance(self._none, np.ndarray) else self._none
        return {"obs": obs, "prev_action": first}, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return ({"obs": obs, "prev_action": self._encode(action)}, reward, terminated,
                truncated, info)

    def _encode(self, action: Any) -> Any:
        space = self.env.action_space
        if isinstance(space, spaces.Discrete):
            return int(action) - int(space.start)
        if isinstance(space, spaces.MultiDiscrete):
            return np.asarray(action, dtype=np.int64) - space.start
        executed = clip_to_box(space, action).reshape(-1)
        return np.append(executed, np.float32(0.0)).astype(np.float32)
