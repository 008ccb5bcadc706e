"""Steps/s of an exported policy (onnxruntime, TorchScript) against ``load_agent`` on CPU.

    python -m benchmarks.export_speed                  # the table (about 3 minutes)
    python -m benchmarks.export_speed --json out.json  # and the rows as JSON

What one row times: a policy step of B environments with sampled actions, the memory fed
back every step, after a warm-up; no environment. ``load_agent`` is the trainer's acting
path (``agent.act``: Transformer-XL keys/values of the memory cached between steps);
the exported step is the one ``python -m trxl_rl.export`` writes (no cache: every step
projects the whole memory again, as a pure function of its inputs must), called as
``examples/run_exported_policy.py`` calls it, actions drawn in numpy. One thread each (torch
and onnxruntime). Every row runs in its own process, so its peak RSS is its own: the
``onnx`` row imports neither torch nor trxl_rl, as a deployment would not. The agents
are freshly initialised (weights do not change the work): the MiniGrid-Memory preset with
its Transformer-XL (1 x 64, M = 64) and with the GRU, and the published-pixel configuration
(84x84 RGB, 2 x 256, M = 64: row ``b`` of ``benchmarks.run``).

Rows: steps/s = B x calls/s; ``vs`` = the ratio to ``load_agent`` of the same model and B.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.run import PIXELS

MODELS = {
    "preset-trxl": {"preset": "MiniGrid-Memory", "overrides": {}},
    "preset-gru": {"preset": "MiniGrid-Memory", "overrides": {"model.backbone": "gru"}},
    "pixels-trxl": PIXELS,  # the published configuration, as benchmarks.run's row b
}
RUNTIMES = ("load_agent", "torchscript", "onnx")
BATCHES = (1, 16)


def make_checkpoint(model: str, path: Path) -> Path:
    """A checkpoint of a freshly initialised agent of ``model``."""
    import torch

    from trxl_rl.agents import build_agent
    from trxl_rl.checkpoint import save_checkpoint, space_to_dict
    from trxl_rl.config import build_config, config_to_dict, preset_path, read_yaml
    from trxl_rl.envs import make_env

    spec = MODELS[model]
    cfg = build_config(read_yaml(preset_path(spec["preset"])), spec["overrides"])
    env = make_env(cfg.env.id, **cfg.env.kwargs)
    torch.manual_seed(0)
    agent = build_agent(cfg, env.observation_space, env.action_space)
    return save_checkpoint(path, {
        "model": agent.state_dict(), "config": config_to_dict(cfg),
        "spaces": {"observation": space_to_dict(env.observation_space),
                   "action": space_to_dict(env.action_space)},
        "counters": {"global_step": 0, "update": 0},
    })


def time_calls(call, seconds: float) -> float:
    """Calls per second of ``call()`` over about ``seconds`` (after 20 warm-up calls)."""
    for _ in range(20):
        call()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            call()
        calls += 20
    return calls / (time.perf_counter() - start)


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``: unlike ``ru_maxrss``, which Linux
    carries over from the parent through fork and exec, it starts anew at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def save_observations(obs, path: Path) -> None:
    """A batch (array or nested dict of arrays) as ``.npz``, keyed by the exported step's
    input names (``obs``, ``obs.<key>``...)."""
    def flat(value, name):
        if isinstance(value, dict):
            return {k: v for key, sub in value.items()
                    for k, v in flat(sub, f"{name}.{key}").items()}
        return {name: value}
    np.savez(path, **flat(obs, "obs"))


def measure(checkpoint: str, exported: str, runtime: str, observations: str,
            seconds: float) -> dict:
    """One row, in this process (``--child``). Only the ``load_agent`` and ``torchscript``
    rows import torch; the ``onnx`` row runs what a deployment without torch would."""
    arrays = dict(np.load(observations))
    batch = len(next(iter(arrays.values())))
    if runtime == "load_agent":
        import torch

        torch.set_num_threads(1)
        from trxl_rl import load_agent

        agent = load_agent(checkpoint)
        obs = torch.from_numpy(arrays["obs"]) if "obs" in arrays else {}
        for name, value in arrays.items():
            if name != "obs":  # obs.<key>.<key>: a (nested) Dict space
                *keys, last = name.split(".")[1:]
                node = obs
                for key in keys:
                    node = node.setdefault(key, {})
                node[last] = torch.from_numpy(value)
        box = {"state": agent.initial_state(batch)}
        starts = torch.zeros(batch, dtype=torch.bool)

        def call():
            box["state"] = agent.act(obs, box["state"], starts).state
    else:
        if runtime == "torchscript":
            import torch

            torch.set_num_threads(1)
        sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
        import run_exported_policy as ex

        policy, spec = ex.load_policy(exported, threads=1)
        rng = np.random.default_rng(0)
        box = {"memory": ex.initial_memory(spec, batch)}
        starts = np.zeros(batch, dtype=bool)

        def call():
            outputs, box["memory"] = ex.step(policy, spec, arrays, box["memory"], starts)
            ex.sample_action(spec, outputs, rng)
    calls = time_calls(call, seconds)
    return {"calls_per_s": calls, "steps_per_s": calls * batch,
            "peak_rss_mib": peak_rss_mib(),
            "torch_imported": "torch" in sys.modules}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per row")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", nargs=4, metavar=("CKPT", "EXPORTED", "RUNTIME", "OBS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args.seconds)))
        return 0

    from trxl_rl import load_agent
    from trxl_rl.export import export_policy, sample_observations

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            checkpoint = make_checkpoint(model, Path(tmp) / f"{model}.pt")
            files = {"torchscript": Path(tmp) / f"{model}.ts.pt",
                     "onnx": Path(tmp) / f"{model}.onnx"}
            for fmt, path in files.items():
                export_policy(checkpoint, path, fmt)
            space = load_agent(checkpoint).observation_space
            for batch in BATCHES:
                observations = Path(tmp) / f"{model}-{batch}.npz"
                save_observations(sample_observations(space, batch, np.random.default_rng(0)),
                                  observations)
                base = None
                for runtime in RUNTIMES:
                    exported = str(files.get(runtime, "-"))
                    done = subprocess.run(
                        [sys.executable, "-m", "benchmarks.export_speed", "--seconds",
                         str(args.seconds), "--child", str(checkpoint), exported, runtime,
                         str(observations)], capture_output=True, text=True, check=True)
                    row = {"model": model, "B": batch, "runtime": runtime,
                           **json.loads(done.stdout.strip().splitlines()[-1])}
                    base = base or row["steps_per_s"]
                    row["vs"] = row["steps_per_s"] / base
                    rows.append(row)
                    print(f"{model:<12} B={batch:<3} {runtime:<12} "
                          f"{row['steps_per_s']:>9,.0f} steps/s", file=sys.stderr)
    print("| model | B | runtime | steps/s | vs load_agent | peak RSS (MiB) |")
    print("|---|--:|---|--:|--:|--:|")
    for row in rows:
        print(f"| {row['model']} | {row['B']} | {row['runtime']} | {row['steps_per_s']:,.0f} | "
              f"{row['vs']:.2f}x | {row['peak_rss_mib']:.0f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
