"""One run behind runs.json, from the repository root:

    python docs/memory_benchmark/probes/cue16_lr3e-3_slow_test/run.py SEED none|0.05

CueRecall-16, TrXL with the suite's settings at ``ppo.learning_rate`` 3e-3 and the given
``ppo.rollback_kl``, the whole budget (as ``tests/test_learning_slow.py`` runs it); writes
``runs/cue16_lr3e-3/s<SEED>_<rollback>.json``: the largest fall after 0.9 training success,
the greedy success and the training-success curve.
"""

import json
import os
import sys
import time

from benchmarks.compare import FULL_SUITE, drop_after_threshold, load_suite, run_overrides
from trxl_rl.config import build_config, preset_path, read_yaml
from trxl_rl.train import train

seed, rollback = int(sys.argv[1]), sys.argv[2]
suite = load_suite(FULL_SUITE)
task = suite.tasks["CueRecall-16"]
os.makedirs("runs/cue16_lr3e-3", exist_ok=True)
out = f"runs/cue16_lr3e-3/s{seed}_{rollback}"
cfg = build_config(read_yaml(preset_path(task.env)), {
    **run_overrides(suite, task, "trxl"), "model.backbone": "trxl", "seed": seed,
    "total_steps": task.budget, "threshold": task.threshold, "threshold_metric": task.metric,
    "stop_at": None, "threads": 1, "log_dir": out + "_log", "progress": False,
    "ppo.learning_rate": 3e-3,
    "ppo.rollback_kl": None if rollback == "none" else float(rollback)})
curve = []
start = time.time()
summary = train(cfg, on_update=lambda update, stats: curve.append(stats.get("charts/success_rate")))
with open(out + ".json", "w") as f:
    json.dump({"seed": seed, "rollback_kl": cfg.ppo.rollback_kl,
               "largest_fall_after_0.9": drop_after_threshold(curve, 0.9),
               "greedy_success": summary["success_rate"], "seconds": round(time.time() - start),
               "curve_training_success_per_update": curve}, f)
