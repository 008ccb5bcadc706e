"""Cost of one ``TransformerXL.step`` deep into an episode, with and without the key/value cache.

What is measured: wall-clock microseconds per ``model.step(x, state, episode_start)`` call,
``x`` ``[B, input_dim]``, no episode start, under ``torch.no_grad()``, model in eval mode,
float32, for every batch size B, memory length M and episode step t of the sweep.

"At episode step t" means the state has already taken t tokens of the current episode. The
state is brought there by feeding random tokens through segment calls (``WARMUP_CHUNK`` tokens
each, which is the same function as t single steps and much cheaper), once for the largest B;
smaller batches are the first rows of that state (``state[rows]``, a copy). Every timed call
starts from that same state and drops the state it returns, so each call is the step taken at
exactly t. The claim under test is that this cost does not grow with t: the window is M tokens.

Two variants run on the same state:

- cached (``initial_state(kv_cache=True)``): the memory's projected keys/values are reused;
  a step projects one token and attends over M cached keys, O(B * M * D) plus O(B * D^2).
- no-cache (``kv_cache=False``): every step re-projects all M memory slots, O(B * M * D^2).

Each variant of each cell is warmed up, then timed in ``--repeats`` blocks of back-to-back calls
(as many as fill about ``--block-seconds``) with ``time.perf_counter`` (after
``torch.cuda.synchronize()`` on a GPU); the median block is reported. For one (B, M) the blocks
of all episode steps and both variants take turns, round by round, so that they share the same
load from other processes and the same allocator state (on CPU, a step that allocates tens of MB
can take three times as long while glibc malloc returns those buffers to the OS after every
step). A second table divides
the cached cost by M and fits ``a + b * M`` per batch size: ``a`` is the per-step cost that does
not depend on the memory (projections of the new token, feed-forward, Python and dispatch
overhead), ``b`` the cost per memory slot.

Rerun from the repository root (the full sweep takes about a minute on 2 idle CPU cores, and
several when other processes compete for them)::

    python -m benchmarks.memory_step                    # full sweep, CPU, torch's default threads
    python -m benchmarks.memory_step --quick            # smaller sweep
    python -m benchmarks.memory_step --threads 1 --json step_cpu1.json
    python -m benchmarks.memory_step --device cuda
    python -m benchmarks.memory_step --dim 256 --layers 4 --heads 8 --encoding none
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch
from torch import Tensor

from trxl_rl.memory import POSITIONAL_ENCODINGS, MemoryState, TransformerXL, TrXLConfig

WARMUP_CHUNK = 64  # tokens per segment call when advancing a state to episode step t

FULL_SWEEP = dict(batch_sizes=[16, 64], memory_lengths=[16, 64, 256],
                  episode_steps=[10, 1_000, 10_000], repeats=7, block_seconds=0.1)
QUICK_SWEEP = dict(batch_sizes=[16], memory_lengths=[16, 64], episode_steps=[10, 1_000],
                   repeats=3, block_seconds=0.05)


@dataclass
class Cell:
    """Median microseconds per ``step`` for one (B, M, t)."""

    batch_size: int
    memory_length: int
    episode_step: int
    cached_us: float
    uncached_us: float
    cached_blocks_us: list[float]
    uncached_blocks_us: list[float]
    cached_page_faults: float | None  # minor page faults per step during the timed blocks
    uncached_page_faults: float | None

    @property
    def ratio(self) -> float:
        """no-cache / cached."""
        return self.uncached_us / self.cached_us


@dataclass
class Timing:
    """The timed blocks of one state."""

    blocks_us: list[float]  # microseconds per step, one per block
    page_faults: float | None  # minor page faults per step over all blocks


def machine_info(device: torch.device) -> dict[str, object]:
    """What the numbers were measured on."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model_name()
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "load_average_before": _load_average(),
    }


def _load_average() -> float | None:
    """1-minute load average; other processes on the same cores inflate the times."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _cpu_model_name() -> str:
    """``platform.processor()`` is often just the architecture on Linux; /proc/cpuinfo names it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def advance(model: TransformerXL, state: MemoryState, steps: int) -> MemoryState:
    """``state`` after ``steps`` more random tokens of the same episode (no episode starts)."""
    b, device = state.batch_size, state.hidden.device
    while steps > 0:
        n = min(WARMUP_CHUNK, steps)
        x = torch.randn(b, n, model.config.input_dim, device=device)  # [B, n, input_dim]
        _, state = model(x, state, torch.zeros(b, n, dtype=torch.bool, device=device))
        steps -= n
    return state


def without_cache(state: MemoryState) -> MemoryState:
    """The same memory as a ``kv_cache=False`` state: what ``initial_state(kv_cache=False)``
    would hold after the same tokens."""
    return MemoryState(hidden=state.hidden, valid=state.valid, position=state.position,
                       use_cache=False)


