"""Slow learning checks (minutes each): ``python -m pytest -m slow``.

The preset's greedy success on S9 was measured at 1.00, 0.95, 1.00 for seeds 1-3 (and 1.00,
0.91 for seeds 4, 5; every run escaped the 0.5 plateau by 352k of its 500k steps); without
memory 0.50, 0.49, 0.49. With ``ppo.rollback_kl 0.05``, the preset's since 2026-12-04, seeds
1-5 score 1.00 each, with the same steps to 0.9. A single seed's score sits too close to any
threshold to be a fair check, so the check is the mean over seeds 1-3, with a margin below
the measured 0.98: a seed left on the plateau (~0.5) pulls the mean below 0.9 and fails it.
Since 2026-12-04 the preset stops once solved (``stop_at`` 0.99, within 750k steps): seeds
1-3 stop at 315k-360k steps with greedy 1.00 each; the memory-off run, which never solves,
keeps the old 500k budget.
"""

import pytest

from benchmarks.compare import FULL_SUITE, drop_after_threshold, load_suite, run_overrides
from trxl_rl.config import build_config, preset_path, read_yaml
from trxl_rl.train import train

pytestmark = pytest.mark.slow


def run_preset(tmp_path, **overrides):
    cfg = build_config(read_yaml(preset_path("MiniGrid-Memory")),
                       {"log_dir": str(tmp_path), "progress": False, **overrides})
    summary = train(cfg)
    assert summary["episodes"] >= 100
    return summary["success_rate"]


def test_minigrid_memory_preset_solves_s9_within_its_budget_on_average(tmp_path):
    scores = [run_preset(tmp_path, seed=seed) for seed in (1, 2, 3)]
    assert sum(scores) / len(scores) >= 0.9, scores


def test_minigrid_memory_preset_without_memory_stays_near_chance(tmp_path):
    assert run_preset(tmp_path, total_steps=500_000, **{"model.trxl.memory_length": 0}) <= 0.7


def suite_run(tmp_path, task_name, backbone, seed, **overrides):
    """One run of the comparison suite (``benchmarks/suite.yaml``) in this process, with
    ``overrides``; returns its training curve (success, or return, per update) and summary."""
    suite = load_suite(FULL_SUITE)
    task = suite.tasks[task_name]
    cfg = build_config(read_yaml(preset_path(task.env)), {
        **run_overrides(suite, task, backbone), "model.backbone": backbone, "seed": seed,
        "total_steps": task.budget, "threshold": task.threshold,
        "threshold_metric": task.metric, "stop_at": None, "log_dir": str(tmp_path),
        "progress": False, **overrides})  # the whole budget, as benchmarks.compare runs it
    curve = []
    tag = "charts/success_rate" if task.metric == "success" else "charts/episodic_return"
    summary = train(cfg, on_update=lambda update, stats: curve.append(stats.get(tag)))
    return curve, summary


MEASURED_RATE = {"ppo.learning_rate": 3.0e-3}  # the CueRecall preset's


def test_a_solved_cue_recall_run_stays_solved_with_the_rollback(tmp_path):
    """Seed 3 of the suite's CueRecall-16 TrXL run solved the task by 20k steps, then fell
    from 1.00 to chance in one update (its KL 100x the usual) and never recovered: greedy
    0.57, a fall of 0.59. With ``ppo.rollback_kl 0.05`` (the CueRecall preset's since 2026-12-04)
    that update is undone (measured on the 2-core VM: largest fall 0.008, greedy 1.00; ~1
    minute). Both runs keep the rate they were measured at, the CueRecall preset's 3e-3: the
    suite has trained TrXL at 3e-4 there since 2026-12-04, and at 3e-4 this seed does not fall
    even without the guard (largest fall 0.04), which would leave the control below without a
    collapse to show."""
    curve, summary = suite_run(tmp_path, "CueRecall-16", "trxl", seed=3,
                               **{"ppo.rollback_kl": 0.05, **MEASURED_RATE})
    assert drop_after_threshold(curve, 0.9) <= 0.1, curve
    assert summary["success_rate"] >= 0.95


def test_without_the_rollback_the_same_run_collapses(tmp_path):
    """The control of the check above: the collapse still happens without the guard (if it
    did not, the check above would prove nothing)."""
    curve, _ = suite_run(tmp_path, "CueRecall-16", "trxl", seed=3,
                         **{"ppo.rollback_kl": None, **MEASURED_RATE})
    assert drop_after_threshold(curve, 0.9) > 0.1, curve
