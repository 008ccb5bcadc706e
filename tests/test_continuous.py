"""Specification of continuous (Box) actions: the Gaussian head, clipping at the env,
the previous action, replay, and training, evaluating and resuming on Pendulum-v1."""

import math
import os
import signal

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from trxl_rl.agents import action_dtype, action_shape, continuous_actions, make_action_head
from trxl_rl.agents.distributions import GaussianDistribution, GaussianHead
from trxl_rl.checkpoint import load_checkpoint
from trxl_rl.config import build_config
from trxl_rl.envs import EpisodeReplay, make_env
from trxl_rl.envs.wrappers import ClipBoxAction, PreviousAction
from trxl_rl.resume import TrainingInterrupted, resume_config
from trxl_rl.train import main, train

BOX = spaces.Box(-2.0, 2.0, (2, 3), np.float32)


# --- the Gaussian head ---------------------------------------------------------------------

def test_gaussian_log_prob_and_entropy_equal_torch_normal_summed_over_action_dims():
    torch.manual_seed(0)
    mean, log_std = torch.randn(5, 2, 3), torch.randn(2, 3)
    dist = GaussianDistribution(mean, log_std)
    reference = torch.distributions.Normal(mean, log_std.exp())
    actions = mean + 3 * torch.randn(5, 2, 3)
    torch.testing.assert_close(dist.log_prob(actions), reference.log_prob(actions).sum((1, 2)))
    torch.testing.assert_close(dist.entropy(), reference.entropy().sum((1, 2)))
    assert dist.log_prob(actions).shape == dist.entropy().shape == (5,)


def test_box_head_starts_at_mean_zero_std_one_and_acts_in_float32_of_the_action_shape():
    torch.manual_seed(0)
    head = make_action_head(BOX, 16)
    assert isinstance(head, GaussianHead)
    assert action_shape(BOX) == (2, 3) and action_dtype(BOX) == torch.float32
    assert torch.equal(head.log_std, torch.zeros(2, 3))  # std 1, state-independent
    weight = head.mean.weight.detach()
    torch.testing.assert_close(weight @ weight.T, 0.01 ** 2 * torch.eye(6))  # orthogonal, 0.01
    dist = head(torch.randn(4000, 16))
    assert dist.mean.abs().max() < 0.2
    sample = dist.sample()
    assert sample.shape == (4000, 2, 3) and sample.dtype == torch.float32
    assert abs(sample.std().item() - 1.0) < 0.05
    assert torch.equal(dist.mode(), dist.mean)
    assert dist.entropy()[0].item() == pytest.approx(6 * 0.5 * math.log(2 * math.pi * math.e))


def test_gradient_reaches_the_mean_layer_and_the_log_std():
    head = make_action_head(spaces.Box(-1.0, 1.0, (2,), np.float32), 8)
    dist = head(torch.randn(16, 8))
    (dist.log_prob(dist.sample() + 0.3).sum() + dist.entropy().sum()).backward()
    assert head.mean.weight.grad.abs().sum() > 0
    assert head.log_std.grad.abs().sum() > 0


# --- clipping, previous action, replay ----------------------------------------------------

class RecordingEnv(gym.Env):
    """Observes the action it received (2 numbers)."""

    observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)

    def __init__(self, action_space=None):
        self.action_space = action_space or spaces.Box(np.array([-1.0, 0.0], np.float32),
                                                       np.array([1.0, 0.5], np.float32))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.asarray(action, np.float32), 0.0, False, False, {}


def test_actions_are_clipped_at_the_env_and_the_action_space_keeps_its_bounds():
    env = ClipBoxAction(RecordingEnv())
    assert env.action_space == RecordingEnv().action_space
    env.reset(seed=0)
    obs, *_ = env.step(np.array([-3.0, 0.2], np.float32))
    assert obs.tolist() == [-1.0, pytest.approx(0.2)]
    obs, *_ = env.step(np.array([0.5, 9.0]))
    assert obs.dtype == np.float32 and obs.tolist() == [0.5, 0.5]
    assert isinstance(make_env("Pendulum-v1"), ClipBoxAction)


def test_previous_box_action_is_the_clipped_action_with_a_first_step_flag():
    env = PreviousAction(ClipBoxAction(RecordingEnv()))
    assert env.observation_space["prev_action"] == spaces.Box(
        np.array([-1.0, 0.0, 0.0], np.float32), np.array([1.0, 0.5, 1.0], np.float32))
    obs, _ = env.reset(seed=0)
    assert obs["prev_action"].tolist() == [0.0, 0.0, 1.0]  # no action yet: flag set
    obs, *_ = env.step(np.array([-3.0, 0.25], np.float32))
    assert obs["prev_action"].tolist() == [-1.0, 0.25, 0.0]
    assert env.observation_space.contains(obs)
    pendulum = make_env("Pendulum-v1", prev_action=True)
    assert pendulum.observation_space["prev_action"].shape == (2,)


def test_previous_multidiscrete_action_uses_one_none_value_per_dimension():
    env = PreviousAction(RecordingEnv(spaces.MultiDiscrete([2, 3], start=[0, 1])))
    assert env.observation_space["prev_action"] == spaces.MultiDiscrete([3, 4])
    obs, _ = env.reset(seed=0)
    assert obs["prev_action"].tolist() == [2, 3]  # "none" in every dimension
    obs, *_ = env.step(np.array([1, 3]))
    assert obs["prev_action"].tolist() == [1, 2]  # indices: action - start
    assert env.observation_space.contains(obs)


