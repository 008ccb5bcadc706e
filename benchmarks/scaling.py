"""Data-parallel scaling of the trainer: steps/s of the MiniGrid-Memory preset with R ranks
(processes started by torchrun, gloo on CPU, nccl on GPU) of T torch threads each.

    python -m benchmarks.scaling                          # env, 1x2, 1x1, 2x1 (a 2-core machine)
    python -m benchmarks.scaling --rows env 1x1 2x1 4x1 8x1 1x1:cuda   # a GPU machine
    python -m benchmarks.scaling --quick                  # 1 timed update per row, not 3
    python -m benchmarks.scaling --repeat 3               # interleaved rounds, medians

A row ``RxT`` runs R ranks with T threads each on the CPU, ``RxT:cuda`` R ranks with one GPU
each (``cuda:LOCAL_RANK``) and T CPU threads each. Each rank runs the preset as
``benchmarks.run`` row ``a`` does (16 envs x 256 steps per rank, 6 epochs x 8 minibatches, one
warm-up iteration not counted), plus what a data-parallel trainer adds: the all-reduce of the
gradients of every minibatch and of the logged statistics of every update. SPS counts the
steps of all ranks. ``env`` is the preset's 16 envs alone in one process with random actions
(one core's ceiling, and a gauge of how busy the host is). Compare rows of one run, as ratios
(``vs 1x1``): on a shared host every row moves with the load. With ``--repeat R`` the rows run
R times, interleaved; a row shows its median SPS and the median of its ratios to ``1x1``
within a round (as ``benchmarks.run --repeat``).

``--beside`` keeps a second training run of the preset (one torch thread, as the README
advises for a shared machine) busy beside every row, as on a machine where a user trains two
things at once; it is stopped when the rows are done.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from benchmarks.run import combine, machine, report

DEFAULT_ROWS = ["env", "1x2", "1x1", "2x1"]


def parse_row(name: str) -> tuple[int, int, str]:
    """``RxT`` or ``RxT:cuda`` -> (ranks, threads per rank, device)."""
    shape, _, device = name.partition(":")
    ranks, _, threads = shape.partition("x")
    if not (ranks.isdigit() and threads.isdigit() and int(ranks) > 0 and int(threads) > 0) \
            or device not in ("", "cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"row {name!r}: expected env, RxT or RxT:cuda "
                                         "(R ranks of T threads each)")
    return int(ranks), int(threads), device or "cpu"


def run_row(name: str, updates: int) -> dict:
    """Measure one row in fresh processes; returns rank 0's measurements or an error."""
    spec = {"name": name, "preset": "MiniGrid-Memory", "updates": updates}
    if name == "env":
        spec.update(env_only=True, updates=10 * updates)
        ranks, threads, device = 1, 1, "cpu"
    else:
        ranks, threads, device = parse_row(name)
    one = ["-m", "benchmarks.run", "--one", json.dumps(spec), "--device", device,
           "--threads", str(threads)]
    if ranks == 1:
        cmd = [sys.executable, *one]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(ranks), *one]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        return {"error": (errors or proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return {**json.loads(lines[-1]), "ranks": ranks, "threads": threads, "device": device}


@contextmanager
def second_run(active: bool):
    """A training run of the preset in a temporary directory for as long as the block runs."""
    if not active:
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "trxl_rl.train", "--env", "MiniGrid-Memory", "--threads",
               "1", "--total-steps", "100000000", "--progress", "false", "--run-name", "beside"]
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *sys.path])}
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(15)  # past its start-up: training when the first row starts
        try:
            yield
        finally:
            proc.kill()
            proc.wait()


def table(results: list[dict]) -> str:
    lines = ["| row | ranks x threads | device | SPS | vs 1x1 | env / inference / update "
             "(rank 0) | peak RSS MiB (rank 0) | first-minibatch KL |",
             "|---|---|---|--:|--:|---|--:|--:|"]
    base = next((r["sps"] for r in results if r["name"] == "1x1" and "sps" in r), None)
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | | | failed: {r['error']} | | | | |")
            continue
        share = r["share"]
        shape = "1 process, envs only" if r["name"] == "env" else \
            f"{r['ranks']} x {r['threads']}"
        kl = f"{r['max_abs_first_minibatch_kl']:.1e}" if "max_abs_first_minibatch_kl" in r \
            else "-"
        if "vs" in r:  # the median of the ratios within --repeat rounds
            ratio = f"{r['vs']:.2f}x"
        else:
            ratio = f"{r['sps'] / base:.2f}x" if base and r["name"] != "1x1" else ""
        lines.append(
            f"| {r['name']} | {shape} | {r.get('device', 'cpu')} | {r['sps']:,.0f} | {ratio} | "
            f"{share['env']:.0%} / {share['inference']:.0%} / {share['update']:.0%} | "
            f"{r['peak_rss_mib']:,.0f} | {kl} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=DEFAULT_ROWS,
                        help="env, RxT (R CPU ranks of T threads) or RxT:cuda")
    parser.add_argument("--quick", action="store_true", help="1 timed update per row, not 3")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the rows R times, interleaved; medians (see above)")
    parser.add_argument("--beside", action="store_true",
                        help="keep a second training run (1 thread) going beside every row")
    parser.add_argument("--json", default="benchmarks/out/scaling.json")
    args = parser.parse_args(argv)
    for name in args.rows:
        if name != "env":
            try:
                parse_row(name)
            except argparse.ArgumentTypeError as err:
                parser.error(str(err))

    rounds = []
    with second_run(args.beside):
        for _ in range(max(1, args.repeat)):
            rounds.append([])
            for name in args.rows:
                result = {"name": name, "base": None if name == "1x1" else "1x1",
                          **run_row(name, 1 if args.quick else 3)}
                rounds[-1].append(result)
                print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    devices = sorted({parse_row(n)[2] for n in args.rows if n != "env"})
    host = re.sub(r" \(\d+ threads\)", "", machine("cuda" if "cuda" in devices else "cpu", None))
    beside = ", beside a second training run (1 thread)" if args.beside else ""
    report(f"Machine: {host} (threads: per row){beside}", combine(rounds), Path(args.json), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
