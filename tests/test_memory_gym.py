"""Specification of Memory Gym by id: every env builds, steps headless and runs one PPO update;
success and the episode metrics reach the logs and the evaluation; the missing package is one
line naming the install command. Tests that need the package skip without it (CI installs
it: ``pip install -e ".[memory-gym]" && pip install --no-deps memory-gym==1.0.2``)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trxl_rl.envs import (
    MEMORY_GYM_IDS,
    UnknownEnvError,
    completed_episodes,
    episode_metric_names,
    make_env,
    make_vector_env,
)
from trxl_rl.envs.memory_gym import EPISODE_METRICS, INSTALL
from trxl_rl.evaluate import main as evaluate
from trxl_rl.train import main, parse_args, resolve_config, train

sys.path.insert(0, str(Path(__file__).parent))
from test_popgym import one_update_failures, tiny_config  # noqa: E402

HAS_MEMORY_GYM = importlib.util.find_spec("memory_gym") is not None
needs_memory_gym = pytest.mark.skipif(not HAS_MEMORY_GYM, reason=f"needs Memory Gym: {INSTALL}")


def test_all_ten_ids_are_known_with_what_their_episodes_report():
    assert len(MEMORY_GYM_IDS) == 10
    assert episode_metric_names("Endless-MortarMayhem-v0") == (
        "commands_completed", "max_command_sequence")
    assert episode_metric_names("memory_gym:MysteryPath-Grid-v0") == ("num_fails",)
    assert episode_metric_names("MiniGrid-Memory") == ()


@needs_memory_gym
def test_every_memory_gym_env_builds_steps_and_runs_one_ppo_update(tmp_path):
    """All ten in one test (each ~1 s, most of it a PPO update of the CNN)."""
    failures = {}
    for env_id in MEMORY_GYM_IDS:
        env = make_env(env_id)
        env.action_space.seed(0)
        obs, _ = env.reset(seed=0)
        kept = obs if not isinstance(obs, dict) else obs["visual_observation"]
        first = np.array(kept)
        for _ in range(10):
            assert env.observation_space.contains(obs), env_id
            obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                obs, _ = env.reset()
        assert np.array_equal(kept, first), f"{env_id}: a kept observation changed"
        env.close()
        failure = one_update_failures(env_id, tmp_path)
        if failure is not None:
            failures[env_id] = failure
    assert not failures, failures


@needs_memory_gym
@pytest.mark.parametrize("env_id", ["MortarMayhem-Grid-v0", "Endless-MysteryPath-v0"])
def test_episodes_report_success_where_defined_and_their_metrics(env_id):
    envs = make_vector_env(env_id, 2)
    envs.reset(seed=0)
    envs.action_space.seed(0)
    ended = []
    for _ in range(600):
        *_, infos = envs.step(envs.action_space.sample())
        finished = completed_episodes(infos)
        if len(finished["env"]):
            ended.append(finished)
    envs.close()
    assert ended, "no episode ended in 600 random steps"
    for finished in ended:
        for name in EPISODE_METRICS[env_id]:
            assert not np.isnan(finished[f"metrics/{name}"]).any(), name
        success = finished["success"]
        assert np.isnan(success).all() if env_id.startswith("Endless") else \
            np.isin(success, [0.0, 1.0]).all()


@needs_memory_gym
def test_training_logs_the_episode_metrics_and_evaluate_reports_them(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config("Endless-MortarMayhem-v0", tmp_path, run_name="endless",
                      total_steps=192, **{"ppo.rollout_steps": 96, "ppo.segment_length": 32})
    train(cfg)
    events = EventAccumulator(str(tmp_path / "endless"))
    events.Reload()
    assert {"charts/commands_completed", "charts/max_command_sequence"} <= set(
        events.Tags()["scalars"])
    report = tmp_path / "eval.json"
    code = evaluate([str(tmp_path / "endless"), "--episodes", "4", "--num-envs", "2",
                     "--json", str(report)])
    assert code == 0
    summary = json.loads(report.read_text())
    assert summary["success_rate"] is None  # endless: no success
    assert summary["commands_completed_mean"] >= 0 and summary["max_command_sequence_mean"] >= 1


@needs_memory_gym
def test_both_id_forms_start_from_the_preset_and_give_the_same_env():
    for env_id in ("MortarMayhem-Grid-v0", "memory_gym:MortarMayhem-Grid-v0"):
        args, overrides = parse_args(["--env", env_id])
        cfg = resolve_config(args, overrides)
        assert cfg.env.id == env_id
        assert cfg.model.trxl["memory_length"] == 119 and cfg.total_steps == 3_000_000
    a = make_env("MortarMayhem-Grid-v0").reset(seed=3)[0]
    b = make_env("memory_gym:MortarMayhem-Grid-v0").reset(seed=3)[0]
    assert np.array_equal(a, b)


@needs_memory_gym
def test_memory_gym_runs_headless_without_sound_device_noise():
    code = ("from trxl_rl.envs import make_env\n"
            "env = make_env('Endless-SearingSpotlights-v0')\n"
            "env.reset(seed=0)\n"
            "env.step(env.action_space.sample())\n")
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("SDL_VIDEODRIVER", "SDL_AUDIODRIVER", "DISPLAY")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "" and done.stdout.strip() == "", (done.stdout, done.stderr)


@pytest.mark.parametrize("env_id", ["MysteryPath-Grid-v0", "memory_gym:MysteryPath-Grid-v0"])
def test_missing_package_is_one_line_naming_the_install_command(env_id, monkeypatch):
    monkeypatch.setitem(sys.modules, "memory_gym", None)  # `import memory_gym` raises
    with pytest.raises(UnknownEnvError) as error:
        make_env(env_id)
    message = str(error.value)
    assert INSTALL in message and len(message.splitlines()) == 1


def test_cli_without_the_package_exits_2_with_the_install_command(monkeypatch, capsys,
                                                                   tmp_path):
    monkeypatch.setitem(sys.modules, "memory_gym", None)
    code = main(["--env", "MortarMayhem-Grid-v0", "--log_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and INSTALL in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())
