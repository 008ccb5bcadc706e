"""Specification of trxl_rl.envs: presets, CueRecall, vector envs and their step infos."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from collections import deque
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import trxl_rl.envs as trxl_envs
from trxl_rl.envs import (
    CUE_RECALL_ID,
    UnknownEnvError,
    completed_episodes,
    final_observations,
    make_env,
    make_vector_env,
)
from trxl_rl.envs.cue_recall import register_cue_recall

S9 = "MiniGrid-MemoryS9-v0"
LEFT, RIGHT, FORWARD = 0, 1, 2
DIR_TO_VEC = [(1, 0), (0, 1), (-1, 0), (0, -1)]  # minigrid: right, down, left, up


# --- package hygiene ---------------------------------------------------------------------


def test_envs_package_never_imports_torch_or_the_model() -> None:
    for path in Path(trxl_envs.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith(("torch", "trxl_rl")), f"{path.name} imports {name}"


def test_importing_envs_does_not_import_minigrid() -> None:
    code = "import sys, trxl_rl.envs; assert 'minigrid' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- MiniGrid-Memory ---------------------------------------------------------------------


def test_memory_symbolic_observation_is_3x3x3_uint8_grid_with_per_channel_highs() -> None:
    from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX

    env = make_env(S9)
    space = env.observation_space
    assert isinstance(space, gym.spaces.Box)
    assert space.shape == (3, 3, 3) and space.dtype == np.uint8
    assert (space.low == 0).all()
    expected_high = [len(OBJECT_TO_IDX) - 1, len(COLOR_TO_IDX) - 1, 2]
    assert (space.high == np.array(expected_high)).all()
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3, 3, 3) and obs.dtype == np.uint8
    assert space.contains(obs)


def test_memory_rgb_observation_is_84x84x3_uint8_image() -> None:
    env = make_env(S9, obs="rgb")
    assert env.observation_space == gym.spaces.Box(0, 255, (84, 84, 3), np.uint8)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (84, 84, 3) and obs.dtype == np.uint8
    assert obs.any()


def test_memory_rgb_image_has_28_pixels_per_view_cell() -> None:
    env = make_env(S9, obs="rgb", view_size=5)
    assert env.observation_space.shape == (140, 140, 3)
    assert make_env(S9, view_size=5).observation_space.shape == (5, 5, 3)


def test_memory_actions_are_left_right_forward_unless_full_actions() -> None:
    assert make_env(S9).action_space == gym.spaces.Discrete(3)
    assert make_env(S9, full_actions=True).action_space == gym.spaces.Discrete(7)


def test_memory_short_name_is_s9() -> None:
    env = make_env("MiniGrid-Memory")
    assert env.spec.id == S9
    assert env.spec.max_episode_steps == 96


@pytest.mark.parametrize(("max_steps", "expected"), [(None, 96), (10, 10)])
def test_memory_s9_truncates_at_exactly_max_steps(max_steps: int | None, expected: int) -> None:
    env = make_env(S9, max_steps=max_steps)
    env.reset(seed=0)
    for t in range(1, expected + 1):
        _, reward, terminated, truncated, info = env.step(LEFT)  # spinning never ends it
        assert not terminated
        assert truncated == (t == expected)
        assert ("success" in info) == (t == expected)
    assert reward == 0 and info["success"] is False


def _plan_to(env: gym.Env, goal: tuple[int, int], avoid: tuple[int, int]) -> list[int]:
    """Shortest left/right/forward action sequence that walks the agent onto ``goal``."""
    grid = env.unwrapped
    start = (*map(int, grid.agent_pos), int(grid.agent_dir))
    parent: dict[tuple[int, int, int], tuple[tuple[int, int, int], int] | None] = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        x, y, d = state
        if (x, y) == goal:
            actions = []
            while parent[state] is not None:
                state, action = parent[state]
                actions.append(action)
            return actions[::-1]
        dx, dy = DIR_TO_VEC[d]
        cell = grid.grid.get(x + dx, y + dy)
        moves = [(LEFT, (x, y, (d - 1) % 4)), (RIGHT, (x, y, (d + 1) % 4))]
        if (x + dx, y + dy) != avoid and (cell is None or cell.can_overlap()):
            moves.append((FORWARD, (x + dx, y + dy, d)))
        for action, nxt in moves:
            if nxt not in parent:
                parent[nxt] = (state, action)
                queue.append(nxt)
    raise AssertionError("goal unreachable")


@pytest.mark.parametrize(("matching", "success"), [(True, True), (False, False)])
def test_memory_episode_is_success_iff_agent_reaches_matching_object(
    matching: bool, success: bool
) -> None:
    env = make_env(S9)
    env.reset(seed=3)
    target, other = env.unwrapped.success_pos, env.unwrapped.failure_pos
    if not matching:
        target, other = other, target
    actions = _plan_to(env, target, avoid=other)
    for t, action in enumerate(actions, start=1):
        _, reward, terminated, truncated, info = env.step(action)
        assert terminated == (t == len(actions)) and not truncated
    assert (reward > 0) == success
    assert info["success"] is success


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"obs": "pixels"}, "obs"),
        ({"view_size": 4}, "view_size"),
        ({"view_size": 0}, "view_size"),
        ({"max_steps": 0}, "max_steps"),
    ],
)
def test_memory_bad_kwargs_raise_value_error_naming_the_argument(
    kwargs: dict, argument: str
) -> None:
    with pytest.raises(ValueError, match=argument):
        make_env(S9, **kwargs)


# --- CueRecall ---------------------------------------------------------------------------


def _run_cue_recall(delay: int, num_cues: int, answer_correctly: bool, seed: int = 0):
    """Play one CueRecall episode; return the observations ``[T + 1, C + 1]`` and last step."""
    env = make_env("CueRecall", delay=delay, num_cues=num_cues)
    obs, _ = env.reset(seed=seed)
    cue = int(np.argmax(obs[:num_cues]))
    observations = [obs]
    while True:
        query = obs[-1] == 1
        action = (cue if answer_correctly else (cue + 1) % num_cues) if query else cue
        obs, reward, terminated, truncated, info = env.step(action)
        observations.append(obs)
        if terminated or truncated:
            return np.stack(observations), reward, terminated, truncated, info


@pytest.mark.parametrize("delay", [1, 5])
def test_cue_recall_episode_lasts_delay_plus_one_steps(delay: int) -> None:
    observations, *_ = _run_cue_recall(delay, num_cues=3, answer_correctly=True)
    assert len(observations) - 1 == delay + 1


def test_cue_recall_shows_cue_only_at_step_0_and_query_only_at_answer_step() -> None:
    delay, num_cues = 6, 4
    env = make_env("CueRecall", delay=delay, num_cues=num_cues)
    assert env.observation_space == gym.spaces.Box(0, 1, (num_cues + 1,), np.float32)
    assert env.action_space == gym.spaces.Discrete(num_cues)
    observations, *_ = _run_cue_recall(delay, num_cues, answer_correctly=True)
    cue_part, query = observations[:, :num_cues], observations[:, -1]
    assert cue_part[0].sum() == 1 and (cue_part[1:] == 0).all()
    assert query[delay] == 1 and query.sum() == 1
    assert all(env.observation_space.contains(o) for o in observations)


@pytest.mark.parametrize(("correct", "reward", "success"), [(True, 1.0, True), (False, 0.0, False)])
def test_cue_recall_answer_equal_to_cue_gives_reward_1_and_success(
    correct: bool, reward: float, success: bool
) -> None:
    _, last_reward, terminated, truncated, info = _run_cue_recall(4, 3, answer_correctly=correct)
    assert terminated and not truncated
    assert last_reward == reward
    assert info["success"] is success


def test_cue_recall_draws_every_cue() -> None:
    env = make_env("CueRecall", num_cues=3)
    env.reset(seed=0)
    cues = {int(np.argmax(env.reset()[0][:3])) for _ in range(60)}
    assert cues == {0, 1, 2}


def test_cue_recall_with_huge_delay_steps_without_ending() -> None:
    env = make_env(CUE_RECALL_ID, delay=10_000_000)
    env.reset(seed=0)
    for _ in range(1000):
        obs, reward, terminated, truncated, _ = env.step(0)
    assert not (terminated or truncated) and reward == 0 and not obs.any()


@pytest.mark.parametrize(
    ("kwargs", "argument"), [({"delay": 0}, "delay"), ({"num_cues": 1}, "num_cues")]
)
def test_cue_recall_bad_kwargs_raise_value_error_naming_the_argument(
    kwargs: dict, argument: str
) -> None:
    with pytest.raises(ValueError, match=argument):
        make_env("CueRecall", **kwargs)


def test_cue_recall_registration_is_idempotent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_cue_recall()
    assert gym.make(CUE_RECALL_ID, delay=2).unwrapped.delay == 2


# --- other ids -----------------------------------------------------------------------------


def test_unknown_id_error_is_one_line_and_suggests_close_ids() -> None:
    with pytest.raises(UnknownEnvError) as excinfo:
        make_env("MiniGrid-MemoryS9-v1")
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert "\n" not in message
    assert "'MiniGrid-MemoryS9-v1'" in message and "'MiniGrid-MemoryS9-v0'" in message
    assert "list_env_ids" in message


def test_unknown_id_error_suggests_the_short_name() -> None:
    with pytest.raises(UnknownEnvError, match="'MiniGrid-Memory'"):
        make_env("MiniGrid-Memroy")


def test_other_gymnasium_id_is_made_as_is_without_success_key() -> None:
    env = make_env("CartPole-v1")
    env.reset(seed=0)
    info: dict = {}
    terminated = truncated = False
    while not (terminated or truncated):
        _, _, terminated, truncated, info = env.step(1)
    assert "success" not in info


# --- vector envs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env_id", "kwargs"), [("CartPole-v1", {}), (S9, {"max_steps": 3, "obs": "rgb"})]
)
def test_vector_done_step_returns_next_first_obs_and_final_obs_is_last_obs(
    env_id: str, kwargs: dict
) -> None:
    """Replays every sub-env as a single env with the same seed and actions."""
    num_envs, seed = 3, 7
    envs = make_vector_env(env_id, num_envs, **kwargs)
    mirrors = [make_env(env_id, **kwargs) for _ in range(num_envs)]
    obs, _ = envs.reset(seed=seed)
    for i, mirror in enumerate(mirrors):
        np.testing.assert_array_equal(obs[i], mirror.reset(seed=seed + i)[0])
    ends = 0
    for _ in range(30):
        obs, _, terminated, truncated, infos = envs.step(np.ones(num_envs, dtype=np.int64))
        done = terminated | truncated
        last = []
        for i, mirror in enumerate(mirrors):
            mirror_obs, _, term, trunc, _ = mirror.step(1)
            assert done[i] == (term or trunc)
            if done[i]:
                last.append(mirror_obs)
                mirror_obs, _ = mirror.reset()
            np.testing.assert_array_equal(obs[i], mirror_obs)
        if done.any():
            ends += 1
            np.testing.assert_array_equal(final_observations(infos, done), np.stack(last))
            batch = final_observations(infos, done, envs.single_observation_space)
            np.testing.assert_array_equal(batch, np.stack(last))
    envs.close()
    assert ends >= 2


def test_final_observations_of_no_env_is_an_empty_batch_of_the_space() -> None:
    envs = make_vector_env(S9, 2)
    envs.reset(seed=0)
    _, _, terminated, truncated, infos = envs.step(np.zeros(2, dtype=np.int64))
    batch = final_observations(infos, terminated | truncated, envs.single_observation_space)
    assert batch.shape == (0, 3, 3, 3) and batch.dtype == np.uint8
    with pytest.raises(ValueError, match="did not end"):
        final_observations(infos, np.ones(2, dtype=bool))
    envs.close()


@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_completed_episodes_reports_return_length_and_success(vectorization: str) -> None:
    delay, num_envs = 2, 3
    envs = make_vector_env("CueRecall", num_envs, vectorization, delay=delay)
    obs, _ = envs.reset(seed=0)
    cues = obs[:, :2].argmax(axis=1)
    answers = np.where([True, False, True], cues, 1 - cues)
    for _ in range(delay):
        _, _, _, _, infos = envs.step(answers)
        episodes = completed_episodes(infos)
        assert all(len(v) == 0 for v in episodes.values())
    _, _, terminated, _, infos = envs.step(answers)
    assert terminated.all()
    episodes = completed_episodes(infos)
    envs.close()
    np.testing.assert_array_equal(episodes["env"], [0, 1, 2])
    np.testing.assert_array_equal(episodes["return"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(episodes["length"], [delay + 1] * 3)
    np.testing.assert_array_equal(episodes["success"], [1.0, 0.0, 1.0])
    assert episodes["return"].dtype == np.float64 and episodes["length"].dtype == np.int64


@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_completed_episodes_lists_only_ended_envs_with_nan_success_if_undefined(
    vectorization: str,
) -> None:
    num_envs = 3
    envs = make_vector_env("CartPole-v1", num_envs, vectorization)
    envs.reset(seed=1)
    lengths = np.zeros(num_envs, dtype=np.int64)
    seen = 0
    for _ in range(40):
        _, _, terminated, truncated, infos = envs.step(np.ones(num_envs, dtype=np.int64))
        lengths += 1
        done = terminated | truncated
        episodes = completed_episodes(infos)
        np.testing.assert_array_equal(episodes["env"], np.flatnonzero(done))
        np.testing.assert_array_equal(episodes["length"], lengths[done])
        np.testing.assert_array_equal(episodes["return"], lengths[done])  # CartPole: 1 a step
        assert np.isnan(episodes["success"]).all()
        seen += int(done.sum())
        lengths[done] = 0
    envs.close()
    assert seen >= num_envs


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"num_envs": 0}, "num_envs"), ({"num_envs": 2, "vectorization": "threads"}, "vectorization")],
)
def test_make_vector_env_bad_arguments_raise_value_error_naming_them(
    kwargs: dict, argument: str
) -> None:
    with pytest.raises(ValueError, match=argument):
        make_vector_env("CueRecall", **kwargs)


def test_make_vector_env_uses_same_step_autoreset() -> None:
    envs = make_vector_env("CueRecall", 2)
    assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    assert isinstance(envs, gym.wrappers.vector.RecordEpisodeStatistics)
    envs.close()


def test_prev_action_observation_holds_the_action_that_led_to_it():
    env = make_env("MiniGrid-MemoryS9-v0", prev_action=True)
    assert env.observation_space["prev_action"] == gym.spaces.Discrete(4)
    obs, _ = env.reset(seed=0)
    assert obs["prev_action"] == 3  # "none" at an episode's first observation
    assert env.observation_space["obs"].contains(obs["obs"])
    for action in (1, 2, 0):
        obs, *_ = env.step(action)
        assert obs["prev_action"] == action
