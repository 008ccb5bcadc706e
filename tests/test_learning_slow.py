"""Slow learning checks (minutes each): ``python -m pytest -m slow``.

The preset's greedy success on S9 was measured at 1.00, 0.95, 1.00 for seeds 1-3 (and 1.00,
0.91 for seeds 4, 5; every run escaped the 0.5 plateau by 352k of its 500k steps); without
memory 0.50, 0.49, 0.49. A single seed's score sits too close to any threshold to be a fair
check, so the check is the mean over seeds 1-3, with a margin below the measured 0.98: a seed
left on the plateau (~0.5) pulls the mean below 0.9 and fails it.
"""

import pytest

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
    assert run_preset(tmp_path, **{"model.trxl.memory_length": 0}) <= 0.7
