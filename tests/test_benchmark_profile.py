"""benchmarks/profile_iteration.py: every phase of a real (small) training iteration is timed,
the phases add up to the iteration, and the trainer's functions are restored afterwards;
benchmarks/time_to_solve.py's table."""

import trxl_rl.envs as envs_module
import trxl_rl.train as train_module
from benchmarks.profile_iteration import PHASES, profile, table
from benchmarks.time_to_solve import REFERENCE_GAUGE
from benchmarks.time_to_solve import table as solve_table

SMALL = {"env.num_envs": 4, "ppo.rollout_steps": 32, "ppo.segment_length": 8,
         "ppo.epochs": 2, "ppo.minibatches": 2}


def test_phases_cover_the_iteration_and_are_restored():
    originals = (train_module.collect, train_module.ppo_update, train_module.obs_to_tensor,
                 envs_module.completed_episodes)
    phases, total, steps = profile("MiniGrid-Memory", SMALL, updates=2, threads=1)
    assert steps == 2 * 4 * 32
    assert set(phases) == set(PHASES)
    assert abs(sum(phases.values()) - total) < 1e-9
    for name in ("env", "acting", "storage", "update: forward", "update: backward",
                 "update: clip + optimizer"):
        assert phases[name] > 0, name
    assert all(v >= 0 for v in phases.values()), phases
    # the real work dominates: the stopwatches' own remainder phases stay small
    assert phases["rest of the rollout"] + phases["update: rest"] < 0.5 * total
    assert (train_module.collect, train_module.ppo_update, train_module.obs_to_tensor,
            envs_module.completed_episodes) == originals
    text = table(phases, total, steps)
    assert text.count("\n| ") == len(PHASES) + 1 and "steps/s" in text


def test_time_to_solve_scales_wall_clock_by_the_gauge_of_its_sitting():
    runs = [{"seed": 1, "whole_seconds": 100.0, "train_seconds": 90.0, "threshold_steps": 212_992,
             "threshold_seconds": 40.0, "greedy_success": 1.0, "steps": 499_712},
            {"seed": 2, "whole_seconds": 100.0, "train_seconds": 90.0, "threshold_steps": None,
             "threshold_seconds": None, "greedy_success": 0.5, "steps": 331_776},
            {"seed": 3, "error": "ConfigError: bad"}]
    lines = solve_table(runs, host_gauge=REFERENCE_GAUGE / 2).splitlines()  # a host at half speed
    assert lines[2] == "| 1 | 100 (50) | 499,712 | 212,992 | 40 (20) | 90 | 1.00 |"
    assert lines[3] == "| 2 | 100 (50) | 331,776 | - | - | 90 | 0.50 |"  # stopped early
    assert lines[4].startswith("| 3 | failed: ConfigError: bad")
