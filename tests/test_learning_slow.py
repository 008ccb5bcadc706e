"""Slow learning checks (minutes each): ``python -m pytest -m slow``."""

import pytest

from trxl_rl.config import build_config, preset_path, read_yaml
from trxl_rl.train import train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_minigrid_memory_preset_is_solved_within_its_budget(tmp_path, seed):
    cfg = build_config(read_yaml(preset_path("MiniGrid-Memory")),
                       {"seed": seed, "log_dir": str(tmp_path), "progress": False})
    summary = train(cfg)
    assert summary["episodes"] >= 100
    assert summary["success_rate"] >= 0.95


def test_minigrid_memory_preset_without_memory_stays_near_chance(tmp_path):
    cfg = build_config(read_yaml(preset_path("MiniGrid-Memory")),
                       {"model.memory_length": 0, "log_dir": str(tmp_path), "progress": False})
    assert train(cfg)["success_rate"] <= 0.7
