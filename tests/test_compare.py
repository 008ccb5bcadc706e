"""Specification of the backbone comparison tool (benchmarks/compare.py)."""

import json
import math

import numpy as np
import pytest
import yaml

from benchmarks.compare import (
    FULL_SUITE,
    QUICK_SUITE,
    Run,
    aggregate,
    check_runs,
    drop_after_threshold,
    load_suite,
    main,
    markdown_table,
    mean_interval,
    mmer,
    run_overrides,
    seconds_to_step,
    steps_to_threshold,
    t_quantile_975,
    train_command,
)

TINY_SUITE = {
    "name": "tiny",
    "backbones": ["trxl", "none"],
    "seeds": [1],
    "defaults": {"eval_episodes": 4},
    "tasks": {"cue": {
        "env": "CueRecall", "budget": 32, "metric": "success", "threshold": 0.9,
        "tests": "recall after 2 steps",
        # one update of 4 envs x 8 steps; one minibatch of the 4 segments, one epoch
        "overrides": {"env.kwargs.delay": 2, "env.num_envs": 4, "ppo.rollout_steps": 8,
                      "ppo.segment_length": 8, "ppo.minibatches": 1, "ppo.epochs": 1,
                      "model.trxl.memory_length": 4, "model.gru.hidden_size": 8},
    }},
}


def write_suite(tmp_path, suite: dict, name: str = "suite.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def test_tiny_compare_writes_results_table_and_curves_then_skips_and_resumes(tmp_path,
                                                                              capsys):
    suite = write_suite(tmp_path, TINY_SUITE)
    out = tmp_path / "out"
    args = ["--suite", str(suite), "--out", str(out), "--jobs", "2"]
    assert main(args) == 0

    for backbone in ("trxl", "none"):
        result = json.loads((out / "results" / f"cue__{backbone}__s1.json").read_text())
        assert (result["task"], result["backbone"], result["seed"]) == ("cue", backbone, 1)
        assert result["budget"] == result["steps"] == 32
        assert result["final"]["episodes"] == 4 and result["final"]["success"] is not None
        assert result["curve"]["steps"] == [32] and len(result["curve"]["success"]) == 1
        assert result["mmer"] == result["curve"]["return"][0]
        assert result["sps"] > 0 and result["wall_clock_seconds"] > 0
        assert result["attempts"] == 1
        assert result["overrides"]["env.kwargs.delay"] == 2
        assert ("model.trxl.memory_length" in result["overrides"]) == (backbone == "trxl")
        assert "model.gru.hidden_size" not in result["overrides"]
    table = (out / "table.md").read_text()
    assert "| cue (success, 32) | trxl | 1 |" in table
    assert "| none | 1 |" in table
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert [row["backbone"] for row in rows] == ["trxl", "none"]
    assert (out / "curves" / "cue.png").read_bytes()[:4] == b"\x89PNG"

    capsys.readouterr()
    assert main(args) == 0  # everything done: nothing runs again
    assert "2 of 2 runs done; running 0" in capsys.readouterr().err
    assert (out / "logs" / "cue__trxl__s1.log").read_text().count("\n--- ") == 1

    # A run with checkpoints but no result is continued from its checkpoint, not restarted.
    (out / "results" / "cue__trxl__s1.json").unlink()
    (out / "runs" / "cue__trxl__s1" / "summary.json").unlink()
    assert main([*args, "--backbones", "trxl"]) == 0
    result = json.loads((out / "results" / "cue__trxl__s1.json").read_text())
    assert result["attempts"] == 2 and result["steps"] == 32
    log = (out / "logs" / "cue__trxl__s1.log").read_text()
    assert log.count("\n--- ") == 2 and "--resume" in log