def _minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def _seconds_per_call(model: TransformerXL, x: Tensor, state: MemoryState,
                      episode_start: Tensor, calls: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        model.step(x, state, episode_start)
    sync()
    return (time.perf_counter() - start) / calls


def time_steps(model: TransformerXL, states: dict[tuple[int, bool], MemoryState], repeats: int,
               block_seconds: float, sync: Callable[[], None]
               ) -> dict[tuple[int, bool], Timing]:
    """Time ``step`` from each of ``states`` (all with the same B).

    Each state is warmed up for about half a block, which also sizes its blocks; then come
    ``repeats`` rounds of one block per state, so that load from other processes and the
    allocator's state (which decides whether big buffers are fresh pages) are shared alike.
    """
    first = next(iter(states.values()))
    b, device = first.batch_size, first.hidden.device
    x = torch.randn(b, model.config.input_dim, device=device)  # [B, input_dim]
    episode_start = torch.zeros(b, dtype=torch.bool, device=device)  # [B]
    calls = {}
    for key, state in states.items():
        n, rounds = 1, 0
        while True:
            per_call = _seconds_per_call(model, x, state, episode_start, n, sync)
            rounds += 1
            if rounds >= 2 and n * per_call >= block_seconds / 2:
                break
            n *= 2
        calls[key] = max(1, math.ceil(block_seconds / per_call))
    timings = {key: Timing([], 0.0 if resource else None) for key in states}
    for _ in range(repeats):
        for key, state in states.items():
            faults = _minor_page_faults()
            seconds = _seconds_per_call(model, x, state, episode_start, calls[key], sync)
            timing = timings[key]
            timing.blocks_us.append(1e6 * seconds)
            if timing.page_faults is not None:
                timing.page_faults += (_minor_page_faults() - faults) / (calls[key] * repeats)
    return timings


def run_sweep(args: argparse.Namespace, device: torch.device) -> list[Cell]:
    """Time every (B, M, t) of the sweep, cached and not; progress goes to stderr.

    Per M, one state of the largest B is advanced through all episode steps (keeping a
    snapshot at each); per B, all episode steps and both variants are then timed together.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cells = []
    with torch.no_grad():
        for m in args.memory_lengths:
            torch.manual_seed(args.seed)
            config = TrXLConfig(input_dim=args.input_dim, dim=args.dim,
                                num_layers=args.layers, num_heads=args.heads,
                                memory_length=m, positional_encoding=args.encoding)
            model = TransformerXL(config).to(device).eval()
            state, reached = model.initial_state(max(args.batch_sizes), kv_cache=True), 0
            snapshots = {}
            for t in args.episode_steps:
                state, reached = advance(model, state, t - reached), t
                if state.keys is None or state.cache_tag != model.weights_tag():
                    raise RuntimeError("the cached state would rebuild its cache at every step")
                snapshots[t] = state
            for b in args.batch_sizes:
                rows = torch.arange(b, device=device)
                states = {}  # (episode step, kv cache on) -> state
                for t, snapshot in snapshots.items():
                    states[t, True] = snapshot[rows]  # a copy of the first b rows
                    states[t, False] = without_cache(states[t, True])
                timings = time_steps(model, states, args.repeats, args.block_seconds, sync)
                for t in snapshots:
                    cached, uncached = timings[t, True], timings[t, False]
                    cells.append(Cell(b, m, t, statistics.median(cached.blocks_us),
                                      statistics.median(uncached.blocks_us), cached.blocks_us,
                                      uncached.blocks_us, cached.page_faults,
                                      uncached.page_faults))
                    print(f"B={b} M={m} t={t}: cached {cells[-1].cached_us:.0f} µs, no-cache "
                          f"{cells[-1].uncached_us:.0f} µs", file=sys.stderr, flush=True)
    return sorted(cells, key=lambda c: (c.batch_size, c.memory_length, c.episode_step))


def step_table(cells: list[Cell]) -> str:
    """Per-step cost of every cell, cached and not."""
    lines = ["| B | M | episode step | cached µs/step | no-cache µs/step | no-cache / cached |",
             "|--:|--:|--:|--:|--:|--:|"]
    for c in cells:
        lines.append(f"| {c.batch_size} | {c.memory_length} | {c.episode_step:,} | "
                     f"{c.cached_us:,.0f} | {c.uncached_us:,.0f} | {c.ratio:.2f}x |")
    return "\n".join(lines)


def memory_table(cells: list[Cell]) -> str:
    """Cached cost against M: per memory slot, growth, spread over t, page faults."""
    lines = ["| B | M | cached µs/step (median over t) | µs/step / M | x vs previous M "
             "| max/min over t | page faults / step |",
             "|--:|--:|--:|--:|--:|--:|--:|"]
    notes = []
    for b in sorted({c.batch_size for c in cells}):
        ms = sorted({c.memory_length for c in cells if c.batch_size == b})
        costs = []
        for m in ms:
            group = [c for c in cells if (c.batch_size, c.memory_length) == (b, m)]
            over_t = [c.cached_us for c in group]
            costs.append(statistics.median(over_t))
            growth = "" if len(costs) == 1 else \
                f"{costs[-1] / costs[-2]:.2f}x (M x{m / ms[len(costs) - 2]:g})"
            faults = [c.cached_page_faults for c in group if c.cached_page_faults is not None]
            faults_text = f"{statistics.median(faults):,.0f}" if faults else "n/a"
            lines.append(f"| {b} | {m} | {costs[-1]:,.0f} | {costs[-1] / m:,.1f} | {growth} | "
                         f"{max(over_t) / min(over_t):.2f} | {faults_text} |")
        if len(ms) >= 2:
            per_slot = (costs[1] - costs[0]) / (ms[1] - ms[0])
            fixed = costs[0] - per_slot * ms[0]
            if per_slot > 0:
                notes.append(f"- B={b}: from M={ms[0]} to M={ms[1]} each memory slot adds "
                             f"{per_slot:,.2f} µs; the part that does not depend on M, "
                             f"extrapolated to M=0, is {fixed:,.0f} µs ({fixed / costs[0]:.0%} "
                             f"of the step at M={ms[0]})")
            else:
                notes.append(f"- B={b}: no measurable cost per memory slot from M={ms[0]} to "
                             f"M={ms[1]}: the step is work that does not depend on M")
    notes.append("- page faults / step: minor page faults per cached step; thousands mean the "
                 "allocator hands the step's big buffers back to the OS and the time includes "
                 "faulting them in again")
    return "\n".join([*lines, "", *notes])


def report(cells: list[Cell], machine: dict[str, object], args: argparse.Namespace) -> str:
    """The whole markdown output."""
    return "\n".join([
        "## TransformerXL.step: µs per call",
        "",
        f"- machine: processor {machine['processor']}, {machine['cpu_count']} CPUs, "
        f"torch {machine['torch']}, device {machine['device']} ({machine['device_name']}), "
        f"{machine['threads']} torch threads",
        _load_line(machine),
        f"- model: input_dim {args.input_dim}, dim {args.dim}, {args.layers} layers, "
        f"{args.heads} heads, {args.encoding} encoding; float32, eval, torch.no_grad()",
        f"- timing: median of {args.repeats} blocks of ~{args.block_seconds:g} s of back-to-back "
        f"steps (time.perf_counter), blocks of every t and both variants of one (B, M) taking "
        f"turns; state brought to episode step t by segment calls of {WARMUP_CHUNK} tokens, "
        f"no episode starts",
        "",
        step_table(cells),
        "",
        "### Cached cost against memory length M",
        "",
        memory_table(cells),
    ])


def _load_line(machine: dict[str, object]) -> str:
    before, after = machine["load_average_before"], machine["load_average_after"]
    if before is None:
        return "- load average: not available on this platform"
    line = (f"- 1-min load average: {before:.2f} before, {after:.2f} after (this run adds up to "
            f"{machine['threads']})")
    if before >= 0.5:
        line += ("; the CPUs were already busy when it started (perhaps with an earlier run: the "
                 "average lags); competing processes inflate and scatter the times, least so "
                 "with --threads 1")
    return line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory_step",
        description="Microseconds per TransformerXL.step with and without the key/value cache.")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--input-dim", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--encoding", default="relative", choices=POSITIONAL_ENCODINGS)
    parser.add_argument("--batch-sizes", type=int, nargs="+", metavar="B")
    parser.add_argument("--memory-lengths", type=int, nargs="+", metavar="M")
    parser.add_argument("--episode-steps", type=int, nargs="+", metavar="T")
    parser.add_argument("--repeats", type=int, help="timing blocks per variant and cell")
    parser.add_argument("--block-seconds", type=float, help="approximate length of one block")
    parser.add_argument("--quick", action="store_true",
                        help=f"smaller sweep: {QUICK_SWEEP} (explicit options still win)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    for name, default in (QUICK_SWEEP if args.quick else FULL_SWEEP).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if min(args.episode_steps) < 1:
        # A state at step 0 has no cache yet, and it is never kept: every timed call would
        # measure the rebuild.
        parser.error("--episode-steps must be >= 1")
    if min(args.batch_sizes) < 1 or min(args.memory_lengths) < 1 or args.repeats < 1:
        parser.error("--batch-sizes, --memory-lengths and --repeats must be >= 1")
    args.episode_steps = sorted(set(args.episode_steps))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_info(device)
    cells = run_sweep(args, device)
    machine["load_average_after"] = _load_average()
    print(report(cells, machine, args))
    if args.json:
        results = [asdict(c) | {"ratio": c.ratio} for c in cells]
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
