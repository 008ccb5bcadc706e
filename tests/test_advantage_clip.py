"""Specification of ``ppo.advantage_clip``: the advantages, after normalisation, bounded to
``[-c, c]`` in the policy loss (PPOConfig)."""

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from trxl_rl.config import ConfigError
from trxl_rl.ppo import ppo_update
from trxl_rl.train import make_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from test_train import collect_once, small_config  # noqa: E402


@pytest.fixture(scope="module")
def real_rollout():
    """A fresh agent and one real rollout of MiniGrid with its returns."""
    cfg = small_config()
    agent, rollout = collect_once(cfg)
    rollout.compute_returns(torch.zeros(cfg.env.num_envs), cfg.ppo.gamma, cfg.ppo.gae_lambda)
    return cfg, agent, rollout


def updated_weights(real_rollout, advantages=None, **ppo):
    """The agent's weights after one update of ``real_rollout`` with the PPO fields ``ppo``
    (and the rollout's advantages replaced by ``advantages``), the same minibatches always."""
    cfg, agent, rollout = real_rollout
    agent, rollout = copy.deepcopy(agent), copy.deepcopy(rollout)
    if advantages is not None:
        rollout.advantages = advantages
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, **ppo))
    torch.manual_seed(0)
    ppo_update(agent.train(), make_optimizer(cfg, agent), rollout, cfg.ppo, 0.0)
    return agent.state_dict()


def assert_same(a, b):
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_differ(a, b):
    assert any(not torch.equal(a[key], b[key]) for key in a)


def test_a_bound_no_advantage_reaches_changes_nothing(real_rollout):
    assert_same(updated_weights(real_rollout, advantage_clip=1e9),
                updated_weights(real_rollout, advantage_clip=None))


def test_the_bound_clamps_the_advantages_the_loss_sees(real_rollout):
    """Unnormalised: a clip of c is the update of the rollout with its advantages clamped to
    [-c, c]; and a c below the largest advantage changes the update."""
    advantages = real_rollout[2].advantages
    c = 0.5 * advantages.abs().max().item()
    clipped = updated_weights(real_rollout, norm_advantages=False, advantage_clip=c)
    assert_same(clipped, updated_weights(real_rollout, advantages.clamp(-c, c),
                                         norm_advantages=False))
    assert_differ(clipped, updated_weights(real_rollout, norm_advantages=False))


def test_the_bound_applies_after_normalisation(real_rollout):
    """Normalised advantages have a spread of 1 whatever the raw scale: a bound of 0.5 binds
    although every raw advantage here is far below it once scaled down by 1000."""
    small = real_rollout[2].advantages / 1000
    assert small.abs().max() < 0.5
    assert_differ(updated_weights(real_rollout, small, advantage_clip=0.5),
                  updated_weights(real_rollout, small))


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_the_bound_must_be_positive(value):
    with pytest.raises(ConfigError, match="ppo.advantage_clip must be > 0"):
        small_config(**{"ppo.advantage_clip": value})
