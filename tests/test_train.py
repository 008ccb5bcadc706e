"""Specification of the trainer: rollout memory, consistency, bootstrapping, CLI."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trxl_rl.agents import action_dtype, action_shape, build_agent
from trxl_rl.backbones import NoMemory
from trxl_rl.config import ConfigError, build_config, config_to_dict, preset_path, read_yaml
from trxl_rl.envs import make_env, make_vector_env
from trxl_rl.ppo import ppo_update
from trxl_rl.rollout import Rollout
from trxl_rl.train import (
    Carry,
    EpisodeLog,
    collect,
    main,
    parse_args,
    resolve_config,
    train,
)

BACKBONES = ("trxl", "gtrxl", "gru", "lstm", "none")

CPU = torch.device("cpu")


def small_config(**overrides):
    base = {
        "env": {"id": "MiniGrid-MemoryS9-v0", "kwargs": {"max_steps": 12}, "num_envs": 2},
        "model": {"trxl": {"dim": 32, "num_layers": 2, "num_heads": 2, "memory_length": 4},
                  "gru": {"hidden_size": 32, "num_layers": 2},
                  "lstm": {"hidden_size": 32, "num_layers": 2}},
        "ppo": {"rollout_steps": 16, "segment_length": 8, "minibatches": 2, "epochs": 2},
        "total_steps": 64, "progress": False, "eval_episodes": 0, "checkpoint_every": 1000,
    }
    return build_config(base, overrides)


def collect_once(cfg, seed=0, **state_options):
    """One real rollout with a fresh agent; returns (agent, rollout)."""
    torch.manual_seed(seed)
    envs = make_vector_env(cfg.env.id, cfg.env.num_envs, **cfg.env.kwargs)
    space, act = envs.single_observation_space, envs.single_action_space
    agent = build_agent(cfg, space, act).eval()
    rollout = Rollout(cfg.ppo.rollout_steps, cfg.env.num_envs, space, action_shape(act),
                      action_dtype(act), agent.memory)
    carry = Carry(envs.reset(seed=seed)[0],
                  agent.initial_state(cfg.env.num_envs, **state_options),
                  torch.ones(cfg.env.num_envs, dtype=torch.bool))
    collect(agent, envs, rollout, carry, CPU, EpisodeLog())
    envs.close()
    return agent, rollout


def replay_values(agent, rollout, env: int) -> torch.Tensor:
    """Values of env ``env``'s stored observations recomputed one step at a time with a memory
    that is reset only where the stored episode_start says so."""
    state = agent.initial_state(1)
    values = []
    for t in range(rollout.num_steps):
        obs = rollout.obs[t, env : env + 1]
        out = agent.act(obs, state, rollout.episode_start[t, env : env + 1])
        state = out.state
        values.append(out.value[0])
    return torch.stack(values)


def test_rollout_memory_resets_exactly_at_episode_ends_across_autoreset():
    cfg = small_config(**{"env.id": "trxl_rl/CueRecall-v0", "env.kwargs": {"delay": 3},
                          "model.encoder_dim": 16})
    agent, rollout = collect_once(cfg)
    # CueRecall episodes last delay + 1 = 4 steps: starts at 0, 4, 8, ...
    expected = torch.zeros(rollout.num_steps, dtype=torch.bool)
    expected[::4] = True
    assert torch.equal(rollout.episode_start[:, 0], expected)
    for env in range(cfg.env.num_envs):
        assert torch.allclose(replay_values(agent, rollout, env), rollout.values[:, env],
                              atol=1e-5)
    # The first value of a new episode equals a fresh memory's, so the old episode is
    # invisible, while without the reset it would differ.
    with torch.no_grad():
        fresh = agent.value(rollout.obs[4, :1], agent.initial_state(1),
                            torch.zeros(1, dtype=torch.bool))
    assert torch.allclose(fresh, rollout.values[4, :1], atol=1e-6)
    no_reset = rollout.episode_start.clone()
    no_reset[4:] = False
    state = agent.initial_state(1)
    for t in range(5):
        out = agent.act(rollout.obs[t, :1], state, no_reset[t, :1])
        state = out.state
    assert not torch.allclose(out.value, rollout.values[4, :1], atol=1e-4)


def test_truncated_episodes_bootstrap_with_value_of_final_observation_and_its_memory():
    cfg = small_config(**{"env.kwargs": {"max_steps": 6}})
    agent, rollout = collect_once(cfg, seed=3)
    truncated_at = (rollout.bootstrap[:, 0] != 0).nonzero().flatten().tolist()
    assert truncated_at == [5, 11]  # 6-step episodes, none reaches an object that fast
    # Replay env 0's first episode in a single env with the same seed and actions.
    env = make_env(cfg.env.id, **cfg.env.kwargs)
    obs, _ = env.reset(seed=3)
    state = agent.initial_state(1)
    for t in range(6):
        assert np.array_equal(obs, rollout.obs[t, 0].numpy())
        state = agent.act(torch.as_tensor(obs)[None], state,
                          torch.tensor([t == 0])).state
        obs, _, terminated, truncated, _ = env.step(int(rollout.actions[t, 0]))
    assert truncated and not terminated
    expected = agent.value(torch.as_tensor(obs)[None], state, torch.tensor([False]))
    assert torch.allclose(rollout.bootstrap[5, 0], expected[0], atol=1e-6)


def test_terminated_episodes_are_not_bootstrapped():
    cfg = small_config(**{"env.id": "trxl_rl/CueRecall-v0", "env.kwargs": {"delay": 3},
                          "model.encoder_dim": 16})
    _, rollout = collect_once(cfg)
    assert rollout.dones.sum() > 0 and torch.all(rollout.bootstrap == 0)


def test_gae_bootstraps_truncation_and_stops_at_termination():
    space = make_env("trxl_rl/CueRecall-v0").observation_space
    rollout = Rollout(3, 1, space, (), torch.int64, NoMemory(4))
    rollout.values[:, 0] = torch.tensor([1.0, 2.0, 3.0])
    rollout.rewards[:, 0] = torch.tensor([0.5, 1.0, 0.0])
    rollout.dones[:, 0] = torch.tensor([1.0, 0.0, 1.0])  # step 0 truncated, step 2 terminated
    rollout.bootstrap[:, 0] = torch.tensor([10.0, 0.0, 0.0])
    gamma, lam = 0.9, 0.5
    rollout.compute_returns(torch.tensor([100.0]), gamma, lam)
    d2 = 0.0 - 3.0  # terminated: no future
    d1 = 1.0 + gamma * 3.0 - 2.0
    d0 = 0.5 + gamma * 10.0 - 1.0  # truncated: V(final obs), not the next episode's value
    expected = torch.tensor([d0, d1 + gamma * lam * d2, d2])
    assert torch.allclose(rollout.advantages[:, 0], expected)
    assert torch.allclose(rollout.returns[:, 0], expected + rollout.values[:, 0])


def assert_first_minibatch_reproduces_the_rollout(cfg):
    seen = []
    train(cfg, on_update=lambda update, stats: seen.append(stats))
    assert len(seen) == 3  # memory is carried across rollouts and episodes end inside them
    for stats in seen:
        assert abs(stats["losses/first_minibatch_approx_kl"]) < 1e-6
        assert stats["losses/first_minibatch_max_logprob_error"] <= 1e-5
        assert stats["losses/first_minibatch_max_value_error"] <= 1e-5
        assert stats["losses/approx_kl"] > 1e-6  # later minibatches did move the policy


@pytest.mark.parametrize("segment_length,memory_length,encoding", [
    (1, 4, "relative"), (8, 4, "relative"), (1, 16, "relative"), (8, 16, "relative"),
    (8, 16, "absolute"), (8, 16, "learned"), (8, 0, "absolute")])
def test_first_minibatch_approx_kl_is_zero_on_a_real_minigrid_run(tmp_path, segment_length,
                                                                   memory_length, encoding):
    assert_first_minibatch_reproduces_the_rollout(small_config(**{
        "ppo.segment_length": segment_length, "model.trxl.positional_encoding": encoding,
        "model.trxl.memory_length": memory_length, "total_steps": 96,
        "ppo.learning_rate": 0.01, "log_dir": str(tmp_path)}))


@pytest.mark.parametrize("segment_length", [1, 8, 32])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_first_minibatch_reproduces_the_rollout_for_every_backbone(tmp_path, backbone,
                                                                   segment_length):
    # 12-step episodes: episodes start inside segments of 32 and of 8, and rollouts of 32.
    assert_first_minibatch_reproduces_the_rollout(small_config(**{
        "model.backbone": backbone, "ppo.segment_length": segment_length,
        "ppo.rollout_steps": 32, "total_steps": 192, "ppo.learning_rate": 0.01,
        "log_dir": str(tmp_path)}))


def test_first_minibatch_reproduces_the_rollout_on_pixels_across_updates(tmp_path):
    """Acting looks images' features up in the CNN's memo (on a CPU); after each (fused)
    optimizer step the trainer must have dropped it, or the next rollout acts on stale
    features and its first minibatch would not reproduce it."""
    assert_first_minibatch_reproduces_the_rollout(small_config(**{
        "env.kwargs.obs": "rgb", "ppo.rollout_steps": 32, "total_steps": 192,
        "ppo.learning_rate": 0.01, "log_dir": str(tmp_path)}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_trains_on_cuda_and_reproduces_the_rollout(tmp_path, backbone):
    assert_first_minibatch_reproduces_the_rollout(small_config(**{
        "model.backbone": backbone, "device": "cuda", "ppo.rollout_steps": 32,
        "total_steps": 192, "ppo.learning_rate": 0.01, "log_dir": str(tmp_path)}))


def test_a_bfloat16_memory_is_stored_and_recomputed_as_the_agent_used_it():
    cfg = small_config(**{"model.trxl.memory_length": 8})
    agent, rollout = collect_once(cfg, seed=2, dtype=torch.bfloat16)
    assert rollout.records["hidden"].dtype == torch.bfloat16
    rollout.compute_returns(torch.zeros(cfg.env.num_envs), cfg.ppo.gamma, cfg.ppo.gae_lambda)
    stats = ppo_update(agent.train(), torch.optim.Adam(agent.parameters(), lr=1e-3), rollout,
                       cfg.ppo, 0.0)
    # Rounded as in the rollout: float32 error, not bfloat16's (~1e-3 when stored as float32).
    assert stats["losses/first_minibatch_max_value_error"] <= 1e-5
    assert stats["losses/first_minibatch_max_logprob_error"] <= 1e-5


@pytest.mark.parametrize("coef", [0.0, 1.0])
def test_ppo_update_trains_the_decoder_only_with_a_reconstruction_coefficient(coef):
    cfg = small_config(**{"env.kwargs.obs": "rgb", "ppo.reconstruction_coef": 1.0})
    agent, rollout = collect_once(cfg)
    rollout.compute_returns(torch.zeros(cfg.env.num_envs), cfg.ppo.gamma, cfg.ppo.gae_lambda)
    before = [p.detach().clone() for p in agent.decoder.parameters()]
    ppo = dataclasses.replace(cfg.ppo, reconstruction_coef=coef)
    stats = ppo_update(agent.train(), torch.optim.Adam(agent.parameters(), lr=1e-3), rollout,
                       ppo, 0.0)
    moved = [not torch.equal(a, b) for a, b in zip(before, agent.decoder.parameters(),
                                                   strict=True)]
    if coef:
        assert all(moved) and 0 < stats["losses/reconstruction_loss"] < 1
    else:
        assert not any(moved) and "losses/reconstruction_loss" not in stats


def test_seeded_cpu_runs_are_reproducible(tmp_path):
    runs = []
    for i in range(2):
        cfg = small_config(**{"log_dir": str(tmp_path), "run_name": f"r{i}"})
        runs.append([])
        train(cfg, on_update=lambda update, stats: runs[-1].append(stats["losses/policy_loss"]))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("backbone,overrides,succeeds", [
    ("trxl", {}, True), ("gtrxl", {}, True), ("gru", {}, True), ("lstm", {}, True),
    ("none", {}, False), ("trxl", {"model.trxl.memory_length": 0}, False)])
def test_cue_recall_is_learned_with_memory_and_not_without(tmp_path, backbone, overrides,
                                                           succeeds):
    cfg = build_config(read_yaml(preset_path("CueRecall")), {
        "model.backbone": backbone, **overrides, "log_dir": str(tmp_path), "progress": False,
        "seed": 1})
    summary = train(cfg)
    if succeeds:
        assert summary["success_rate"] >= 0.9
    else:
        assert summary["success_rate"] <= 0.7


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "trxl_rl.train", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_unknown_env_suggests_close_names_and_exits_2_without_traceback(tmp_path):
    result = run_cli("--env", "MiniGrid-MemoryS9-v1", "--log_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "MiniGrid-MemoryS9-v0" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("args,needle", [
    (["--ppo.learning_rat", "1e-3"], "unknown config key 'ppo.learning_rat'"),
    (["--ppo.epochs", "two"], "ppo.epochs must be int"),
    (["--ppo.segment_length", "48"], "must divide ppo.rollout_steps"),
    (["--model.trxl.num_heads", "3"], "model.trxl: dim (64) must be divisible by num_heads"),
    (["--model.trxl.memory_length", "-1"], "model.trxl: memory_length must be an integer >= 0"),
    (["--model.memory_length", "8"], "unknown config key 'model.memory_length' (moved to "
                                     "model.trxl.memory_length)"),
    (["--model.backbone", "transformer"], "model.backbone: unknown backbone 'transformer'"),
    (["--model.gru.hidden_size", "8"], "--model.gru.hidden_size does not apply: this run's "
                                       "backbone is 'trxl'"),
    (["--model.backbone", "gru", "--model.gru.hidden", "8"], "model.gru: unknown field "
                                                             "'hidden'"),
    (["--model.backbone", "lstm", "--model.lstm.hidden_size", "0"], "model.lstm: hidden_size"),
    (["--model.backbone", "gtrxl", "--model.trxl.gating", "false"], "gating is fixed"),
    (["--model.gru", "{hidden_size: 8}"], "--model.gru does not apply"),
    (["--env.kwargs.obs.x", "1"], "config key env.kwargs.obs is 'symbolic', not a mapping"),
    (["--seed", "-1"], "seed must be in [0, 2**31)"),
    (["--config", "/nonexistent.yaml"], "not found"),
    (["--env.kwargs.obs", "pixels"], "obs"),
    (["--ppo.epochs"], "cannot parse argument"),
    (["--env", "MiniGrid-Memory", "--config", "/nonexistent.yaml"], "is a preset"),
    (["--ppo.reconstruction_coef", "-0.1"], "ppo.reconstruction_coef must be >= 0"),
    (["--ppo.reconstruction_coef", "0.1"], "ppo.reconstruction_coef needs image observations"),
])
def test_cli_bad_config_is_one_line_and_exit_code_2(capsys, tmp_path, args, needle):
    code = main([*args, "--log_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_numbers_in_scientific_notation_are_numbers_in_overrides_and_in_files(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 and 5e5 as strings; users write them for rates and budgets.
    (tmp_path / "my.yaml").write_text("ppo: {learning_rate: 3e-4}\ntotal_steps: 2e5\n")
    cfg = build_config(read_yaml(tmp_path / "my.yaml"), {"ppo.entropy_coef": "1E-2"})
    assert cfg.ppo.learning_rate == 3e-4 and cfg.ppo.entropy_coef == 0.01
    assert cfg.total_steps == 200_000 and isinstance(cfg.total_steps, int)
    for key, value, needle in [("ppo.learning_rate", "1e-3x", "must be float"),
                               ("total_steps", "2.5e-1", "must be int")]:
        with pytest.raises(ConfigError, match=needle):
            build_config({}, {key: value})


def test_cli_refuses_to_start_a_new_run_in_a_directory_that_holds_one(tmp_path, capsys):
    run = tmp_path / "taken"
    run.mkdir()
    (run / "config.yaml").write_text("an earlier run\n")
    code = main(["--env", "CueRecall", "--run-name", "taken", "--log_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "already holds a run: continue it with --resume" in err
    assert [p.name for p in run.iterdir()] == ["config.yaml"]
    assert (run / "config.yaml").read_text() == "an earlier run\n"


def test_a_section_given_whole_keeps_the_other_defaults_and_round_trips(tmp_path):
    cfg = small_config(**{"model.trxl": {"memory_length": 6}})
    assert cfg.model.trxl == {"dim": 64, "num_layers": 1, "num_heads": 4, "memory_length": 6}
    reread = build_config(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert reread.model == cfg.model  # what config.yaml and checkpoints store builds it again


def test_gtrxl_reads_the_trxl_section_with_gating_on():
    cfg = small_config(**{"model.backbone": "gtrxl", "model.trxl.memory_length": 6})
    env = make_env(cfg.env.id, **cfg.env.kwargs)
    agent = build_agent(cfg, env.observation_space, env.action_space)
    assert agent.memory.config.gating and agent.memory.config.memory_length == 6
    assert agent.memory.config.dim == 32  # small_config's trxl section


def test_model_encoder_max_pool_reaches_the_image_encoder_and_old_configs_read_it_off():
    rgb = {"env.kwargs": {"max_steps": 12, "obs": "rgb"}}
    env = make_env("MiniGrid-MemoryS9-v0", **rgb["env.kwargs"])
    pooled = build_agent(small_config(**rgb, **{"model.encoder_max_pool": True}),
                         env.observation_space, env.action_space)
    assert pooled.encoder.pooled is not None
    written_before = config_to_dict(small_config(**rgb))
    del written_before["model"]["encoder_max_pool"]
    assert build_config(written_before).model.encoder_max_pool is False


def test_cli_help_lists_options_and_overrides():
    result = run_cli("--help")
    assert result.returncode == 0
    for needle in ("--env", "--config", "--seed", "--total-steps", "--device", "--run-name",
                   "--ppo.learning_rate", "--model.backbone", "--model.trxl.FIELD",
                   "MiniGrid-Memory"):
        assert needle in result.stdout


def test_cli_trains_from_any_directory_and_writes_logs_config_and_checkpoints(tmp_path):
    result = run_cli("--env", "CueRecall", "--total-steps", "1024", "--run-name", "cli",
                     "--log_dir", str(tmp_path), "--eval_episodes", "16",
                     "--checkpoint_every", "1", "--progress", "false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "cli"
    assert read_yaml(run / "config.yaml")["env"]["id"] == "trxl_rl/CueRecall-v0"
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    assert len(list((run / "checkpoints").glob("update_*.pt"))) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["episodes"] == 16 and summary["global_step"] == 1024


@pytest.mark.parametrize(("env", "bound"), [
    ("MiniGrid-Memory", 0.05), ("MiniGrid-MemoryS13Random", 0.05),
    ("MiniGrid-MemoryS17Random-v0", 0.05), ("CueRecall", 0.05), ("MiniGrid-Memory-RGB", 0.05),
    ("MortarMayhem-Grid", None), ("CartPole-v1", None)])
def test_the_kl_rollback_is_on_where_it_was_measured_and_off_elsewhere(env, bound):
    """benchmarks/README.md, "Where TrXL loses": it kept the symbolic MiniGrid tasks and
    CueRecall solved, and the pixel S9 preset from falling after high-KL updates
    (docs/results.md, "A max over positions"); on a POPGym pendulum it cost a seed, so it is
    not the default."""
    args, overrides = parse_args(["--env", env])
    assert resolve_config(args, overrides).ppo.rollback_kl == bound


def test_the_defaults_are_the_minigrid_memory_preset_so_any_env_id_starts_from_them():
    defaults = build_config()
    preset = build_config(read_yaml(preset_path("MiniGrid-Memory")))
    # The preset says its entropy bonus; the default is the same one for discrete actions
    # (and none for continuous ones: test_continuous.py).
    assert preset.ppo.entropy_coef == defaults.ppo.initial_entropy_coef(continuous=False)
    assert defaults.model == preset.model
    # and its KL rollback, which is no default (PPOConfig says why).
    assert defaults.ppo.rollback_kl is None and preset.ppo.rollback_kl == 0.05
    assert dataclasses.replace(defaults.ppo, entropy_coef=preset.ppo.entropy_coef,
                               rollback_kl=0.05) == preset.ppo
    # and it ends once solved (test_stop_when_solved.py), within a larger budget; by default
    # the whole budget is trained.
    assert defaults.stop_at is None and preset.stop_at == 0.99
    assert (defaults.total_steps, preset.total_steps) == (500_000, 750_000)
    assert (defaults.env.id, defaults.env.num_envs) == (preset.env.id, preset.env.num_envs)
    # A gymnasium id without a preset of its own gets exactly these settings.
    args, overrides = parse_args(["--env", "CartPole-v1"])
    cfg = resolve_config(args, overrides)
    assert cfg.env.id == "CartPole-v1" and cfg.model == preset.model
    assert cfg.ppo == defaults.ppo


def test_one_torch_thread_by_default_and_null_is_torchs_own_default():
    assert build_config().threads == 1  # benchmarks.scaling --beside: 2 threads collapse
    args, overrides = parse_args(["--threads", "null"])
    assert resolve_config(args, overrides).threads is None
    with pytest.raises(ConfigError, match="threads must be > 0"):
        build_config({"threads": 0})


@pytest.mark.parametrize("env_id,steps,time_limit", [
    ("MiniGrid-MemoryS7-v0", 500_000, 64), ("MiniGrid-MemoryS9-v0", 750_000, 96),
    ("MiniGrid-MemoryS11-v0", 1_000_000, 128), ("MiniGrid-MemoryS13-v0", 1_000_000, 160),
    ("MiniGrid-MemoryS13Random-v0", 1_000_000, 160),
    ("MiniGrid-MemoryS17Random-v0", 3_000_000, 224)])
def test_every_minigrid_memory_env_starts_from_its_preset_and_time_limit(env_id, steps,
                                                                        time_limit):
    args, overrides = parse_args(["--env", env_id, "--seed", "4"])
    cfg = resolve_config(args, overrides)
    assert cfg.env.id == env_id and cfg.total_steps == steps and cfg.seed == 4
    env = make_env(env_id)
    assert env.spec.max_episode_steps == time_limit
    env.close()


def test_presets_ship_inside_the_package():
    path = preset_path("MiniGrid-Memory")
    assert Path(path).is_file()
    assert read_yaml(path)["env"]["id"] == "MiniGrid-MemoryS9-v0"


def test_time_to_threshold_is_logged_kept_in_the_summary_and_survives_a_resume(tmp_path):
    """Success >= 0 holds at the first update that ends an episode: that update's steps and
    seconds are the threshold's, in TensorBoard and summary.json, and a resumed run keeps
    them; a threshold never reached is None."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trxl_rl.checkpoint import load_checkpoint
    from trxl_rl.resume import resume_config

    cfg = small_config(log_dir=str(tmp_path), run_name="t", threshold=0.0, checkpoint_every=1)
    summary = train(cfg)
    events = EventAccumulator(str(tmp_path / "t"))
    events.Reload()
    first = events.Scalars("charts/success_rate")[0].step
    assert [s.step for s in events.Scalars("threshold/steps")] == [first]
    assert events.Scalars("threshold/steps")[0].value == first
    seconds = events.Scalars("threshold/seconds")[0].value
    assert summary["threshold"] == {"metric": "success", "value": 0.0, "steps": first,
                                    "seconds": pytest.approx(seconds)}
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["threshold"]["steps"] \
        == first
    checkpoint = load_checkpoint(tmp_path / "t", resume=True)
    assert checkpoint["timing"]["threshold"]["steps"] == first
    assert checkpoint["timing"]["train_seconds"] >= seconds
    resumed = train(resume_config(checkpoint, {"total_steps": 96}), resume=checkpoint)
    assert resumed["global_step"] == 96 and resumed["threshold"]["steps"] == first
    assert resumed["threshold"]["seconds"] == pytest.approx(seconds)
    never = train(small_config(log_dir=str(tmp_path), run_name="never", threshold=1.5))
    assert never["threshold"]["steps"] is None and never["threshold"]["seconds"] is None


