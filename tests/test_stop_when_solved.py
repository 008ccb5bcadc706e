"""Specification of ``stop_at``: training ends once solved, resumes where it would have, and
benchmarks train their whole budget."""

import json
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import trxl_rl.train as train_module
from benchmarks.compare import Run, load_suite, train_command
from trxl_rl.agents import build_agent
from trxl_rl.checkpoint import load_checkpoint
from trxl_rl.config import ConfigError, build_config, preset_path, read_yaml
from trxl_rl.envs import make_vector_env
from trxl_rl.evaluate import EVAL_SEED_OFFSET, STOP_SEED_OFFSET, run_episodes, summarize
from trxl_rl.metrics import StopWhenSolved
from trxl_rl.resume import resume_config
from trxl_rl.train import main, parse_args, resolve_config, train

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint import assert_same_training_state, snapshot  # noqa: E402
from test_train import small_config  # noqa: E402

SUCCESS = "charts/success_rate"


def test_it_stops_after_enough_updates_in_a_row_at_the_value():
    stop = StopWhenSolved("success", 0.99, updates=3)
    scores = [0.995, 0.99, 0.5, 0.99, None, 1.0]  # None: no episode ended in that update
    assert [stop.check({SUCCESS: s} if s is not None else {}, step)
            for step, s in enumerate(scores)] == [False, False, False, False, False, False]
    assert stop.in_a_row == 2  # 0.5 broke the run; the update without episodes did not
    assert stop.check({SUCCESS: 0.999}, 6) and stop.steps == 6 and stop.solved
    assert "success >= 0.99 in 3 updates in a row" in str(stop)


def test_returns_count_for_the_return_metric_and_none_never_stops():
    stop = StopWhenSolved("return", 0.0, updates=1)
    assert not stop.check({SUCCESS: 1.0}, 1)  # not its metric
    assert stop.check({"charts/episodic_return": 0.0}, 2)
    never = StopWhenSolved("success", None, updates=1)
    assert not any(never.check({SUCCESS: 1.0}, step) for step in range(5))
    assert not never.solved and never.steps is None


def test_the_greedy_check_is_asked_once_the_run_holds_and_must_reach_the_value_too():
    """``confirm`` (the greedy policy's score) is asked only once the training metric has held
    for ``updates`` updates, and after every update that keeps it there until it passes."""
    asked, scores = [], iter([0.8, float("nan"), 1.0])

    def confirm():
        asked.append(True)
        return next(scores)

    stop = StopWhenSolved("success", 0.99, updates=2)
    verdicts = [stop.check({SUCCESS: s}, step, confirm)
                for step, s in enumerate([1.0, 1.0, 1.0, 0.5, 1.0, 1.0], start=1)]
    assert verdicts == [False, False, False, False, False, True]
    assert stop.checks == [{"steps": 2, "score": 0.8}, {"steps": 3, "score": pytest.approx(
        float("nan"), nan_ok=True)}, {"steps": 6, "score": 1.0}]  # nan (no success) fails
    assert len(asked) == 3 and stop.steps == 6 and stop.solved
    assert stop.scalars(6) == {"stop/greedy_score": 1.0} and stop.scalars(5) == {}
    assert "greedy 1 on held-out seeds" in str(stop)
    resumed = StopWhenSolved("success", 0.99, 2, stop.state())
    assert resumed.solved and resumed.checks == stop.checks
    assert resumed.check({SUCCESS: 1.0}, 7, confirm)  # stays solved, asks nothing
    assert len(asked) == 3


def test_a_checkpoints_count_is_kept_only_for_the_same_metric_and_value():
    stop = StopWhenSolved("success", 0.99, updates=3)
    stop.check({SUCCESS: 1.0}, 1)
    stop.check({SUCCESS: 1.0}, 2)
    assert StopWhenSolved("success", 0.99, 3, stop.state()).in_a_row == 2
    assert StopWhenSolved("success", 0.95, 3, stop.state()).in_a_row == 0
    assert StopWhenSolved("return", 0.99, 3, stop.state()).in_a_row == 0
    assert StopWhenSolved("success", 0.99, 3, None).in_a_row == 0  # an older checkpoint


def test_stop_updates_must_be_positive():
    with pytest.raises(ConfigError, match="stop_updates must be > 0"):
        build_config({"stop_updates": 0})


# A MiniGrid return is never below 0, and these runs end episodes in every update (12-step
# episodes, 16-step rollouts): "return >= 0" holds in every update.
SOLVED_AT_ONCE = {"threshold_metric": "return", "stop_at": 0.0, "stop_updates": 2,
                  "total_steps": 160, "checkpoint_every": 1000}


def test_training_stops_after_the_update_that_solves_it_and_says_where(tmp_path):
    updates = []
    summary = train(small_config(log_dir=str(tmp_path), run_name="a", **SOLVED_AT_ONCE),
                    on_update=lambda update, stats: updates.append(update))
    assert updates == [1, 2]  # of a budget of 5
    assert summary["global_step"] == 64
    assert summary["solved"] == {"metric": "return", "value": 0.0, "updates": 2,
                                 "in_a_row": 2, "checks": [{"steps": 64, "score": 0.0}],
                                 "steps": 64}  # the greedy check: 64 episodes of return 0
    checkpoint = load_checkpoint(tmp_path / "a")
    assert checkpoint["counters"] == {"global_step": 64, "update": 2}  # the last is written
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["solved"]["steps"] == 64

    unreachable = train(small_config(log_dir=str(tmp_path), run_name="b",
                                     **{**SOLVED_AT_ONCE, "stop_at": 2.0}))
    assert unreachable["global_step"] == 160 and unreachable["solved"]["steps"] is None


