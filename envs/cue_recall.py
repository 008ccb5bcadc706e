"""CueRecall: the smallest memory task, for checking that a memory works at all.

Timeline of one episode with ``delay = D`` (the reset observation is step 0)::

    obs at step 0        [cue one-hot..., 0]     the cue is shown once
    obs at steps 1..D-1  [0, ..., 0,      0]     nothing to see; actions are ignored
    obs at step D        [0, ..., 0,      1]     query flag: the next action is the answer
    action on step D+1   answer                  reward 1 if answer == cue else 0; terminated

An episode is exactly ``D + 1`` steps long. A policy without memory succeeds with
probability ``1 / num_cues``; one that remembers the cue for ``D`` steps succeeds always.
Each step is O(1) in time and memory, so ``delay`` may be huge (e.g. 10_000_000 for an
effectively endless stream).
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

CUE_RECALL_ID = "trxl_rl/CueRecall-v0"


class CueRecall(gym.Env[np.ndarray, np.int64]):
    """Remember a cue shown at step 0 and name it ``delay`` steps later.

    :param delay: steps between the cue observation and the query observation (>= 1).
    :param num_cues: number of distinct cues and of actions (>= 2).

    Observation: float32 ``[num_cues + 1]`` = ``[cue one-hot..., query flag]``.
    Action: ``Discrete(num_cues)``.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, delay: int = 8, num_cues: int = 2) -> None:
        if isinstance(delay, bool) or not isinstance(delay, (int, np.integer)) or delay < 1:
            raise ValueError(f"delay must be an integer >= 1, got {delay!r}")
        if (
            isinstance(num_cues, bool)
            or not isinstance(num_cues, (int, np.integer))
            or num_cues < 2
        ):
            raise ValueError(f"num_cues must be an integer >= 2, got {num_cues!r}")
        self.delay = int(delay)
        self.num_cues = int(num_cues)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(self.num_cues + 1,), dtype=np.float32)
        self.action_space = spaces.Discrete(self.num_cues)
        self._cue = 0
        self._t = 0  # steps taken in this episode
        self._done = True

    def _obs(self, cue: int | None = None, query: bool = False) -> np.ndarray:
        """Observation ``[num_cues + 1]``: one-hot of ``cue`` (if given) and the query flag."""
        obs = np.zeros(self.num_cues + 1, dtype=np.float32)
        if cue is not None:
            obs[cue] = 1.0
        obs[-1] = float(query)
        return obs

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._cue = int(self.np_random.integers(self.num_cues))
        self._t = 0
        self._done = False
        return self._obs(cue=self._cue), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("CueRecall.step called after the episode ended; call reset()")
        answering = self._t == self.delay
        self._t += 1
        if answering:
            self._done = True
            reward = 1.0 if int(action) == self._cue else 0.0
            return self._obs(), reward, True, False, {}
        return self._obs(query=self._t == self.delay), 0.0, False, False, {}


def register_cue_recall() -> None:
    """Register :data:`CUE_RECALL_ID` with gymnasium; calling it again does nothing."""
    if CUE_RECALL_ID not in gym.registry:
        gym.register(id=CUE_RECALL_ID, entry_point=f"{__name__}:CueRecall")
