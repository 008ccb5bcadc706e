"""Slow learning checks (minutes each): ``python -m pytest -m slow``.

The preset's greedy success on S9 was measured at 1.00, 0.95, 1.00 for seeds 1-3 (and 1.00,
0.91 for seeds 4, 5; every run escaped the 0.5 plateau by 352k of its 500k steps); without
memory 0.50, 0.49, 0.49. With ``ppo.rollback_kl 0.05``, the preset's since 2026-12-04, seeds
1-5 score 1.00 each, with the same steps to 0.9. Until 2026-12-08 a single seed's score sat
too close to any threshold to be a fair check, and the check was the mean over seeds 1-3.
Since 2026-12-04 the preset stops once solved (``stop_at`` 0.99, within 750k steps): seeds
1-3 stop at 315k-360k steps with greedy 1.00 each; the memory-off run, which never solves,
keeps the old 500k budget. Since 2026-12-08 the stop also asks 64 greedy episodes
(``stop_greedy_episodes``): on the install of that day seed 1 had stopped at 385k with greedy
0.815 and now stops at 430k with 1.00 (seeds 2 and 3 as before, 1.00), so every seed must
now score at least 0.95 on its own.
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


def test_minigrid_memory_preset_solves_s9_greedy_on_every_seed(tmp_path):
    scores = [run_preset(tmp_path, seed=seed) for seed in (1, 2, 3)]
    assert min(scores) >= 0.95, scores


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
CONTRAST_SEEDS = (5, 6)


def largest_falls(tmp_path, rollback_kl):
    """The largest fall after 0.9 training success of each of :data:`CONTRAST_SEEDS`' runs
    of CueRecall-16 (TrXL at 3e-3), and their summaries."""
    falls, summaries = [], []
    for seed in CONTRAST_SEEDS:
        curve, summary = suite_run(tmp_path / f"seed{seed}", "CueRecall-16", "trxl", seed=seed,
                                   **{"ppo.rollback_kl": rollback_kl, **MEASURED_RATE})
        falls.append(drop_after_threshold(curve, 0.9))
        summaries.append(summary)
    return falls, summaries


def test_solved_cue_recall_runs_stay_solved_with_the_rollback(tmp_path):
    """CueRecall-16 with TrXL at the CueRecall preset's rate, 3e-3, solves the task within
    ~30k steps and, without a guard, some seeds then fall to chance in one update (a KL 100x
    the usual). Seeds 1-6 on the 2-core VM (2026-12-07; ~1 minute each): largest falls without
    ``ppo.rollback_kl`` 0.10, 0.50, 0.05, 0.11, 0.43, 0.13; with 0.05 (the CueRecall preset's)
    0.10, 0.27, 0.05, 0.11, 0.016, 0.008. Seeds 5 and 6 are the check and its control below:
    the two seeds where the guard makes the difference (it does not keep every seed solved
    at this rate: seed 2 still falls by 0.27, half its fall without). Both keep the rate they were
    measured at: the suite has trained TrXL at 3e-4 on CueRecall since 2026-12-04, where the
    falls are rarer and too shallow for a control.

    Which seeds fall moves with float rounding (another CPU or library build gives another
    trajectory): when this check was written (2026-12-05) seed 3 fell by 0.59 without the
    guard and 0.008 with it; on this machine it falls by 0.05 either way. Two seeds make the
    control less fragile."""
    falls, summaries = largest_falls(tmp_path, 0.05)
    assert max(falls) <= 0.1, falls
    assert min(s["success_rate"] for s in summaries) >= 0.95


def test_without_the_rollback_the_same_runs_collapse(tmp_path):
    """The control of the check above: without the guard a seed of the same two still falls
    after solving (if none did, the check above would prove nothing)."""
    falls, _ = largest_falls(tmp_path, None)
    assert max(falls) > 0.1, falls
