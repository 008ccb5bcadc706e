"""The updates after the threshold whose training return fell by more than 0.25 from the
update before, per run (``benchmarks.compare`` result JSON), as (step, before, after):

    python docs/memory_benchmark/probes/repeatfirst_disjoint_seeds/falls.py \
        docs/memory_benchmark/probes/rollback005_suite/POPGym-RepeatFirstMedium__trxl__s*.json \
        docs/memory_benchmark/probes/repeatfirst_disjoint_seeds/*.json
"""

import json
import sys

for path in sys.argv[1:]:
    with open(path) as f:
        run = json.load(f)
    steps, returns = run["curve"]["steps"], run["curve"]["return"]
    reached = run["steps_to_threshold"] or float("inf")
    falls = [(steps[i], round(returns[i - 1], 2), round(returns[i], 2))
             for i in range(1, len(returns))
             if None not in (returns[i - 1], returns[i]) and steps[i] > reached
             and returns[i - 1] - returns[i] > 0.25]
    print(f"seed {run['seed']}: threshold at {reached}, falls {falls}")
