"""Specification of the update's KL guards (PPOConfig): the learning rate that follows the
measured KL, the rollback of an update whose KL passes a bound, and their exact resume."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from trxl_rl.checkpoint import load_checkpoint
from trxl_rl.config import ConfigError
from trxl_rl.ppo import LearningRate, ppo_update
from trxl_rl.resume import TrainingInterrupted, resume_config
from trxl_rl.train import make_optimizer, train

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint import assert_same_training_state, interrupt_after  # noqa: E402
from test_train import collect_once, small_config  # noqa: E402


def rates(optimizer):
    return [group["lr"] for group in optimizer.param_groups]


def test_the_rate_slows_above_twice_the_target_and_recovers_up_to_the_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    rate = LearningRate(0.01)
    rate.start_update(optimizer, 3e-3)
    assert rates(optimizer) == [3e-3]
    rate.observe(optimizer, 0.015)  # within [target / 2, 2 * target]: unchanged
    rate.observe(optimizer, 0.01)
    assert rate.factor == 1.0
    rate.observe(optimizer, 0.021)
    rate.observe(optimizer, 0.5)
    assert rate.factor == pytest.approx(1 / 1.5**2)
    assert rates(optimizer) == pytest.approx([3e-3 / 1.5**2])
    rate.start_update(optimizer, 2e-3)  # the next update's schedule, the factor kept
    assert rates(optimizer) == pytest.approx([2e-3 / 1.5**2])
    for _ in range(5):
        rate.observe(optimizer, 0.004)
    assert rate.factor == 1.0 and rates(optimizer) == [2e-3]  # never above the schedule
    for _ in range(100):
        rate.observe(optimizer, 1.0)
    assert rate.factor == LearningRate.SMALLEST


def test_without_a_target_the_rate_is_the_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    rate = LearningRate(None)
    rate.start_update(optimizer, 1e-3)
    rate.observe(optimizer, 10.0)
    assert rate.factor == 1.0 and rates(optimizer) == [1e-3]


def updated(rollback_kl, warm_up=True, **overrides):
    """A real rollout, one plain update if ``warm_up`` (so Adam has moments), then an update
    with ``rollback_kl``; returns the weights and Adam state before that update, the agent,
    the optimizer and the update's scalars."""
    cfg = small_config(**overrides)
    agent, rollout = collect_once(cfg)
    rollout.compute_returns(torch.zeros(cfg.env.num_envs), cfg.ppo.gamma, cfg.ppo.gae_lambda)
    optimizer = make_optimizer(cfg, agent)
    if warm_up:
        ppo_update(agent.train(), optimizer, rollout, cfg.ppo, 0.0)
    before = ({k: v.clone() for k, v in agent.state_dict().items()},
              {p: {k: v.clone() for k, v in s.items()} for p, s in
               optimizer.state_dict()["state"].items()})
    stats = ppo_update(agent.train(), optimizer, rollout,
                       dataclasses.replace(cfg.ppo, rollback_kl=rollback_kl), 0.0)
    return before, agent, optimizer, stats


def test_an_update_whose_kl_passes_rollback_kl_is_undone_weights_and_adam_state():
    (weights, adam), agent, optimizer, stats = updated(rollback_kl=1e-12)
    assert stats["losses/rolled_back"] == 1.0
    assert stats["losses/minibatch_updates"] < 4  # the update stopped where the KL passed
    for key, value in agent.state_dict().items():
        assert torch.equal(value, weights[key]), key
    after = optimizer.state_dict()["state"]
    assert after.keys() == adam.keys()
    for param in adam:
        for name in adam[param]:
            assert torch.equal(after[param][name], adam[param][name]), (param, name)
    assert rates(optimizer) == pytest.approx([3e-4 / 1.5])  # and the rate slowed


def test_the_last_step_is_measured_too_an_update_of_one_step_can_be_undone():
    # One epoch of one minibatch: its KL before the step is ~0 (the rollout's own policy),
    # so only the KL after the update can pass the bound.
    (weights, adam), agent, optimizer, stats = updated(
        rollback_kl=1e-6, warm_up=False, **{"ppo.epochs": 1, "ppo.minibatches": 1})
    assert stats["losses/first_minibatch_approx_kl"] < 1e-6
    assert stats["diagnostics/approx_kl_after_update"] > 1e-6
    assert stats["losses/rolled_back"] == 1.0 and stats["losses/minibatch_updates"] == 1
    for key, value in agent.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert adam == {} and optimizer.state_dict()["state"] == {}  # as before its first step
    assert rates(optimizer) == pytest.approx([3e-4 / 1.5])


def test_an_update_within_rollback_kl_is_kept():
    (weights, _), agent, optimizer, stats = updated(rollback_kl=10.0)
    assert stats["losses/rolled_back"] == 0.0 and stats["losses/minibatch_updates"] == 4
    assert any(not torch.equal(v, weights[k]) for k, v in agent.state_dict().items())
    assert rates(optimizer) == [3e-4]


def test_the_rate_factor_is_logged_checkpointed_and_resumed_bit_for_bit(tmp_path):
    """2 updates == 1 update + SIGINT + resume + 1 update, with a rate that slows at every
    minibatch (a target KL far below any update's)."""
    guarded = {"ppo.lr_target_kl": 1e-7, "ppo.learning_rate": 1e-3}
    reference = []
    train(small_config(log_dir=str(tmp_path), run_name="a", checkpoint_every=1, **guarded),
          on_update=lambda u, s: reference.append(s))
    assert reference[0]["charts/learning_rate_factor"] < 1.0
    assert reference[1]["charts/learning_rate"] < reference[0]["charts/learning_rate"]
    with pytest.raises(TrainingInterrupted):
        train(small_config(log_dir=str(tmp_path), run_name="b", **guarded),
              on_update=interrupt_after(1))
    checkpoint = load_checkpoint(tmp_path / "b", resume=True)
    assert checkpoint["learning_rate"]["factor"] == reference[0]["charts/learning_rate_factor"]
    resumed = []
    train(resume_config(checkpoint, {}), on_update=lambda u, s: resumed.append(s),
          resume=checkpoint)
    for key in ("charts/learning_rate", "charts/learning_rate_factor", "losses/policy_loss"):
        assert resumed[0][key] == reference[1][key], key
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a["learning_rate"] == b["learning_rate"]
    assert_same_training_state(a, b)


@pytest.mark.parametrize("key", ["ppo.lr_target_kl", "ppo.rollback_kl"])
def test_a_kl_guard_must_be_positive(key):
    with pytest.raises(ConfigError, match=f"{key} must be > 0"):
        small_config(**{key: 0.0})
