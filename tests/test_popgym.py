"""Specification of the POPGym adapter: ids, spaces, one PPO update per env, the missing extra.

Tests that need the ``popgym`` package are skipped without it (``pip install -e
".[popgym]"``); the missing-extra error and the observation adapters are tested either way.
"""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from trxl_rl.agents import make_encoder
from trxl_rl.agents.encoders import MLPEncoder
from trxl_rl.checkpoint import space_from_dict, space_to_dict
from trxl_rl.config import build_config
from trxl_rl.envs import UnknownEnvError, make_env
from trxl_rl.envs.popgym import INSTALL_HINT, is_maze, popgym_id, register_popgym
from trxl_rl.envs.wrappers import UntupleObservation, untuple_space
from trxl_rl.train import main, train

DISCRETE_PAIR = spaces.Tuple((spaces.Discrete(2), spaces.Discrete(4)))

# The packages' own notes, expected: popgym warns that mazes are solvable without memory;
# gymnasium's env checker that CountRecall and MultiarmedBandit reuse their info dicts.
pytestmark = [pytest.mark.filterwarnings("ignore:Maze environments:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*share an object:UserWarning")]


@pytest.fixture(scope="module")
def popgym_ids():
    pytest.importorskip("popgym")
    return register_popgym()


# --- ids ------------------------------------------------------------------------------------

def test_every_popgym_env_class_has_an_id_named_after_it(popgym_ids):
    import popgym.envs

    catalogue = {cls.__name__ for cls in {**popgym.envs.ALL_BASE, **popgym.envs.ALL}}
    assert len(catalogue) == 64  # 16 tasks x (base, Easy, Medium, Hard), mazelib installed
    assert popgym_ids == sorted(popgym_id(name) for name in catalogue)
    for env_id in ("popgym/RepeatPreviousMedium-v0", "popgym/PositionOnlyPendulumEasy-v0",
                   "popgym/LabyrinthEscapeEasy-v0", "popgym/VelocityOnlyCartPoleHard-v0"):
        assert env_id in popgym_ids and env_id in gym.registry
    assert register_popgym() == popgym_ids  # idempotent


def test_base_classes_take_their_constructor_arguments(popgym_ids):
    env = make_env("popgym/RepeatPrevious-v0", num_decks=2, k=3)
    assert env.unwrapped.k == 3
    assert env.observation_space["obs"] == spaces.Discrete(4)


def test_mazes_take_the_64_bit_seeds_of_an_envs_later_episodes(popgym_ids):
    from trxl_rl.envs.replay import episode_seed

    seed = episode_seed(1, 1)
    assert seed >= 2**32  # what numpy's legacy np.random.seed refuses
    env = make_env("popgym/LabyrinthEscapeEasy-v0")
    first = env.reset(seed=seed)[0]["obs"]
    assert np.array_equal(env.reset(seed=seed)[0]["obs"], first)
    assert not is_maze(make_env("popgym/RepeatPreviousMedium-v0"))


def test_unknown_popgym_name_suggests_close_ids(popgym_ids):
    with pytest.raises(UnknownEnvError, match="did you mean 'popgym/RepeatPreviousMedium-v0'"):
        make_env("popgym/RepeatPreviusMedium-v0")


@pytest.mark.parametrize("env_id", ["popgym/RepeatPreviousMedium-v0",
                                    "popgym/LabyrinthEscapeEasy-v0"])
def test_missing_extra_is_one_line_naming_the_pip_command(env_id, monkeypatch):
    monkeypatch.setitem(sys.modules, "popgym", None)  # `import popgym` now raises ImportError
    with pytest.raises(UnknownEnvError) as error:
        make_env(env_id)
    message = str(error.value)
    assert INSTALL_HINT == 'pip install -e ".[popgym]"'
    assert INSTALL_HINT in message and env_id in message
    assert len(message.splitlines()) == 1


