"""End-to-end training throughput and memory of trxl_rl, as a markdown table and JSON.

    python -m benchmarks.run                 # everything (about 10 minutes on 2 cores)
    python -m benchmarks.run --quick         # fewer updates, no 1024-token memory
    python -m benchmarks.run --only a b      # some rows (names in the first column)
    python -m benchmarks.run --device cuda   # on a GPU (adds CUDA max allocated)
    python -m benchmarks.run --repeat 3 --only a a-nocache   # interleaved rounds, medians

Every row runs in a fresh subprocess (so peak RSS is that configuration's own) and times
real training iterations built from the trainer's own pieces (vector env, agent, rollout
collection, GAE, PPO update), after one warm-up iteration that is not counted:

- SPS: environment steps per second of whole iterations (rollout + update);
- env / inference / update: the share of that time spent in ``envs.step``, in the rest of
  the rollout (agent inference, storage, bootstrap values) and in the PPO update;
- vs: SPS as a ratio to another row of the same run (the row a variant or a scaling row
  changes one thing from);
- peak RSS of the process; on CUDA also ``torch.cuda.max_memory_allocated``.

Rows: ``env``, the preset's vector env alone with random actions (the ceiling for a trainer
that steps its envs in its own process, and a gauge of how fast the host is at the moment:
on a shared host every row moves with it); (a) the MiniGrid-Memory preset, then the same
with 8 epochs, with the larger 2 x 128 model and without the key/value cache of rollout
inference (``a-nocache``: every step re-projects the whole memory), then the preset with each
other memory backbone (``gtrxl``, ``gru``, ``lstm``, ``none``); (b) the published-pixel
configuration (84x84 RGB, Nature CNN, 2 x 256, 4 heads, M=64, 16 envs x 256 steps, 3 epochs
x 8 minibatches),
then the same with the CNN run once per distinct image and on every image (``b`` itself
dedupes on a CPU and not on a GPU: it duplicates ``b-dedupe`` on one, ``b-nodedupe`` on the
other), with the auxiliary observation-reconstruction loss that the MiniGrid-Memory-RGB
preset added to learn S9 until 2026-12-06 (``b-recon``), and the preset as shipped
(``b-preset``: the symbolic preset's 1 x 64 agent after a Nature CNN with a max over
positions);
(c) a long memory (M=256, 3 layers x 384, 32 envs x 512 steps, CueRecall with 2,001-step
episodes), with and without the key/value cache; then scaling in M (16 -> 1024) and in
episode length (100 -> 10,000 steps), and an endless episode (100,000 steps, no episode end)
whose RSS is sampled after every update.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

MINIGRID = {"preset": "MiniGrid-Memory"}
CUE = {"env.id": "trxl_rl/CueRecall-v0", "model.encoder_dim": 64}
# (b): the published TrXL-PPO configuration on the RGB preset's env (the preset's own model
# is smaller: row b-preset).
PUBLISHED_PIXELS = {
    "model.encoder_dim": None, "model.encoder_max_pool": False, "model.trxl.dim": 256,
    "model.trxl.num_layers": 2, "model.trxl.num_heads": 4, "model.trxl.memory_length": 64,
    "ppo.epochs": 3, "ppo.minibatches": 8, "ppo.reconstruction_coef": 0.0,
    "ppo.rollback_kl": None}
PIXELS = {"preset": "MiniGrid-Memory-RGB", "overrides": PUBLISHED_PIXELS}


def rows(quick: bool) -> list[dict]:
    """The benchmark rows: name, preset, overrides, number of timed updates, and the row whose
    SPS this one is compared with (``base``, as a ratio in the table)."""
    n = 1 if quick else 3
    out = [
        {"name": "env", "what": "the preset's 16 envs alone, random actions (the ceiling)",
         **MINIGRID, "env_only": True, "updates": 10 if quick else 40},
        {"name": "a", "what": "MiniGrid-Memory preset (symbolic, 1 x 64, 6 epochs x 8 mb)",
         **MINIGRID, "updates": n},
        {"name": "a8", "what": "the same with 8 epochs", **MINIGRID, "updates": n,
         "base": "a", "overrides": {"ppo.epochs": 8}},
        {"name": "a2x128", "what": "the same with 2 layers x 128, encoder 256", **MINIGRID,
         "updates": n, "base": "a", "overrides": {"model.trxl.num_layers": 2,
                                                  "model.trxl.dim": 128,
                                                  "model.encoder_dim": 256}},
        {"name": "a-seg64", "what": "the same with segments of 64 (= M) instead of 32",
         **MINIGRID, "updates": n, "base": "a", "overrides": {"ppo.segment_length": 64}},
        {"name": "a-nocache", "what": "preset, no key/value cache in rollout inference",
         **MINIGRID, "updates": n, "base": "a", "state": {"kv_cache": False}},
    ]
    # The other memory backbones on the preset (their sections in configs/minigrid_memory.yaml).
    out += [{"name": name, "what": f"preset with backbone {name}", **MINIGRID, "updates": n,
             "base": "a", "overrides": {"model.backbone": name}}
            for name in ("gtrxl", "gru", "lstm", "none")]
    long_memory = {
        **CUE, "env.kwargs": {"delay": 2000}, "env.num_envs": 32,
        "model.trxl.memory_length": 256, "model.trxl.num_layers": 3, "model.trxl.dim": 384,
        "model.trxl.num_heads": 6, "ppo.rollout_steps": 512, "ppo.segment_length": 64,
        "ppo.epochs": 4, "ppo.minibatches": 8}
    out += [
        {"name": "b", "what": "published-pixel config (84x84 RGB)", **PIXELS, "updates": 1},
        {"name": "b-dedupe", "what": "the same, CNN once per distinct image (dedupe on)",
         "preset": PIXELS["preset"], "updates": 1, "base": "b",
         "overrides": {**PIXELS["overrides"], "model.encoder_dedupe": True}},
        {"name": "b-nodedupe", "what": "the same, CNN on every image (dedupe off)",
         "preset": PIXELS["preset"], "updates": 1, "base": "b",
         "overrides": {**PIXELS["overrides"], "model.encoder_dedupe": False}},
        {"name": "b-recon", "what": "b + reconstruction loss (the RGB preset to 2026-12-06)",
         "preset": PIXELS["preset"], "updates": 1, "base": "b",
         "overrides": {**PIXELS["overrides"], "ppo.reconstruction_coef": 1.0}},
        {"name": "b-preset", "what": "the MiniGrid-Memory-RGB preset (1 x 64, max-pool CNN)",
         "preset": PIXELS["preset"], "updates": 1, "base": "b"},
        {"name": "c", "what": "long memory: M=256, 3x384, 32x512, 2,001-step episodes, 4 epochs",
         "preset": "MiniGrid-Memory", "updates": 1, "overrides": long_memory},
        {"name": "c-nocache", "what": "the same, no key/value cache in rollout inference",
         "preset": "MiniGrid-Memory", "updates": 1, "base": "c", "overrides": long_memory,
         "state": {"kv_cache": False}},
    ]
    # Scaling: one thing changed at a time from the preset.
    for m in (16, 64, 256) + (() if quick else (1024,)):
        out.append({"name": f"M{m}", "what": f"preset, memory_length {m}", **MINIGRID,
                    "updates": 1, "base": "M64", "overrides": {"model.trxl.memory_length": m}})
    for delay in (99, 999, 9999):
        out.append({"name": f"ep{delay + 1}", "what": f"CueRecall, {delay + 1}-step episodes",
                    **MINIGRID, "updates": 1, "base": "ep100",
                    "overrides": {**CUE, "env.kwargs": {"delay": delay}}})
    # One env, 4,096-step rollouts: 25 iterations = 102,400 steps of a single episode.
    out.append({"name": "endless", "what": "CueRecall, 1 env, no episode end in 100k steps",
                **MINIGRID, "updates": 3 if quick else 24, "rss_trace": True,
                "overrides": {**CUE, "env.kwargs": {"delay": 10_000_000},
                              "env.num_envs": 1, "ppo.rollout_steps": 4096}})
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(spec: dict, device: str, threads: int | None, ranks=None) -> dict:
    """Run one row in this process (one rank of a data-parallel run of ``ranks``, a
    :class:`trxl_rl.distributed.Ranks`, as the trainer runs it: its own envs, gradients and
    statistics reduced over the ranks); returns its measurements, SPS counting all ranks."""
    import numpy as np
    import torch

    from trxl_rl.agents import continuous_actions
    from trxl_rl.config import build_config, preset_path, read_yaml, resolve_device
    from trxl_rl.distributed import Ranks
    from trxl_rl.train import EpisodeLog, iteration, reduction

    ranks = ranks or Ranks()
    if threads:
        torch.set_num_threads(threads)
    cfg = build_config(read_yaml(preset_path(spec["preset"])),
                       {**spec.get("overrides", {}), "device": device})
    if spec.get("env_only"):
        return measure_envs(cfg, spec["updates"])
    dev = ranks.device(resolve_device(cfg.device))
    b, t = cfg.env.num_envs, cfg.ppo.rollout_steps
    seed = ranks.rank * b  # rank r's seed as the trainer makes it (seed + r * num_envs), seed 0
    envs, agent, optimizer, rollout, carry, shuffle = training_pieces(
        cfg, dev, seed, spec.get("state", {}))
    ranks.broadcast_parameters(agent)
    entropy_coef = cfg.ppo.initial_entropy_coef(continuous_actions(envs.single_action_space))
    totals = {"env": 0.0, "inference": 0.0, "update": 0.0}
    rss_trace, kl = [], []
    for i in range(spec["updates"] + 1):
        carry, stats = iteration(agent, optimizer, envs, rollout, carry, cfg.ppo,
                                 entropy_coef, shuffle, EpisodeLog(), dev, ranks)
        stats = ranks.reduce_scalars(stats, {key: reduction(key) for key in stats})
        kl.append(stats["losses/first_minibatch_approx_kl"])
        if spec.get("rss_trace"):
            rss_trace.append(round(current_rss_mib(), 1))
        if i == 0:
            continue  # warm-up
        totals["env"] += stats["charts/env_seconds"]
        totals["inference"] += stats["charts/rollout_seconds"] - stats["charts/env_seconds"]
        totals["update"] += stats["charts/update_seconds"]
    envs.close()
    seconds = sum(totals.values())
    steps = spec["updates"] * b * t * ranks.world_size
    result = {
        "sps": steps / seconds,
        "share": {k: v / seconds for k, v in totals.items()},
        "peak_rss_mib": peak_rss_mib(),
        "max_abs_first_minibatch_kl": float(np.max(np.abs(kl))),
        "steps_timed": steps,
    }
    if "position" in rollout.records:  # Transformer-XL backbones record each step's position
        result["episode_steps_seen"] = int(rollout.records["position"].max()) + 1
    if dev.type == "cuda":
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if rss_trace:
        result["rss_trace_mib"] = rss_trace
    return result


def training_pieces(cfg, device, seed: int, state_options: dict | None = None) -> tuple:
    """The trainer's own pieces for ``cfg`` on ``device``, seeded with ``seed``: (vector env,
    agent, optimizer, rollout, carry into the first iteration, minibatch shuffle generator).
    ``state_options`` go to ``agent.initial_state`` (e.g. ``kv_cache``)."""
    import torch

    from trxl_rl.agents import action_dtype, action_shape, build_agent
    from trxl_rl.envs import make_vector_env
    from trxl_rl.rollout import Rollout
    from trxl_rl.train import Carry, make_optimizer

    b, t = cfg.env.num_envs, cfg.ppo.rollout_steps
    torch.manual_seed(seed)
    envs = make_vector_env(cfg.env.id, b, cfg.env.vectorization, replay=True, **cfg.env.kwargs)
    space, act = envs.single_observation_space, envs.single_action_space
    agent = build_agent(cfg, space, act).to(device)
    optimizer = make_optimizer(cfg, agent)
    rollout = Rollout(t, b, space, action_shape(act), action_dtype(act), agent.memory, device)
    state = agent.initial_state(b, device=device, **(state_options or {}))
    carry = Carry(envs.reset(seed=seed)[0], state,
                  torch.ones(b, dtype=torch.bool, device=device))
    return envs, agent, optimizer, rollout, carry, torch.Generator().manual_seed(seed)


def measure_envs(cfg, rollouts: int) -> dict:
    """SPS of the configuration's vector env alone with random actions: the trainer's ceiling
    on this machine at this moment (it scales with how busy the host is, as the rows do)."""
    import time

    from trxl_rl.envs import make_vector_env

    envs = make_vector_env(cfg.env.id, cfg.env.num_envs, cfg.env.vectorization,
                           **cfg.env.kwargs)
    envs.reset(seed=0)
    envs.action_space.seed(0)
    steps = rollouts * cfg.ppo.rollout_steps
    start = time.perf_counter()
    for _ in range(steps):
        envs.step(envs.action_space.sample())
    seconds = time.perf_counter() - start
    envs.close()
    return {"sps": steps * cfg.env.num_envs / seconds,
            "share": {"env": 1.0, "inference": 0.0, "update": 0.0},
            "peak_rss_mib": peak_rss_mib(), "steps_timed": steps * cfg.env.num_envs}


def machine(device: str, threads: int | None) -> str:
    import torch

    if threads:
        torch.set_num_threads(threads)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if device == "cuda" else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), device {device}{gpu}")


def table(results: list[dict]) -> str:
    lines = ["| row | configuration | SPS | vs | env / inference / update | peak RSS MiB | "
             "CUDA max alloc MiB | first-minibatch KL |",
             "|---|---|--:|--:|---|--:|--:|--:|"]
    sps = {r["name"]: r["sps"] for r in results if "sps" in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['what']} | failed: {r['error']} | | | | | |")
            continue
        share = r["share"]
        cuda = f"{r['cuda_max_allocated_mib']:,.0f}" if "cuda_max_allocated_mib" in r else "-"
        kl = f"{r['max_abs_first_minibatch_kl']:.1e}" if "max_abs_first_minibatch_kl" in r \
            else "-"
        base = r.get("base")
        if "vs" in r:  # the median of the paired ratios of --repeat rounds
            ratio = f"{r['vs']:.2f}x {base}"
        elif base in sps and base != r["name"]:
            ratio = f"{r['sps'] / sps[base]:.2f}x {base}"
        else:
            ratio = ""
        lines.append(
            f"| {r['name']} | {r['what']} | {r['sps']:,.0f} | {ratio} | {share['env']:.0%} / "
            f"{share['inference']:.0%} / {share['update']:.0%} | {r['peak_rss_mib']:,.0f} | "
            f"{cuda} | {kl} |")
    for r in results:
        if "rss_trace_mib" in r:
            trace = r["rss_trace_mib"]
            lines.append(f"\n`{r['name']}`: RSS after each update (MiB), "
                         f"{r['episode_steps_seen']:,} steps into one episode: "
                         f"{trace[0]} -> {trace[-1]} (min {min(trace)}, max {max(trace)})")
    return "\n".join(lines)


def combine(rounds: list[list[dict]]) -> list[dict]:
    """One result per row from interleaved rounds: the round with the median SPS, plus
    ``sps_rounds`` and ``vs`` (the median over rounds of the SPS ratio to the base row of the
    same round: the host's speed drifts between rounds, much less within one)."""
    if len(rounds) == 1:
        return rounds[0]
    combined = []
    for i, first in enumerate(rounds[0]):
        runs = [r[i] for r in rounds if "sps" in r[i]]
        if not runs:
            combined.append(first)
            continue
        runs_by_sps = sorted(runs, key=lambda r: r["sps"])
        row = dict(runs_by_sps[len(runs_by_sps) // 2])
        row["sps_rounds"] = [r["sps"] for r in runs]
        base = next((j for j, r in enumerate(rounds[0]) if r["name"] == first.get("base")), None)
        if base is not None and base != i:
            ratios = sorted(r[i]["sps"] / r[base]["sps"] for r in rounds
                            if "sps" in r[i] and "sps" in r[base])
            if ratios:
                row["vs"] = ratios[len(ratios) // 2]
        combined.append(row)
    return combined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", help="row names to run")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the rows R times, interleaved; report the median SPS of each "
                             "row and the median of its ratios to its base row within a round")
    parser.add_argument("--json", default="benchmarks/out/results.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row
    args = parser.parse_args(argv)

    if args.one:  # one row, in this process or on every rank that torchrun started
        from trxl_rl.distributed import Ranks

        ranks = Ranks.from_environment().start()
        try:
            result = measure(json.loads(args.one), args.device, args.threads, ranks)
        finally:
            ranks.close()
        if ranks.main:
            print(json.dumps(result))
        return 0

    specs = [spec for spec in rows(args.quick) if not args.only or spec["name"] in args.only]
    rounds = []
    for _ in range(max(1, args.repeat)):
        rounds.append([])
        for spec in specs:
            cmd = [sys.executable, "-m", "benchmarks.run", "--one", json.dumps(spec),
                   "--device", args.device]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                result = {"error": tail[:120]}
            else:
                result = json.loads(proc.stdout.strip().splitlines()[-1])
            rounds[-1].append({"name": spec["name"], "what": spec["what"],
                               "base": spec.get("base"), **result})
            print(f"{spec['name']}: {json.dumps(result)}", file=sys.stderr, flush=True)
    report(f"Machine: {machine(args.device, args.threads)}", combine(rounds), Path(args.json))
    return 0


def report(header: str, results: list[dict], path: Path, as_table=table) -> None:
    """Print the machine line and ``as_table(results)``; write both as JSON to ``path``."""
    print(header + "\n")
    print(as_table(results))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": header, "rows": results}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