@pytest.mark.parametrize("backbone", ["trxl", "gru"])
def test_collapse_diagnostics_are_written_every_update(tmp_path, backbone):
    """docs/diagnostics.md: the last minibatch's KL before its step and after the update,
    value/return/advantage scale, gradient
    norm per part and, for a Transformer-XL, attention entropy and largest logit per layer."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(small_config(log_dir=str(tmp_path), run_name="d", **{"model.backbone": backbone}))
    events = EventAccumulator(str(tmp_path / "d"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"diagnostics/last_minibatch_approx_kl", "diagnostics/approx_kl_after_update",
                "diagnostics/value_mean",
                "diagnostics/value_std", "diagnostics/return_mean", "diagnostics/return_std",
                "diagnostics/advantage_std", "diagnostics/grad_norm_encoder",
                "diagnostics/grad_norm_memory", "diagnostics/grad_norm_heads"}
    attention = {f"diagnostics/attention_{what}_layer{i}" for what in ("entropy", "max_logit")
                 for i in (0, 1)}  # small_config: 2 layers
    assert expected <= tags
    assert attention <= tags if backbone == "trxl" else not attention & tags
    for tag in expected | (attention if backbone == "trxl" else set()):
        values = [s.value for s in events.Scalars(tag)]
        assert len(values) == 2 and np.isfinite(values).all(), tag
    parts = [events.Scalars(f"diagnostics/grad_norm_{p}")[0].value
             for p in ("encoder", "memory", "heads")]
    total = events.Scalars("losses/grad_norm")[0].value
    assert all(p > 0 for p in parts) and max(parts) <= total + 1e-4
    assert events.Scalars("diagnostics/approx_kl_after_update")[0].value > 0  # it moved
    if backbone == "trxl":  # M = 4: at most log(5) nats over a full window
        for i in (0, 1):
            entropy = events.Scalars(f"diagnostics/attention_entropy_layer{i}")[0].value
            assert 0.0 <= entropy <= np.log(5) + 1e-6