def test_t_interval_over_seeds_on_known_numbers():
    mean, low, high = mean_interval([0.8, 0.9, 1.0])  # sd 0.1, t(0.975, 2) = 4.303
    half = 4.303 * 0.1 / math.sqrt(3)
    assert mean == pytest.approx(0.9) and (low, high) == pytest.approx((0.9 - half, 0.9 + half))
    assert mean_interval([0.7]) == (0.7, None, None)  # one seed: just the value
    assert mean_interval([2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert t_quantile_975(1) == 12.706 and t_quantile_975(30) == 2.042
    assert t_quantile_975(60) == pytest.approx(2.000, abs=2e-3)
    assert t_quantile_975(120) == pytest.approx(1.980, abs=2e-3)


def test_mmer_is_the_largest_logged_mean_return_and_none_without_episodes():
    assert mmer(np.array([-0.5, 0.25, 0.1])) == 0.25
    assert mmer(np.zeros(0)) is None


def test_steps_to_threshold_is_the_first_logged_step_that_reaches_it():
    steps = np.array([4096, 8192, 12288, 16384])
    assert steps_to_threshold(steps, np.array([0.5, 0.9, 0.8, 1.0]), 0.9) == 8192
    assert steps_to_threshold(steps, np.array([0.5, 0.89, 0.8, 0.7]), 0.9) is None
    assert steps_to_threshold(steps, np.array([-1.0, -0.2, 0.1, 0.0]), 0.0) == 12288


def test_drop_after_threshold_is_the_largest_fall_from_the_best_so_far_after_reaching_it():
    assert drop_after_threshold([0.2, 0.95, 1.0, 0.6, 0.9, 0.4, 1.0], 0.9) == pytest.approx(0.6)
    assert drop_after_threshold([0.9, 0.1], 0.9) == pytest.approx(0.8)
    # a fall before the threshold does not count; an update without episodes is skipped
    assert drop_after_threshold([0.8, 0.1, 0.92, None, 0.95, 1.0], 0.9) == 0.0
    assert drop_after_threshold([0.5, 0.89, None], 0.9) is None  # never reached
    assert drop_after_threshold([-1.0, 0.95, -0.5], 0.9) == pytest.approx(1.45)  # returns


def fake_result(task, backbone, seed, final, mmer_value, reached):
    return {"task": task, "backbone": backbone, "seed": seed, "budget": 1000,
            "final": {"success": final, "return": final}, "mmer": mmer_value,
            "steps_to_threshold": reached, "sps": 100.0 * seed, "wall_clock_seconds": 60.0,
            "curve": {"steps": [500, 1000], "success": [0.5, final], "return": [0.1, final]}}


def test_table_aggregates_seeds_mmer_and_steps_to_threshold(tmp_path):
    suite = load_suite(write_suite(tmp_path, {**TINY_SUITE, "tasks": {"cue": {
        **TINY_SUITE["tasks"]["cue"], "budget": 1000}}}))
    results = [fake_result("cue", "trxl", 1, 1.0, 0.9, 400),
               fake_result("cue", "trxl", 2, 0.9, 0.8, None),
               fake_result("cue", "trxl", 3, 1.0, 1.0, 600),
               fake_result("cue", "none", 1, 0.5, 0.5, None)]
    trxl, none = aggregate(results, suite)
    assert trxl["seeds"] == [1, 2, 3] and trxl["final_mean"] == pytest.approx(29 / 30)
    assert trxl["final_ci95"][1] == 1.0  # a success rate's interval is clipped to [0, 1]
    assert trxl["mmer"] == pytest.approx(0.9)
    assert trxl["steps_to_threshold"] == 500 and trxl["reached_threshold"] == 2
    assert trxl["sps"] == 200.0
    assert none["final_ci95"] is None and none["reached_threshold"] == 0
    # curves 0.5 -> final: seeds 1 and 3 reached 0.9 at their last update, nothing fell after
    assert trxl["drop_per_seed"] == [0.0, 0.0, 0.0] and trxl["drops_above_tolerance"] == 0
    assert none["largest_drop"] is None
    results[0]["curve"]["success"] = [0.95, 0.5]  # seed 1 solved, then fell
    trxl, none = aggregate(results, suite)
    assert trxl["largest_drop"] == pytest.approx(0.45) and trxl["drops_above_tolerance"] == 1
    table = markdown_table([trxl, none], suite)
    assert "| 0.45 (1/3) |" in table and "| - (0/1) | - | - |" in table
    assert "| 0.97 [0.82, 1.00] | 0.90 | 500 (2/3) |" in table
    assert "| 0.50 | 0.50 | - (0/1) |" in table


def test_time_to_threshold_sums_the_training_seconds_up_to_that_update(tmp_path):
    steps, seconds = np.array([4096, 8192, 12288]), np.array([2.0, 3.0, 4.0])
    assert seconds_to_step(8192, (steps, seconds)) == 5.0
    assert seconds_to_step(None, (steps, seconds)) is None
    suite = load_suite(write_suite(tmp_path, {**TINY_SUITE, "tasks": {"cue": {
        **TINY_SUITE["tasks"]["cue"], "budget": 1000}}}))
    results = [{**fake_result("cue", "trxl", seed, 1.0, 0.9, 400),
                "seconds_to_threshold": seconds} for seed, seconds in ((1, 60.0), (2, 180.0))]
    row, = aggregate(results, suite)
    assert row["seconds_to_threshold"] == 120.0
    assert "| 400 (2/2) | 2.0 min |" in markdown_table([row], suite)
    command = train_command(Run(suite.tasks["cue"], "trxl", 1), suite, tmp_path, "cpu")
    assert " ".join(command).count("--threshold 0.9 --threshold_metric success") == 1


def test_published_figures_stand_beside_ours_under_the_suites_own_column_name(tmp_path):
    cue = {**TINY_SUITE["tasks"]["cue"], "budget": 1000,
           "reference": {"value": 0.99, "source": "CleanRL docs, 100M steps"}}
    suite = load_suite(write_suite(tmp_path, {**TINY_SUITE, "tasks": {"cue": cue},
                                              "reference_column": "CleanRL PPO-TrXL"}))
    table = markdown_table(aggregate([fake_result("cue", "trxl", 1, 1.0, 0.9, 400)], suite),
                           suite)
    assert "| CleanRL PPO-TrXL |" in table.splitlines()[0] and "| 0.990 |" in table
    assert "- CleanRL PPO-TrXL, cue: CleanRL docs, 100M steps" in table
    assert load_suite(write_suite(tmp_path, TINY_SUITE)).reference_column == \
        "POPGym paper, GRU MMER"


def test_backbone_sections_reach_only_the_runs_of_their_backbone(tmp_path):
    suite = load_suite(write_suite(tmp_path, TINY_SUITE))
    task = suite.tasks["cue"]
    assert "model.trxl.memory_length" in run_overrides(suite, task, "trxl")
    assert not any(k.startswith("model.") for k in run_overrides(suite, task, "none"))
    cmd = train_command(Run(task, "gru", 3), suite, tmp_path / "runs", "cpu")
    assert cmd[1:3] == ["-m", "trxl_rl.train"]
    for option in (["--seed", "3"], ["--total-steps", "32"], ["--run-name", "cue__gru__s3"],
                   ["--model.backbone", "gru"], ["--model.gru.hidden_size", "8"],
                   ["--threads", "1"], ["--progress", "false"], ["--eval_episodes", "4"]):
        assert any(cmd[i:i + 2] == option for i in range(len(cmd))), option
    assert "--model.trxl.memory_length" not in cmd
    suite.forced["model.trxl.memory_length"] = 8  # --set model.trxl.memory_length 8 wins
    assert run_overrides(suite, task, "trxl")["model.trxl.memory_length"] == 8


def test_a_backbones_own_options_reach_only_its_runs_and_set_still_wins(tmp_path):
    cue = {**TINY_SUITE["tasks"]["cue"],
           "backbone_overrides": {"trxl": {"ppo.learning_rate": 3e-4}}}
    suite = load_suite(write_suite(tmp_path, {**TINY_SUITE, "tasks": {"cue": cue}}))
    task = suite.tasks["cue"]
    assert run_overrides(suite, task, "trxl")["ppo.learning_rate"] == 3e-4
    assert "ppo.learning_rate" not in run_overrides(suite, task, "none")
    assert "ppo.learning_rate" not in run_overrides(suite, task, "gtrxl")  # by exact name
    cmd = train_command(Run(task, "trxl", 1), suite, tmp_path / "runs", "cpu")
    assert any(cmd[i:i + 2] == ["--ppo.learning_rate", "0.0003"] for i in range(len(cmd)))
    suite.forced["ppo.learning_rate"] = 1e-3
    assert run_overrides(suite, task, "trxl")["ppo.learning_rate"] == 1e-3


BAD_SUITES = [
    ("tasks: [unclosed", "not valid YAML"),
    ({"backbones": ["trxl"], "seeds": [1]}, "missing key 'tasks'"),
    ({**TINY_SUITE, "sedes": [1]}, "unknown key 'sedes'"),
    ({**TINY_SUITE, "backbones": ["transformer"]}, "unknown backbone 'transformer'"),
    ({**TINY_SUITE, "tasks": {"cue": {**TINY_SUITE["tasks"]["cue"], "metric": "score"}}},
     "metric must be one of success, return"),
    ({**TINY_SUITE, "tasks": {"cue": {**TINY_SUITE["tasks"]["cue"], "budget": "lots"}}},
     "budget must be a positive integer"),
    ({**TINY_SUITE, "tasks": {"a__b": TINY_SUITE["tasks"]["cue"]}}, "no '__'"),
    ({**TINY_SUITE, "tasks": {"cue": {**TINY_SUITE["tasks"]["cue"],
                                      "overrides": {"ppo.learning_rat": 1e-3}}}},
     "unknown config key 'ppo.learning_rat'"),
    ({**TINY_SUITE, "tasks": {"cue": {**TINY_SUITE["tasks"]["cue"], "env": "NoSuchEnv-v0"}}},
     "task 'cue'"),
    ({**TINY_SUITE, "tasks": {"cue": {**TINY_SUITE["tasks"]["cue"],
                                      "backbone_overrides": {"trxx": {}}}}},
     "backbone_overrides: unknown backbone 'trxx'"),
    ({**TINY_SUITE, "tasks": {"cue": {**TINY_SUITE["tasks"]["cue"],
                                      "backbone_overrides": {"trxl": [1]}}}},
     "backbone_overrides: trxl must be a mapping"),
    ({**TINY_SUITE, "tasks": {"cue": {**TINY_SUITE["tasks"]["cue"], "backbone_overrides": {
        "trxl": {"ppo.learning_rate": -1.0}}}}}, "learning_rate"),
]


@pytest.mark.parametrize(("suite", "needle"), BAD_SUITES, ids=[n for _, n in BAD_SUITES])
def test_a_bad_suite_file_is_a_one_line_error_with_exit_code_2(tmp_path, capsys, suite,
                                                               needle):
    path = tmp_path / "suite.yaml"
    path.write_text(suite if isinstance(suite, str) else yaml.safe_dump(suite))
    assert main(["--suite", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--tasks", "cue", "recall"], "unknown task 'recall'"),
    (["--backbones", "trxl", "transformer"], "unknown backbone 'transformer'"),
    (["--jobs", "0"], "--jobs must be >= 1"),
])
def test_an_unknown_task_or_backbone_is_a_one_line_error_with_exit_code_2(tmp_path, capsys,
                                                                          args, needle):
    suite = write_suite(tmp_path, TINY_SUITE)
    assert main(["--suite", str(suite), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err


@pytest.mark.filterwarnings("ignore:Maze environments:DeprecationWarning")  # popgym's note
@pytest.mark.parametrize("path", [FULL_SUITE, QUICK_SUITE], ids=lambda p: p.name)
def test_shipped_suites_build_every_run_config_and_env(path):
    pytest.importorskip("popgym")
    suite = load_suite(path)
    runs = [Run(task, backbone, suite.seeds[0]) for task in suite.tasks.values()
            for backbone in [*suite.backbones, "gtrxl"]]
    check_runs(runs, suite, "cpu")
    assert all(task.budget > 0 for task in suite.tasks.values())
