"""The README's two pictures, made from training runs.

    # 3 seeds with memory and 3 without (about 2.5 minutes each on one core):
    for s in 1 2 3; do
      python -m trxl_rl.train --env MiniGrid-Memory --seed $s --run-name S9_mem_s$s
      python -m trxl_rl.train --env MiniGrid-Memory --seed $s --run-name S9_nomem_s$s \\
          --model.trxl.memory_length 0
    done
    python -m benchmarks.figures --on 'runs/S9_mem_s*' --off 'runs/S9_nomem_s*' \\
        --solved runs/S9_mem_s1

writes ``docs/learning_curve_s9.png`` (training success rate against environment steps, mean
and min-max band over seeds, memory on and off) and ``docs/attention_s9.png`` (the last
layer's attention over memory in one greedy episode of the solved run's newest checkpoint:
the first episode, from the evaluation seeds, that the agent solves and in which it had to
turn back to see the cue, i.e. longer than ``--min-length`` steps).
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import torch

from benchmarks.curves import plot_curves, read_scalars


def learning_curve(on: list[str], off: list[str], path: Path) -> None:
    tag = "charts/success_rate"
    groups = {"memory on (M=64)": [read_scalars(run, tag) for run in on],
              "memory off (M=0)": [read_scalars(run, tag) for run in off]}
    plot_curves(groups, path, "MiniGrid-MemoryS9, the MiniGrid-Memory preset",
                "training success rate (sampled actions)")


def attention(run: str, path: Path, min_length: int, tries: int = 50) -> str:
    """Draw the solved run's attention in its first long successful greedy episode."""
    from trxl_rl.checkpoint import load_agent
    from trxl_rl.envs import make_env
    from trxl_rl.evaluate import EVAL_SEED_OFFSET, attention_map, plot_attention

    agent = load_agent(run)
    cfg = agent.train_config
    env = make_env(cfg.env.id, **cfg.env.kwargs)
    cpu = torch.device("cpu")
    for seed in range(cfg.seed + EVAL_SEED_OFFSET, cfg.seed + EVAL_SEED_OFFSET + tries):
        heat, result = attention_map(agent, env, seed, cpu, deterministic=True)
        if result["success"] and result["length"] > min_length:
            title = (f"last-layer attention of a solved agent\n{cfg.env.id}, greedy, seed "
                     f"{seed}: {result['length']} steps, success")
            plot_attention(heat, path, title)
            return f"seed {seed}, {result['length']} steps"
    raise SystemExit(f"no successful episode longer than {min_length} steps in {tries} seeds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.figures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--on", required=True, help="glob of the runs with memory")
    parser.add_argument("--off", required=True, help="glob of the runs without memory")
    parser.add_argument("--solved", required=True, help="run directory of a solved agent")
    parser.add_argument("--min-length", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    on, off = sorted(glob.glob(args.on)), sorted(glob.glob(args.off))
    if not on or not off:
        parser.error(f"no runs match --on {args.on!r} or --off {args.off!r}")
    learning_curve(on, off, args.out / "learning_curve_s9.png")
    print(f"{args.out / 'learning_curve_s9.png'}: {len(on)} runs on, {len(off)} off")
    episode = attention(args.solved, args.out / "attention_s9.png", args.min_length)
    print(f"{args.out / 'attention_s9.png'}: {episode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
