"""One run behind runs.json, from the repository root:

    python docs/memory_benchmark/probes/cue16_lr3e-3_slow_test/run.py SEED none|0.05

CueRecall-16, TrXL with the suite's settings at ``ppo.learning_rate`` 3e-3 and the given
``ppo.rollback_kl``, the whole budget: the run of ``tests/test_learning_slow.py``'s
``suite_run``, which it calls. Writes ``runs/cue16_lr3e-3/s<SEED>_<rollback>.json``: the
largest fall after 0.9 training success, the greedy success and the training-success curve.
"""

import json
import sys
import time
from pathlib import Path

sys.path[:0] = [".", "tests"]  # the repository root (benchmarks) and the slow tests
from test_learning_slow import MEASURED_RATE, suite_run  # noqa: E402

from benchmarks.compare import drop_after_threshold  # noqa: E402

seed, rollback = int(sys.argv[1]), sys.argv[2]
rollback_kl = None if rollback == "none" else float(rollback)
out = Path("runs/cue16_lr3e-3") / f"s{seed}_{rollback}"
out.parent.mkdir(parents=True, exist_ok=True)
start = time.time()
curve, summary = suite_run(Path(f"{out}_log"), "CueRecall-16", "trxl", seed,
                           **{"ppo.rollback_kl": rollback_kl, **MEASURED_RATE})
with open(f"{out}.json", "w") as f:
    json.dump({"seed": seed, "rollback_kl": rollback_kl,
               "largest_fall_after_0.9": drop_after_threshold(curve, 0.9),
               "greedy_success": summary["success_rate"], "seconds": round(time.time() - start),
               "curve_training_success_per_update": curve}, f)