def test_cli_without_the_extra_exits_2_with_the_pip_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "popgym", None)
    code = main(["--env", "popgym/RepeatPreviousMedium-v0", "--log_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and INSTALL_HINT in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_envs_import_registers_nothing_without_popgym_and_trxl_rl_never_imports_it():
    code = (
        "import sys\n"
        "import trxl_rl\n"
        "assert 'popgym' not in sys.modules\n"
        "sys.modules['popgym'] = None\n"
        "import gymnasium, trxl_rl.envs\n"
        "assert not [i for i in gymnasium.registry if i.startswith('popgym/')]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- spaces and adapters -------------------------------------------------------------------

@pytest.mark.parametrize(
    ("space", "expected"),
    [
        (DISCRETE_PAIR, spaces.MultiDiscrete([2, 4])),
        (spaces.Tuple((spaces.Discrete(3, start=1), spaces.Discrete(2))),
         spaces.MultiDiscrete([3, 2], start=[1, 0])),
        (spaces.Tuple((spaces.Box(-1, 1, (2,)), spaces.Discrete(5))),
         spaces.Dict({"0": spaces.Box(-1, 1, (2,)), "1": spaces.Discrete(5)})),
        (spaces.Dict({"a": DISCRETE_PAIR, "b": spaces.Discrete(3)}),
         spaces.Dict({"a": spaces.MultiDiscrete([2, 4]), "b": spaces.Discrete(3)})),
        (spaces.Discrete(4), spaces.Discrete(4)),
        (spaces.Box(-np.inf, np.inf, (2,)), spaces.Box(-np.inf, np.inf, (2,))),
    ],
    ids=["discrete-pair", "discrete-start", "box-and-discrete", "nested-in-dict", "discrete",
         "unbounded-box"],
)
def test_untupled_spaces_are_encodable_and_storable(space, expected):
    converted = untuple_space(space)
    assert converted == expected
    assert space_from_dict(space_to_dict(converted)) == converted
    assert make_encoder(converted).output_dim > 0


class TupleEnv(gym.Env):
    """Observes ``Tuple(Discrete(2), Discrete(4))`` like POPGym's Autoencode."""

    observation_space = DISCRETE_PAIR
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return (1, 3), {}

    def step(self, action):
        return (0, int(action)), 0.0, False, False, {}


def test_untuple_observation_turns_tuples_of_discretes_into_multidiscrete_arrays():
    env = UntupleObservation(TupleEnv())
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.int64 and obs.tolist() == [1, 3]
    assert env.observation_space.contains(obs)
    assert env.step(1)[0].tolist() == [0, 1]


def test_multidiscrete_observations_are_one_hot_per_dimension():
    space = spaces.MultiDiscrete([2, 3], start=[0, 5])
    encoder = make_encoder(space)
    assert type(encoder) is MLPEncoder and encoder.in_dim == 5
    captured = {}
    encoder.mlp[0].register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    encoder(torch.tensor([[1, 5], [0, 7]]))
    assert captured["x"].tolist() == [[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]]


def test_discrete_observations_are_still_one_hot_with_their_start():
    encoder = make_encoder(spaces.Discrete(3, start=-1))
    captured = {}
    encoder.mlp[0].register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    encoder(torch.tensor([-1, 1]))
    assert captured["x"].tolist() == [[1, 0, 0], [0, 0, 1]]


def test_popgym_observations_and_actions_are_adapted(popgym_ids):
    autoencode = make_env("popgym/AutoencodeEasy-v0")
    assert autoencode.observation_space == spaces.Dict(
        {"obs": spaces.MultiDiscrete([2, 4]), "prev_action": spaces.Discrete(5)})
    pendulum = make_env("popgym/PositionOnlyPendulumEasy-v0")
    assert pendulum.action_space == spaces.Box(-2.0, 2.0, (1,), np.float32)
    assert pendulum.observation_space["prev_action"] == spaces.Box(
        np.array([-2, 0], np.float32), np.array([2, 1], np.float32), dtype=np.float32)
    battleship = make_env("popgym/BattleshipEasy-v0", prev_action=False)
    assert battleship.observation_space == spaces.Discrete(2)
    assert battleship.action_space == spaces.MultiDiscrete([8, 8])


# --- every env: build, step, one PPO update ------------------------------------------------

def tiny_config(env_id, log_dir, **overrides):
    """One update of 2 envs x 8 steps with a small encoder and Transformer-XL."""
    return build_config({
        "env": {"id": env_id, "num_envs": 2},
        "model": {"encoder_dim": 16,
                  "trxl": {"dim": 16, "num_layers": 1, "num_heads": 1, "memory_length": 4}},
        "ppo": {"rollout_steps": 8, "segment_length": 8, "minibatches": 1, "epochs": 1},
        "total_steps": 16, "eval_episodes": 0, "progress": False, "log_dir": str(log_dir),
        "checkpoint_every": 1000, "threads": 1,
    }, overrides)


def one_update_failures(env_id, log_dir) -> str | None:
    """What went wrong in one PPO update of ``env_id`` (:func:`tiny_config`), or None when it
    ran and its first minibatch reproduced the rollout."""
    stats = []
    try:
        train(tiny_config(env_id, log_dir), on_update=lambda update, s: stats.append(s))
    except Exception as err:  # the caller collects all failures and reports them together
        return f"{type(err).__name__}: {err}"
    if len(stats) != 1 or not stats[0]["losses/first_minibatch_approx_kl"] < 1e-6:
        return f"stats {stats}"
    return None


def test_every_popgym_env_builds_steps_and_runs_one_ppo_update(popgym_ids, tmp_path):
    """All ids in one test: ~0.1 s each, most of it the trainer's TensorBoard writer and
    checkpoint (a parametrised test per id costs the same, but floods the report)."""
    failures = {}
    for env_id in popgym_ids:
        env = make_env(env_id)
        env.action_space.seed(0)
        obs, _ = env.reset(seed=0)
        for _ in range(20):
            assert env.observation_space.contains(obs), env_id
            obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            assert -1.0 <= float(reward) <= 1.0, env_id
            if terminated or truncated:
                obs, _ = env.reset()
        failure = one_update_failures(env_id, tmp_path)
        if failure is not None:
            failures[env_id] = failure
    assert not failures, failures
