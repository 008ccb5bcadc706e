"""Where one training iteration's time goes, phase by phase, as a markdown table.

    python -m benchmarks.profile_iteration                       # the MiniGrid-Memory preset
    python -m benchmarks.profile_iteration --preset MiniGrid-Memory-RGB
    python -m benchmarks.profile_iteration --threads 2 --updates 5 --set ppo.epochs=4

Builds the trainer's own pieces (vector env, agent, rollout, optimizer) as
``benchmarks.run`` does and runs :func:`trxl_rl.train.iteration` on them, after one warm-up
iteration that is not counted, with a stopwatch around each phase:

- env: ``envs.step``; observations: ``obs_to_tensor`` (numpy observations to tensors);
- acting: ``agent.act`` (the backbone step, heads, sampling); truncation bootstraps:
  ``agent.value`` on final observations; storage: ``Rollout.add`` and ``add_outcome``;
- episodes: reading finished episodes from the infos; rest of the rollout: the loop itself,
  action conversion, done flags; GAE: the bootstrap value and ``compute_returns``;
- update: ``ppo_update``, split into the forward pass (``agent.evaluate`` or
  ``evaluate_with_reconstruction``), backward, gradient clipping with the optimizer step, and
  the rest (minibatch slicing, the losses, the diagnostics).

Every phase is wall-clock of the calls (one thread unless ``--threads``), so the shares add up
to the iteration. The stopwatches cost a few microseconds per call: compare with
``benchmarks.run``'s SPS for the unprofiled figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

PHASES = ("env", "observations", "acting", "truncation bootstraps", "storage", "episodes",
          "rest of the rollout", "GAE", "update: forward", "update: backward",
          "update: clip + optimizer", "update: rest")


class Stopwatch:
    """Seconds per phase, accumulated over wrapped calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
                self.calls[phase] += 1
        return timed

    @contextmanager
    def patched(self, owner, name: str, phase: str, replacement=None):
        """``owner.name`` timed as ``phase`` (``replacement``, if given, timed in its place)
        for as long as the block runs."""
        original = getattr(owner, name)
        setattr(owner, name, self.wrap(phase, replacement or original))
        try:
            yield
        finally:
            setattr(owner, name, original)


def profile(preset: str, overrides: dict, updates: int, threads: int) -> tuple[dict, float, int]:
    """Run ``updates`` timed iterations; returns (seconds per phase, total seconds, steps)."""
    from contextlib import ExitStack

    import torch

    import trxl_rl.envs as envs_module
    import trxl_rl.train as train_module
    from benchmarks.run import training_pieces
    from trxl_rl.agents import continuous_actions
    from trxl_rl.config import build_config, preset_path, read_yaml
    from trxl_rl.train import EpisodeLog, iteration

    torch.set_num_threads(threads)
    cfg = build_config(read_yaml(preset_path(preset)), {**overrides, "device": "cpu"})
    device = torch.device("cpu")
    envs, agent, optimizer, rollout, carry, shuffle = training_pieces(cfg, device, seed=0)
    steps = updates * cfg.env.num_envs * cfg.ppo.rollout_steps

    entropy_coef = cfg.ppo.initial_entropy_coef(continuous_actions(envs.single_action_space))

    def run_iteration(carry):
        return iteration(agent, optimizer, envs, rollout, carry, cfg.ppo, entropy_coef,
                         shuffle, EpisodeLog(), device)[0]

    carry = run_iteration(carry)  # warm-up
    watch = Stopwatch()
    collect = train_module.collect

    def collect_timing_values(agent_, *args, **kwargs):
        # agent.value inside the rollout is a truncation bootstrap; outside it, GAE's.
        with watch.patched(agent_, "value", "truncation bootstraps"):
            return collect(agent_, *args, **kwargs)

    with ExitStack() as stack:
        for owner, name, phase in (
                (envs, "step", "env"), (train_module, "obs_to_tensor", "observations"),
                (agent, "act", "acting"), (rollout, "add", "storage"),
                (rollout, "add_outcome", "storage"),
                (envs_module, "completed_episodes", "episodes"),
                (envs_module, "final_observations", "truncation bootstraps"),
                (train_module, "ppo_update", "update"), (agent, "evaluate", "forward"),
                (agent, "evaluate_with_reconstruction", "forward"),
                (torch.Tensor, "backward", "update: backward"),
                (torch.nn.utils, "clip_grad_norm_", "update: clip + optimizer"),
                (optimizer, "step", "update: clip + optimizer")):
            stack.enter_context(watch.patched(owner, name, phase))
        stack.enter_context(watch.patched(train_module, "collect", "rollout",
                                          collect_timing_values))
        start = time.perf_counter()
        for _ in range(updates):
            carry = run_iteration(carry)
        total = time.perf_counter() - start
    envs.close()
    return split(watch, total), total, steps


def split(watch: Stopwatch, total: float) -> dict[str, float]:
    """Per-phase seconds from the stopwatches, nested calls taken out of their callers."""
    s = dict(watch.seconds)
    rollout_inner = sum(s.get(k, 0.0) for k in ("env", "observations", "acting",
                                                 "truncation bootstraps", "storage",
                                                 "episodes"))
    update_inner = sum(s.get(k, 0.0) for k in ("forward", "update: backward",
                                                "update: clip + optimizer"))
    phases = {
        **{k: s.get(k, 0.0) for k in ("env", "observations", "acting", "truncation bootstraps",
                                       "storage", "episodes")},
        "rest of the rollout": s.get("rollout", 0.0) - rollout_inner,
        "update: forward": s.get("forward", 0.0),
        "update: backward": s.get("update: backward", 0.0),
        "update: clip + optimizer": s.get("update: clip + optimizer", 0.0),
        "update: rest": s.get("update", 0.0) - update_inner,
    }
    phases["GAE"] = total - sum(phases.values())  # the last value and compute_returns
    return phases


def table(phases: dict[str, float], total: float, steps: int) -> str:
    lines = ["| phase | seconds | share | µs per env step |", "|---|--:|--:|--:|"]
    for name in PHASES:
        sec = phases[name]
        lines.append(f"| {name} | {sec:.3f} | {sec / total:.1%} | {1e6 * sec / steps:.1f} |")
    lines.append(f"| **iteration** | {total:.3f} | 100% | {1e6 * total / steps:.1f} |")
    return "\n".join(lines) + f"\n\n{steps:,} steps in {total:.2f} s: {steps / total:,.0f} steps/s"


def parse_set(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_iteration",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="MiniGrid-Memory")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. ppo.epochs=4 model.backbone=gru")
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    phases, total, steps = profile(args.preset, parse_set(args.set), args.updates, args.threads)
    print(f"{args.preset} {' '.join(args.set)}, {args.threads} thread(s), "
          f"{args.updates} iterations\n")
    print(table(phases, total, steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