def test_previous_action_of_an_unsupported_space_says_which_are_supported():
    with pytest.raises(ValueError, match="Discrete, MultiDiscrete or Box action space"):
        PreviousAction(RecordingEnv(spaces.MultiBinary(3)))


def test_episode_replay_records_and_restores_float_action_vectors():
    env = EpisodeReplay(make_env("Pendulum-v1"))
    env.reset(seed=4)
    rng = np.random.default_rng(0)
    for _ in range(5):
        env.step(rng.normal(0, 3, (1,)).astype(np.float32))  # some outside the bounds
    saved = env.replay_state()
    assert saved["actions"].shape == (5, 1) and saved["actions"].dtype == np.float32
    copy = EpisodeReplay(make_env("Pendulum-v1"))
    copy.reset(seed=0)
    copy.restore(saved)
    for _ in range(3):
        action = rng.normal(0, 3, (1,)).astype(np.float32)
        assert np.array_equal(env.step(action)[0], copy.step(action)[0])


# --- training, evaluation, resume ---------------------------------------------------------

def pendulum_config(**overrides):
    base = {
        "env": {"id": "Pendulum-v1", "num_envs": 4},
        "model": {"encoder_dim": 16,
                  "trxl": {"dim": 16, "num_layers": 1, "num_heads": 1, "memory_length": 8}},
        "ppo": {"rollout_steps": 64, "segment_length": 16, "minibatches": 4, "epochs": 2},
        "total_steps": 2048, "progress": False, "eval_episodes": 2, "checkpoint_every": 1000,
        "threads": 1,
    }
    return build_config(base, overrides)


def test_short_pendulum_run_reproduces_its_rollouts_and_evaluates_with_the_mean(
        tmp_path, monkeypatch):
    calls = {"training": True, "sample": 0, "mode": 0}
    stats = []

    def count(name, method):
        def counted(self):
            if not calls["training"]:
                calls[name] += 1
            return method(self)
        return counted

    monkeypatch.setattr(GaussianDistribution, "sample",
                        count("sample", GaussianDistribution.sample))
    monkeypatch.setattr(GaussianDistribution, "mode", count("mode", GaussianDistribution.mode))
    cfg = pendulum_config(log_dir=str(tmp_path))
    num_updates = cfg.total_steps // (4 * 64)

    def on_update(update, s):
        stats.append(s)
        calls["training"] = update < num_updates  # what follows the last update is evaluation

    summary = train(cfg, on_update=on_update)
    assert len(stats) == num_updates == 8
    for s in stats:  # every update: the first minibatch recomputes the rollout exactly
        assert s["losses/first_minibatch_approx_kl"] < 1e-6
        assert np.isfinite(s["losses/policy_loss"]) and np.isfinite(s["losses/value_loss"])
    assert any("charts/episodic_return" in s for s in stats)  # 200-step episodes ended
    assert all(s["charts/entropy_coef"] == 0.0 for s in stats)  # no bonus for a Gaussian
    assert summary["episodes"] == 2 and summary["eval_deterministic"]
    # Greedy evaluation: the mean at each of the 200 steps (2 envs, one batched call a step).
    assert calls["sample"] == 0 and calls["mode"] == 200
    checkpoint = load_checkpoint(tmp_path / os.listdir(tmp_path)[0])
    assert checkpoint["spaces"]["action"]["type"] == "Box"


def test_the_entropy_bonus_defaults_to_zero_for_continuous_actions_only():
    default = build_config({})
    assert default.ppo.entropy_coef is None
    assert default.ppo.initial_entropy_coef(continuous=True) == 0.0
    assert default.ppo.initial_entropy_coef(continuous=False) == 0.02
    explicit = build_config({}, {"ppo.entropy_coef": 0.01})
    assert explicit.ppo.initial_entropy_coef(True) == 0.01
    assert explicit.ppo.initial_entropy_coef(False) == 0.01
    assert continuous_actions(BOX) and not continuous_actions(spaces.Discrete(3))
    assert not continuous_actions(spaces.MultiDiscrete([3, 3]))


def test_cli_trains_pendulum_with_the_default_model(tmp_path, capsys):
    code = main(["--env", "Pendulum-v1", "--total-steps", "4096", "--eval_episodes", "2",
                 "--progress", "false", "--threads", "1", "--log_dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert '"episodes": 2' in capsys.readouterr().out


def test_resumed_pendulum_run_equals_uninterrupted_run_bit_for_bit(tmp_path):
    """Float actions go through the rollout, the replayed envs and the checkpoint exactly:
    2 updates == 1 update + SIGINT + resume + 1 update (envs are mid-episode at the cut)."""
    small = {"total_steps": 512, "eval_episodes": 0, "log_dir": str(tmp_path)}
    reference = []
    train(pendulum_config(run_name="a", **small), on_update=lambda u, s: reference.append(s))

    def interrupt(update, s):
        if update == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(pendulum_config(run_name="b", **small), on_update=interrupt)
    checkpoint = load_checkpoint(tmp_path / "b", resume=True)
    actions = checkpoint["envs"]["envs"][0]["actions"]
    assert actions.dtype == torch.float32 and actions.shape == (64, 1)
    resumed = []
    train(resume_config(checkpoint, {}), on_update=lambda u, s: resumed.append(s),
          resume=checkpoint)
    for key in ("losses/policy_loss", "losses/value_loss", "losses/approx_kl"):
        assert resumed[0][key] == reference[1][key], key
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["carry"]["obs"], b["carry"]["obs"])