def test_a_stopped_run_resumes_to_nothing_or_with_stop_at_null_to_its_budget(tmp_path,
                                                                            capsys):
    train(small_config(log_dir=str(tmp_path), run_name="stopped", **SOLVED_AT_ONCE))
    checkpoints = snapshot(tmp_path / "stopped" / "checkpoints")
    assert main(["--resume", str(tmp_path / "stopped"), "--eval_episodes", "0"]) == 0
    assert snapshot(tmp_path / "stopped" / "checkpoints") == checkpoints  # nothing trained
    assert "solved: training return >= 0 in 2 updates in a row" in capsys.readouterr().err

    # --stop_at null continues it to the budget, exactly as a run that never stopped.
    checkpoint = load_checkpoint(tmp_path / "stopped", resume=True)
    summary = train(resume_config(checkpoint, {"stop_at": None}), resume=checkpoint)
    assert summary["global_step"] == 160
    train(small_config(log_dir=str(tmp_path), run_name="whole",
                       **{**SOLVED_AT_ONCE, "stop_at": None}))
    assert_same_training_state(load_checkpoint(tmp_path / "whole"),
                               load_checkpoint(tmp_path / "stopped"))


def test_a_failed_greedy_check_trains_on_exactly_as_a_run_without_the_stop(tmp_path,
                                                                          monkeypatch):
    """The greedy check plays its episodes (the real ones) and leaves training's state alone:
    a run whose checks fail twice is the run that never stopped, to the update it ends."""
    real, scores = train_module.greedy_score, iter([-1.0, -1.0])

    def greedy_score(cfg, agent, device):
        real(cfg, agent, device)
        return next(scores, 0.0)

    monkeypatch.setattr(train_module, "greedy_score", greedy_score)
    updates = []
    summary = train(small_config(log_dir=str(tmp_path), run_name="checked", **SOLVED_AT_ONCE),
                    on_update=lambda update, stats: updates.append(
                        stats.get("stop/greedy_score")))
    assert updates == [None, -1.0, -1.0, 0.0]  # asked after updates 2, 3 and 4; stops after 4
    assert summary["solved"]["steps"] == 128
    assert [c["steps"] for c in summary["solved"]["checks"]] == [64, 96, 128]
    events = EventAccumulator(str(tmp_path / "checked"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("stop/greedy_score")] == [
        (64, -1.0), (96, -1.0), (128, 0.0)]
    train(small_config(log_dir=str(tmp_path), run_name="whole",
                       **{**SOLVED_AT_ONCE, "stop_at": None, "total_steps": 128}))
    assert_same_training_state(load_checkpoint(tmp_path / "whole"),
                               load_checkpoint(tmp_path / "checked"))


def test_the_greedy_check_plays_its_own_seeds_and_can_be_switched_off(tmp_path):
    cfg = small_config(**SOLVED_AT_ONCE)
    envs = make_vector_env(cfg.env.id, 1, **cfg.env.kwargs)
    agent = build_agent(cfg, envs.single_observation_space, envs.single_action_space)
    envs.close()
    rng = torch.get_rng_state()
    score = train_module.greedy_score(cfg, agent, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)  # training's random numbers untouched
    expected = summarize(run_episodes(agent, cfg.env.id, cfg.env.kwargs, 64,
                                      seed=cfg.seed + STOP_SEED_OFFSET,
                                      device=torch.device("cpu"), deterministic=True))
    assert score == expected["return_mean"] and expected["episodes"] == 64
    assert STOP_SEED_OFFSET != EVAL_SEED_OFFSET
    off = train(small_config(log_dir=str(tmp_path), run_name="off", stop_greedy_episodes=0,
                             **SOLVED_AT_ONCE))
    assert off["solved"]["steps"] == 64 and off["solved"]["checks"] == []


def test_a_resumed_run_stops_where_the_uninterrupted_one_did(tmp_path):
    """The count of updates in a row is training state: 1 update + resume stops after 2."""
    train(small_config(log_dir=str(tmp_path), run_name="r",
                       **{**SOLVED_AT_ONCE, "total_steps": 32}))  # cut after update 1
    checkpoint = load_checkpoint(tmp_path / "r", resume=True)
    assert checkpoint["stop_when_solved"]["in_a_row"] == 1
    updates = []
    summary = train(resume_config(checkpoint, {"total_steps": 160}), resume=checkpoint,
                    on_update=lambda update, stats: updates.append(update))
    assert updates == [2] and summary["solved"]["steps"] == 64


@pytest.mark.parametrize(("env", "stop_at"), [
    ("MiniGrid-MemoryS7", 0.99), ("MiniGrid-MemoryS13Random-v0", 0.99),
    ("MiniGrid-MemoryS17Random", 0.99), ("MiniGrid-Memory-RGB", None), ("CueRecall", None),
    ("MortarMayhem-Grid", None), ("CartPole-v1", None)])
def test_the_symbolic_minigrid_presets_stop_once_solved_and_nothing_else_does(env, stop_at):
    """docs/results.md, "Stop once solved": measured on S9, S13Random, S17Random (and one
    seed each of S7, S11, S13)."""
    args, overrides = parse_args(["--env", env])
    assert resolve_config(args, overrides).stop_at == stop_at


def test_the_readme_preset_stops_when_solved_and_benchmarks_train_their_budget():
    preset = build_config(read_yaml(preset_path("MiniGrid-Memory")))
    assert (preset.stop_at, preset.stop_updates, preset.threshold_metric) == (0.99, 3, "success")
    assert build_config().stop_at is None  # the trainer's default: the whole budget
    suite = load_suite(Path("benchmarks/suite.yaml"))
    command = " ".join(train_command(Run(suite.tasks["MiniGrid-S9"], "trxl", 1), suite,
                                     Path("runs"), "cpu"))
    assert "--stop_at null" in command
