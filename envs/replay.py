"""Environment state as plain data: seeded episodes plus the actions taken since.

Environments cannot be stored in a checkpoint that loads with ``torch.load(weights_only=True)``
(and pickling them is unsafe and often impossible), but an environment is fully determined by
the seed of its current episode's ``reset`` and the actions taken since, provided ``reset(seed=s)``
and ``step`` are deterministic; gymnasium requires both of its environments (``check_env`` tests
the first). :class:`EpisodeReplay` makes this explicit:

- episode ``k`` after a ``reset(seed=s)`` is reset with :func:`episode_seed` ``(s, k)``
  (episode 0 with ``s`` itself, so the first episode is the same as without the wrapper);
- the actions of the current episode are recorded, and :meth:`EpisodeReplay.replay_state` /
  :meth:`EpisodeReplay.restore` save and rebuild the env by re-running them.

:func:`vector_env_state` / :func:`restore_vector_env` do the same for every env of a vector env
from :func:`trxl_rl.envs.make_vector_env` (sync or async, ``replay=True``), including the
running returns and lengths of its ``RecordEpisodeStatistics``.
"""

from __future__ import annotations

import time
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium.vector import VectorEnv
from gymnasium.wrappers.vector import RecordEpisodeStatistics


class ReplayError(RuntimeError):
    """Replaying an episode did not reproduce the recorded one (a nondeterministic env)."""


def episode_seed(base_seed: int, episode: int) -> int:
    """Reset seed of episode ``episode`` (0, 1, ...) after a ``reset(seed=base_seed)``.

    Episode 0 uses ``base_seed``; later ones a 64-bit hash of ``(base_seed, episode)``
    (``numpy.random.SeedSequence``), so seeds do not repeat across envs and episodes.
    """
    if episode == 0:
        return int(base_seed)
    sequence = np.random.SeedSequence([int(base_seed), int(episode)])
    return int(sequence.generate_state(1, np.uint64)[0])


class EpisodeReplay(gym.Wrapper):
    """Seed every episode deterministically and record its actions, so that the env's state
    can be saved as plain data and restored by replay.

    ``reset(seed=s)`` starts a new sequence of episodes with base seed ``s``; ``reset()``
    without a seed (an autoreset) starts the next episode of the sequence with
    ``episode_seed(s, k)``. A first ``reset()`` without any seed draws the base seed from
    the operating system. ``options`` are passed on but not recorded.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.base_seed: int | None = None
        self.episode = 0
        self._actions = self._empty_actions(16)  # grows by doubling: 8 bytes a step for
        self._count = 0  # a Discrete action, the only per-step cost of exact resume
        # Set per env through VectorEnv.set_attr, then applied by restore_pending().
        self.pending_replay_state: dict[str, Any] | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[Any, dict[str, Any]]:
        if seed is not None:
            self.base_seed, self.episode = int(seed), 0
        elif self.base_seed is None:
            self.base_seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
            self.episode = 0
        else:
            self.episode += 1
        self._count = 0
        return self.env.reset(seed=episode_seed(self.base_seed, self.episode), options=options)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        out = self.env.step(action)
        if self._count == len(self._actions):
            self._actions = np.concatenate([self._actions, self._empty_actions(self._count)])
        self._actions[self._count] = action
        self._count += 1
        return out

    def _empty_actions(self, n: int) -> np.ndarray:
        space = self.action_space
        return np.zeros((n, *(space.shape or ())), dtype=space.dtype)

    def replay_state(self) -> dict[str, Any]:
        """``{"base_seed": int, "episode": int, "actions": array [n, *action_shape]}``."""
        if self.base_seed is None:
            raise ReplayError("the env was never reset, so it has no state to save")
        actions = self._actions[: self._count].copy()
        return {"base_seed": self.base_seed, "episode": self.episode, "actions": actions}

    def restore(self, state: dict[str, Any]) -> Any:
        """Rebuild the env from :meth:`replay_state` output; returns the current observation.

        :raises ReplayError: the episode ended before all recorded actions were replayed.
        """
        self.base_seed, self.episode = int(state["base_seed"]), int(state["episode"])
        obs, _ = self.env.reset(seed=episode_seed(self.base_seed, self.episode))
        self._count = 0
        actions = np.asarray(state["actions"])
        for i, action in enumerate(actions):
            obs, _, terminated, truncated, _ = self.step(action[()] if action.ndim == 0
                                                         else action)
            if (terminated or truncated) and i < len(actions) - 1:
                raise ReplayError(
                    f"episode {self.episode} (seed {episode_seed(self.base_seed, self.episode)}) "
                    f"ended after {i + 1} of {len(actions)} replayed actions"
                )
        return obs

    def restore_pending(self) -> Any:
        """Apply :attr:`pending_replay_state` (set through ``VectorEnv.set_attr``)."""
        state, self.pending_replay_state = self.pending_replay_state, None
        return self.restore(state)


def _statistics(envs: VectorEnv) -> RecordEpisodeStatistics | None:
    env = envs
    while not isinstance(env, RecordEpisodeStatistics):
        if not hasattr(env, "env"):
            return None
        env = env.env
    return env


def vector_env_state(envs: VectorEnv) -> dict[str, Any]:
    """Plain-data state of a vector env whose envs are wrapped in :class:`EpisodeReplay`.

    :return: ``{"envs": [replay_state of env i], "episode_returns": float64 [n],
        "episode_lengths": int64 [n], "episode_count": int}`` (the last three from the
        vector ``RecordEpisodeStatistics``; zeros if there is none).
    """
    stats = _statistics(envs)
    n = envs.num_envs
    return {
        "envs": list(envs.unwrapped.call("replay_state")),
        "episode_returns": np.array(stats.episode_returns if stats else np.zeros(n),
                                    dtype=np.float64),
        "episode_lengths": np.array(stats.episode_lengths if stats else np.zeros(n),
                                    dtype=np.int64),
        "episode_count": int(stats.episode_count) if stats else 0,
    }


def restore_vector_env(envs: VectorEnv, state: dict[str, Any]) -> list[Any]:
    """Put every env of ``envs`` back into the state :func:`vector_env_state` saved.

    ``envs`` must have been reset once (any seed). Returns each env's current observation;
    the vector env's next ``step`` continues from there.
    """
    if len(state["envs"]) != envs.num_envs:
        raise ReplayError(f"saved state has {len(state['envs'])} envs, the vector env "
                          f"{envs.num_envs}")
    envs.unwrapped.set_attr("pending_replay_state", list(state["envs"]))
    observations = list(envs.unwrapped.call("restore_pending"))
    stats = _statistics(envs)
    if stats is not None:
        stats.episode_returns = np.array(state["episode_returns"], dtype=np.float64)
        stats.episode_lengths = np.array(state["episode_lengths"], dtype=int)
        stats.episode_count = int(state["episode_count"])
        stats.prev_dones = np.zeros(envs.num_envs, dtype=bool)
        stats.episode_start_times = np.full(envs.num_envs, time.perf_counter())
    return observations
