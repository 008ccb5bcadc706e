"""Wall-clock until the README's first command has a solved agent, over seeds, with the host's
speed measured in the same sitting.

    python -m benchmarks.time_to_solve                        # seeds 1-3, the bare command
    python -m benchmarks.time_to_solve --seeds 4 5 --set threads=null ppo.epochs=4
    python -m benchmarks.time_to_solve --set ranks=2          # 2 ranks x 1 thread

Each seed runs ``python -m trxl_rl.train --env MiniGrid-Memory --seed S`` (plus ``--KEY VALUE``
for every ``--set``) in a fresh process in a temporary directory, one after another, nothing
else of this script running beside it (with ``--set ranks=R`` the command starts R ranks
itself, each its own ``env.num_envs`` envs), and reports:

- whole: wall-clock of the whole command (start-up, training, final evaluation);
- threshold: training steps and training seconds when the training success first reached the
  run's threshold (``summary.json["threshold"]``, 0.9 by default); "-" if it never did;
- steps trained: the budget, or fewer where the run stopped solved (the preset's ``stop_at``);
- train: training seconds of those steps; greedy: the final evaluation's success.

The gauge is ``benchmarks.run``'s ``env`` row (the preset's 16 envs alone, random actions),
measured before the first seed and after the last: the host's speed at the time. ``scaled``
converts a wall-clock to the reference host speed (``REFERENCE_GAUGE``, an idle sitting of the
development VM) by the ratio of the gauges, so figures from different sittings and hosts can be
compared; it assumes the trainer slows down with the host as the env does (roughly true on a
shared VM, where every row of ``benchmarks.run`` moves with it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.profile_iteration import parse_set

# env-only steps/s of the preset's 16 envs on the idle 2-core development VM (2026-12-02).
REFERENCE_GAUGE = 34_149


def gauge() -> float:
    """The env-only SPS of the preset (``benchmarks.run``'s ``env`` row, in a fresh process)."""
    spec = {"name": "env", "preset": "MiniGrid-Memory", "env_only": True, "updates": 40}
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--one", json.dumps(spec)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["sps"]


def solve(seed: int, overrides: dict) -> dict:
    """Run the README's first command for ``seed``; its wall-clock and summary."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "trxl_rl.train", "--env", "MiniGrid-Memory",
               "--seed", str(seed), "--run-name", "solve", "--progress", "false"]
        for key, value in overrides.items():
            cmd += [f"--{key}", json.dumps(value)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *sys.path])}
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        whole = time.perf_counter() - start
        if proc.returncode:
            return {"seed": seed, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        summary = json.loads((Path(tmp) / "runs" / "solve" / "summary.json").read_text())
    threshold = summary.get("threshold") or {}
    return {"seed": seed, "whole_seconds": whole, "train_seconds": summary["train_seconds"],
            "threshold_steps": threshold.get("steps"),
            "threshold_seconds": threshold.get("seconds"),
            "greedy_success": summary.get("success_rate"), "steps": summary["global_step"]}


def table(runs: list[dict], host_gauge: float) -> str:
    scale = host_gauge / REFERENCE_GAUGE
    lines = ["| seed | whole s (scaled) | steps trained | threshold steps | threshold s (scaled) "
             "| train s | greedy success |", "|--:|--:|--:|--:|--:|--:|--:|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['seed']} | failed: {r['error'][:100]} | | | | | |")
            continue
        t_s = r["threshold_seconds"]
        threshold = (f"{r['threshold_steps']:,} | {t_s:.0f} ({t_s * scale:.0f})"
                     if t_s is not None else "- | -")
        lines.append(f"| {r['seed']} | {r['whole_seconds']:.0f} ({r['whole_seconds'] * scale:.0f})"
                     f" | {r['steps']:,} | {threshold} | {r['train_seconds']:.0f}"
                     f" | {r['greedy_success']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.time_to_solve",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides passed to the command as --KEY VALUE")
    parser.add_argument("--json", default="benchmarks/out/time_to_solve.json")
    args = parser.parse_args(argv)
    overrides = parse_set(args.set)
    before = gauge()
    runs = []
    for seed in args.seeds:
        runs.append(solve(seed, overrides))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    after = gauge()
    host_gauge = (before + after) / 2
    header = (f"`python -m trxl_rl.train --env MiniGrid-Memory` {' '.join(args.set)}; gauge "
              f"(env-only steps/s) {before:,.0f} before, {after:,.0f} after; scaled = x "
              f"{host_gauge:,.0f} / {REFERENCE_GAUGE:,}")
    print(header + "\n\n" + table(runs, host_gauge))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": header, "overrides": overrides,
                                "gauge_before": before, "gauge_after": after,
                                "reference_gauge": REFERENCE_GAUGE, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
