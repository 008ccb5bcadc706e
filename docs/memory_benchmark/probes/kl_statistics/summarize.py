"""Per update of each probed run: the largest value of every statistic over the update's KL
measurements and the training success of the rollouts before and after it; then, per
statistic, whether a bound could tell the updates after which a solved run fell apart from
the others.

    python summarize.py <probe dir>      # the probe's JSON and run directories
    -> updates.json here, and a table on stdout

An update is "bad" when the run was solved (training success >= 0.9) before it and success
fell by more than 0.1 after it; "healthy" when the run was solved before and after it.
"""
import glob
import json
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

STATS = ["mean", "q90", "q99", "max", "confident_mean", "adv_weighted"]
probe = Path(sys.argv[1])
summary, rows = {}, []
for path in sorted(probe.glob("*__s*.json")):
    name = path.stem
    events = glob.glob(str(probe / "runs" / name / "events*"))
    records = json.loads(path.read_text())
    if not events or not records:
        continue
    acc = EventAccumulator(events[0], size_guidance={"scalars": 0})
    acc.Reload()
    success = [e.value for e in acc.Scalars("charts/success_rate")]
    per_update: dict[int, dict] = {}
    for r in records:
        u = per_update.setdefault(r["update"], {k: 0.0 for k in STATS})
        for k in STATS:
            u[k] = max(u[k], r[k])
    updates = []
    for i, stats in sorted(per_update.items()):
        if i + 1 >= len(success):
            break
        before, after = success[i], success[i + 1]
        kind = ("bad" if before >= 0.9 and before - after > 0.1 else
                "healthy" if before >= 0.9 and after >= 0.9 else "")
        updates.append({"update": i, "success_before": before, "success_after": after,
                        "kind": kind, **stats})
    summary[name] = updates
    bad = [u for u in updates if u["kind"] == "bad"]
    healthy = [u for u in updates if u["kind"] == "healthy"]
    rows.append((name, len(bad), len(healthy),
                 {k: (min((u[k] for u in bad), default=float("nan")),
                      max((u[k] for u in healthy), default=float("nan"))) for k in STATS}))
(Path(__file__).parent / "updates.json").write_text(json.dumps(summary, indent=1))
print("| run | bad updates | healthy | " + " | ".join(STATS) + " |")
print("|---|--:|--:|" + "---|" * len(STATS))
for name, nb, nh, sep in rows:
    cells = [f"{lo:.3g} / {hi:.3g}" + (" **separates**" if lo > hi else "")
             for lo, hi in sep.values()]
    print(f"| {name} | {nb} | {nh} | " + " | ".join(cells) + " |")
