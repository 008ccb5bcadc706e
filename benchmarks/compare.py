"""Compare memory backbones on a suite of tasks: training runs, one table, learning curves.

    python -m benchmarks.compare --jobs 2        # the full suite, benchmarks/suite.yaml
    python -m benchmarks.compare --quick         # benchmarks/suite_quick.yaml, under a minute
    python -m benchmarks.compare --tasks CueRecall-16 MiniGrid-S9 --backbones trxl gru --seeds 1
    python -m benchmarks.compare --gtrxl         # also the gated Transformer-XL
    python -m benchmarks.compare --list          # the runs, their state and command; runs nothing
    python -m benchmarks.compare --report-only --docs docs/memory_benchmark

A suite file (YAML, in ``benchmarks/``) names tasks, backbones and seeds; every (task,
backbone, seed) is one training run of the trainer's own CLI in a subprocess,
``python -m trxl_rl.train --env ... --run-name <task>__<backbone>__s<seed> --threads 1``
with ``OMP_NUM_THREADS=1``, ``--jobs`` of them at a time. Everything goes under ``--out``
(default ``benchmarks/compare_out/<suite file name>/``):

- ``runs/<run>/``: the trainer's run directory (TensorBoard scalars, checkpoints,
  ``summary.json``), ``logs/<run>.log``: its output;
- ``results/<run>.json``: the run's result, built from its scalars and ``summary.json``
  (:func:`run_result`);
- ``table.md``, ``table.json``: per task and backbone, over seeds (:func:`aggregate`);
- ``curves/<task>.png``: learning curves, one line per backbone (mean and min-max band over
  seeds), x = environment steps.

Resumable: a run whose result exists is skipped; one with checkpoints but no result is
continued with ``python -m trxl_rl.train --resume`` (the trainer resumes exactly, so an
interrupted suite loses at most one checkpoint interval per run); one with a directory but no
checkpoint starts again. Ctrl-C (or SIGTERM) asks every running run to save a checkpoint
after its current update and stop; a second Ctrl-C stops them at once.

Suite file (unknown keys are errors)::

    name: memory-suite
    backbones: [trxl, gru, lstm, none]    # --gtrxl adds gtrxl
    seeds: [1, 2, 3]
    defaults: {eval_episodes: 100}         # trainer overrides for every run
    reference_column: POPGym paper, GRU MMER   # optional: what tasks' references are (default)
    tasks:
      CueRecall-16:                        # letters, digits, '.', '-', '_' (no '__')
        env: CueRecall                     # the trainer's --env: a preset or an env id
        budget: 200000                     # total_steps, the same for every backbone
                                           # (default: the preset's total_steps)
        metric: success                    # success | return
        threshold: 0.9                     # for "steps to threshold" (training curve)
        tests: what the task tests         # one line, for the README
        overrides: {env.kwargs.delay: 16, model.trxl.memory_length: 128}
        backbone_overrides:                # optional: one backbone's own tuning, after
          trxl: {ppo.learning_rate: 3.0e-4}  # the task's overrides
        reference: {value: 0.5, source: "..."}      # optional: a published figure

Overrides are the trainer's dotted ``--KEY VALUE`` options. Keys of a backbone's section
(``model.trxl.*`` for trxl and gtrxl, ``model.gru.*``, ``model.lstm.*``) go only to the runs
of that backbone, since the trainer refuses an option that a run's backbone does not read.
``backbone_overrides`` tune one backbone (by its exact name) where the task's settings suit
the others but not it, e.g. a learning rate: each backbone at its own tuned value is the
fair comparison, and the run's result JSON records the options it ran with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from trxl_rl.backbones import BACKBONES as BUILT_IN_BACKBONES
from trxl_rl.config import ModelConfig

HERE = Path(__file__).resolve().parent
FULL_SUITE = HERE / "suite.yaml"
QUICK_SUITE = HERE / "suite_quick.yaml"
BACKBONES = tuple(BUILT_IN_BACKBONES)
METRICS = {"success": ("charts/success_rate", "training success rate"),
           "return": ("charts/episodic_return", "training episodic return")}
RETURN_TAG = "charts/episodic_return"
SUCCESS_TAG = "charts/success_rate"
DROP_TOLERANCE = 0.1  # "stays solved": no fall after the threshold larger than this
ATTEMPTS = "compare_attempts.json"  # in a run directory: one entry per process that ran it


class SuiteError(ValueError):
    """A problem with the suite file or the command line; the message is one line."""


# --- the suite -------------------------------------------------------------------------------

@dataclasses.dataclass
class Task:
    """One task of a suite; see the module docstring for the fields."""

    name: str
    env: str
    budget: int
    metric: str
    threshold: float
    tests: str = ""
    overrides: dict = dataclasses.field(default_factory=dict)
    backbone_overrides: dict[str, dict] = dataclasses.field(default_factory=dict)
    reference: dict | None = None


@dataclasses.dataclass
class Suite:
    name: str
    path: Path
    backbones: list[str]
    seeds: list[int]
    tasks: dict[str, Task]
    defaults: dict = dataclasses.field(default_factory=dict)
    forced: dict = dataclasses.field(default_factory=dict)  # --set: after the tasks' options
    reference_column: str = "POPGym paper, GRU MMER"  # what the tasks' references are


def _keys(where: str, data: Any, required: set[str], optional: set[str]) -> dict:
    if not isinstance(data, dict):
        raise SuiteError(f"{where} must be a mapping, got {data!r}")
    missing = sorted(required - data.keys())
    if missing:
        raise SuiteError(f"{where}: missing key {missing[0]!r}")
    unknown = sorted(data.keys() - required - optional)
    if unknown:
        raise SuiteError(f"{where}: unknown key {unknown[0]!r}; known keys: "
                         f"{', '.join(sorted(required | optional))}")
    return data


def _typed(where: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise SuiteError(f"{where} must be {what}, got {value!r}")
    return value


def _overrides(where: str, data: Any) -> dict:
    data = {} if data is None else data
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise SuiteError(f"{where} must be a mapping of dotted trainer options, got {data!r}")
    return dict(data)


def _backbone_overrides(where: str, data: Any) -> dict[str, dict]:
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise SuiteError(f"{where} must be a mapping of backbone names to options, "
                         f"got {data!r}")
    check_names("backbone", list(data), BACKBONES, where=f"{where}: ")
    return {backbone: _overrides(f"{where}: {backbone}", options)
            for backbone, options in data.items()}


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file.

    :raises SuiteError: not readable, not YAML, or not of the documented form (one line that
        names the file and the key).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SuiteError(f"cannot read suite file {str(path)!r}: {err.strerror}") from None
    except yaml.YAMLError as err:
        reason = str(err).splitlines()[0]
        raise SuiteError(f"suite file {str(path)!r} is not valid YAML: {reason}") from None
    where = f"suite file {str(path)!r}"
    data = _keys(where, data, {"tasks", "backbones", "seeds"},
                 {"name", "defaults", "reference_column"})
    backbones = data["backbones"]
    if not isinstance(backbones, list) or not backbones:
        raise SuiteError(f"{where}: backbones must be a non-empty list")
    check_names("backbone", backbones, BACKBONES, where=f"{where}: ")
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise SuiteError(f"{where}: seeds must be a non-empty list of integers")
    for seed in seeds:
        _typed(f"{where}: seed", seed, int, "an integer")
    if not isinstance(data["tasks"], dict) or not data["tasks"]:
        raise SuiteError(f"{where}: tasks must be a non-empty mapping of task names")
    tasks = {}
    for name, spec in data["tasks"].items():
        at = f"{where}: task {name!r}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name) \
                or "__" in name:
            raise SuiteError(f"{at}: a task name is letters, digits, '.', '-' and '_' "
                             f"(no '__')")
        spec = _keys(at, spec, {"env", "metric", "threshold"},
                     {"budget", "tests", "overrides", "backbone_overrides", "reference"})
        if spec["metric"] not in METRICS:
            raise SuiteError(f"{at}: metric must be one of {', '.join(METRICS)}, "
                             f"got {spec['metric']!r}")
        reference = spec.get("reference")
        if reference is not None:
            reference = _keys(f"{at}: reference", reference, {"value", "source"}, set())
            _typed(f"{at}: reference value", reference["value"], (int, float), "a number")
        env = _typed(f"{at}: env", spec["env"], str, "a string")
        budget = spec["budget"] if "budget" in spec else preset_budget(at, env)
        budget = _typed(f"{at}: budget", budget, int, "a positive integer")
        if budget <= 0:
            raise SuiteError(f"{at}: budget must be a positive integer, got {budget}")
        tasks[name] = Task(
            name=name, env=env, budget=budget,
            metric=spec["metric"],
            threshold=float(_typed(f"{at}: threshold", spec["threshold"], (int, float),
                                   "a number")),
            tests=str(spec.get("tests") or ""),
            overrides=_overrides(f"{at}: overrides", spec.get("overrides")),
            backbone_overrides=_backbone_overrides(f"{at}: backbone_overrides",
                                                   spec.get("backbone_overrides")),
            reference=reference)
    return Suite(name=str(data.get("name") or path.stem), path=path, backbones=list(backbones),
                 seeds=list(seeds), tasks=tasks,
                 defaults=_overrides(f"{where}: defaults", data.get("defaults")),
                 reference_column=str(data.get("reference_column")
                                      or Suite.reference_column))


def preset_budget(where: str, env: str) -> int:
    """``total_steps`` of the preset that ``--env env`` starts from."""
    from trxl_rl.config import ENV_PRESETS, preset_path, read_yaml

    path = preset_path(ENV_PRESETS.get(env, env))
    if path is None:
        raise SuiteError(f"{where}: no budget, and env {env!r} is not a preset whose "
                         f"total_steps could be the budget")
    return int(read_yaml(path).get("total_steps", 500_000))


def check_names(what: str, names: list, known: tuple | list, where: str = "") -> None:
    """Raise :class:`SuiteError` for the first name not in ``known``."""
    for name in names:
        if name not in known:
            import difflib

            close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SuiteError(f"{where}unknown {what} {name!r}{hint}; known: "
                             f"{', '.join(str(k) for k in known)}")


# --- runs ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
    task: Task
    backbone: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task.name}__{self.backbone}__s{self.seed}"


def run_overrides(suite: Suite, task: Task, backbone: str) -> dict:
    """The trainer options of one run: suite defaults, the task's, the task's for this
    backbone, then ``--set``'s, without the backbone sections (``model.<section>.*``) that
    this run's backbone does not read."""
    model = ModelConfig(backbone=backbone)
    options = {**suite.defaults, **task.overrides,
               **task.backbone_overrides.get(backbone, {}), **suite.forced}
    return {key: value for key, value in options.items() if model.reads(key)}


def _cli_value(value: Any) -> str:
    """A value as the trainer's CLI parses it (YAML): strings as they are unless YAML would
    read them as something else, everything else as JSON (which is YAML)."""
    if isinstance(value, str) and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)


def train_command(run: Run, suite: Suite, runs_dir: Path, device: str) -> list[str]:
    """The trainer command line of a fresh run."""
    cmd = [sys.executable, "-m", "trxl_rl.train", "--env", run.task.env,
           "--seed", str(run.seed), "--total-steps", str(run.task.budget),
           "--run-name", run.name, "--log_dir", str(runs_dir), "--model.backbone", run.backbone,
           "--threshold", str(run.task.threshold), "--threshold_metric", run.task.metric,
           "--stop_at", "null"]  # the whole budget: "stays solved" is measured over it
    for key, value in run_overrides(suite, run.task, run.backbone).items():
        cmd += [f"--{key}", _cli_value(value)]
    return cmd + common_options(device)


def resume_command(run_dir: Path, device: str) -> list[str]:
    return [sys.executable, "-m", "trxl_rl.train", "--resume", str(run_dir),
            *common_options(device)]


def common_options(device: str) -> list[str]:
    return ["--threads", "1", "--progress", "false", "--device", device]


def check_runs(runs: list[Run], suite: Suite, device: str) -> None:
    """Build every run's config the way the trainer will (and each task's env once), so that
    a bad override or env id is reported before anything starts.

    :raises SuiteError: naming the task and backbone.
    """
    from trxl_rl.agents import build_agent
    from trxl_rl.config import ConfigError
    from trxl_rl.envs import UnknownEnvError, make_env
    from trxl_rl.train import parse_args, resolve_config

    spaces = {}  # task -> its env's (observation, action) spaces
    for run in runs:
        where = f"task {run.task.name!r}, backbone {run.backbone}"
        try:
            cfg = resolve_config(*parse_args(train_command(run, suite, Path("runs"),
                                                           device)[3:]))
        except ConfigError as err:
            raise SuiteError(f"{where}: {err}") from None
        if run.task.name not in spaces:
            try:
                env = make_env(cfg.env.id, **cfg.env.kwargs)
            except UnknownEnvError as err:
                raise SuiteError(f"task {run.task.name!r}: {err}") from None
            except (ValueError, TypeError) as err:
                raise SuiteError(f"task {run.task.name!r}: bad env.kwargs for "
                                 f"{cfg.env.id!r}: {err}") from None
            spaces[run.task.name] = env.observation_space, env.action_space
            env.close()
        try:  # the backbone's own fields, as the trainer checks them before it writes
            build_agent(cfg, *spaces[run.task.name])
        except ValueError as err:
            raise SuiteError(f"{where}: {err}") from None


class Layout:
    """Where a suite's outputs live under ``--out``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.runs = out / "runs"
        self.results = out / "results"
        self.logs = out / "logs"
        self.curves = out / "curves"

    def result(self, run: Run) -> Path:
        return self.results / f"{run.name}.json"

    def run_dir(self, run: Run) -> Path:
        return self.runs / run.name


def run_state(run: Run, layout: Layout) -> str:
    """``done`` (result written), ``trained`` (summary.json, no result yet), ``resume``
    (checkpoints), ``stale`` (a directory without checkpoint) or ``new``."""
    run_dir = layout.run_dir(run)
    if layout.result(run).exists():
        return "done"
    if (run_dir / "summary.json").exists():
        return "trained"
    if any((run_dir / "checkpoints").glob("update_*.pt")):
        return "resume"
    return "stale" if run_dir.exists() else "new"


# --- statistics ------------------------------------------------------------------------------

# Two-sided 95% quantiles of Student's t, by degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, then
    1.96 + 2.4 / df, within 0.002 of the exact value)."""
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def mean_interval(values: list[float]) -> tuple[float, float | None, float | None]:
    """Mean over seeds and its 95% t-interval ``(mean, low, high)``; one value has no
    interval (``(value, None, None)``)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, None, None
    half = t_quantile_975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def mmer(returns: np.ndarray) -> float | None:
    """Max mean episodic return (POPGym's MMER for one run): the largest of the logged means
    of the episodes that ended in each update."""
    return float(np.max(returns)) if len(returns) else None


def steps_to_threshold(steps: np.ndarray, values: np.ndarray, threshold: float) -> int | None:
    """The first logged step whose value reaches ``threshold``; None if none does."""
    hits = np.flatnonzero(np.asarray(values) >= threshold)
    return int(steps[hits[0]]) if len(hits) else None


def drop_after_threshold(values: list[float | None], threshold: float) -> float | None:
    """How far the curve fell after first reaching ``threshold`` ("stays solved"): the
    largest fall from its best value so far to a later one, over the updates from the first
    at the threshold on (0: never fell); None if it never reached the threshold. Updates
    without a value (no episode ended) are skipped."""
    seen = [v for v in values if v is not None]
    first = next((i for i, v in enumerate(seen) if v >= threshold), None)
    if first is None:
        return None
    after = np.asarray(seen[first:], dtype=float)
    return float(np.max(np.maximum.accumulate(after) - after))


def seconds_to_step(step: int | None, seconds: tuple[np.ndarray, np.ndarray]) -> float | None:
    """The training seconds (``seconds``: steps and per-update seconds) summed over the
    updates up to and including ``step``; None for None."""
    if step is None:
        return None
    steps, per_update = seconds
    return float(per_update[np.asarray(steps) <= step].sum())


# --- one run's result ------------------------------------------------------------------------

def _finite(x: Any) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def merged_curve(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, list]:
    """Curves of several tags on the union of their steps (None where a tag has no value)."""
    steps = sorted(set().union(*(c[0].tolist() for c in curves.values())))
    out: dict[str, list] = {"steps": [int(s) for s in steps]}
    for name, (s, v) in curves.items():
        by_step = dict(zip(s.tolist(), v.tolist(), strict=True))
        out[name] = [_finite(by_step.get(step)) for step in steps]
    return out


def run_result(run: Run, run_dir: Path, overrides: dict) -> dict[str, Any]:
    """The result of a finished run, from its TensorBoard scalars (the whole curve, across
    resumes), ``summary.json``, ``config.yaml`` and the attempts that ran it."""
    from benchmarks.curves import read_scalars

    summary = json.loads((run_dir / "summary.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    attempts = _read_attempts(run_dir)
    success = read_scalars(run_dir, SUCCESS_TAG)
    returns = read_scalars(run_dir, RETURN_TAG)
    rollout_s = read_scalars(run_dir, "charts/rollout_seconds")
    update_s = read_scalars(run_dir, "charts/update_seconds")
    train_seconds = float(rollout_s[1].sum() + update_s[1].sum())
    steps_done = int(summary["global_step"])
    metric_curve = success if run.task.metric == "success" else returns
    reached = steps_to_threshold(*metric_curve, run.task.threshold)
    return {
        "task": run.task.name, "backbone": run.backbone, "seed": run.seed, "run": run.name,
        "env": config["env"]["id"], "metric": run.task.metric,
        "threshold": run.task.threshold, "overrides": overrides, "config": config,
        "budget": int(config["total_steps"]), "steps": steps_done,
        "wall_clock_seconds": sum(a["seconds"] for a in attempts) if attempts else None,
        "cpu_seconds": sum(a["cpu_seconds"] for a in attempts) if attempts else None,
        "attempts": len(attempts),
        "final": {
            "episodes": summary.get("episodes"),
            "deterministic": summary.get("eval_deterministic"),
            "success": _finite(summary.get("success_rate")),
            "success_ci95": [_finite(x) for x in summary.get("success_ci95", [None, None])],
            "return": _finite(summary.get("return_mean")),
        },
        "mmer": mmer(returns[1]),
        "steps_to_threshold": reached,
        "seconds_to_threshold": seconds_to_step(reached, (rollout_s[0],
                                                          rollout_s[1] + update_s[1])),
        "sps": steps_done / train_seconds if train_seconds > 0 else None,
        "curve": merged_curve({"success": success, "return": returns}),
    }


def _read_attempts(run_dir: Path) -> list[dict]:
    path = run_dir / ATTEMPTS
    return json.loads(path.read_text()) if path.exists() else []


def _record_attempt(run_dir: Path, entry: dict) -> None:
    if not run_dir.exists():  # the trainer stopped before it made its directory
        return
    attempts = _read_attempts(run_dir) + [entry]
    (run_dir / ATTEMPTS).write_text(json.dumps(attempts, indent=1))


def prune_checkpoints(run_dir: Path) -> None:
    """Keep only a finished run's newest checkpoint (the one its evaluation used)."""
    checkpoints = sorted((run_dir / "checkpoints").glob("update_*.pt"))
    for path in checkpoints[:-1]:
        path.unlink()


# --- running ---------------------------------------------------------------------------------

class Stop(Exception):
    """SIGTERM, turned into an exception like SIGINT's KeyboardInterrupt."""


def execute(runs: list[Run], suite: Suite, layout: Layout, jobs: int, device: str
            ) -> tuple[int, int, bool]:
    """Run (or resume) ``runs``, ``jobs`` at a time, writing each one's result when it
    finishes. Returns ``(finished, failed, interrupted)``."""
    import subprocess

    for folder in (layout.runs, layout.results, layout.logs):
        folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    queue = deque(runs)
    running: dict[int, tuple[Run, subprocess.Popen, float, str, Any]] = {}
    finished = failed = 0
    total = len(runs)

    def say(message: str) -> None:
        print(f"[{finished + failed}/{total}] {message}", file=sys.stderr, flush=True)

    def start(run: Run) -> None:
        state = run_state(run, layout)
        run_dir = layout.run_dir(run)
        if state == "stale":
            shutil.rmtree(run_dir)
        if state == "resume":
            cmd = resume_command(run_dir, device)
        else:
            cmd = train_command(run, suite, layout.runs, device)
        log = open(layout.logs / f"{run.name}.log", "a")
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        # A session of its own: Ctrl-C reaches this process only, which then asks each run
        # once to stop (a second SIGINT would make the trainer stop without a checkpoint).
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        running[proc.pid] = (run, proc, time.perf_counter(), state, log)
        say(f"{run.name}: {'resumed' if state == 'resume' else 'started'}")

    def reap(block: bool) -> list[tuple[Run, int]]:
        """The runs that ended (their exit codes), each attempt recorded in its directory."""
        done = []
        for pid in list(running):
            got, status, usage = os.wait4(pid, 0 if block else os.WNOHANG)
            if got == 0:
                continue
            run, proc, started, state, log = running.pop(pid)
            proc.returncode = os.waitstatus_to_exitcode(status)
            log.close()
            entry = {"mode": "resume" if state == "resume" else "start",
                     "exit_code": proc.returncode,
                     "seconds": round(time.perf_counter() - started, 2),
                     "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2)}
            _record_attempt(layout.run_dir(run), entry)
            done.append((run, proc.returncode))
        return done

    def conclude(run: Run, code: int) -> None:
        nonlocal finished, failed
        if code == 0:
            try:
                result = write_result(run, suite, layout)
            except (OSError, KeyError, ValueError) as err:
                failed += 1
                say(f"{run.name}: trained, but its result could not be built: {err}")
                return
            finished += 1
            say(f"{run.name}: finished ({describe(result)})")
        else:
            failed += 1
            say(f"{run.name}: failed with exit code {code}: {_last_line(layout, run)}")

    def on_term(signum, frame):  # noqa: ARG001
        raise Stop

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        for run in [r for r in runs if run_state(r, layout) == "trained"]:
            queue.remove(run)
            conclude(run, 0)
        while queue or running:
            while queue and len(running) < jobs:
                start(queue.popleft())
            for run, code in reap(block=False):
                conclude(run, code)
            time.sleep(0.1)
    except (KeyboardInterrupt, Stop):
        print(f"stopping: {len(running)} running run(s) save a checkpoint after their "
              f"current update (Ctrl-C again to stop them at once); rerun the same command "
              f"to continue", file=sys.stderr, flush=True)
        _signal_all(running, signal.SIGINT)
        try:
            while running:
                for run, code in reap(block=False):
                    if code == 0:
                        conclude(run, 0)
                time.sleep(0.1)
        except (KeyboardInterrupt, Stop):
            _signal_all(running, signal.SIGTERM)
            while running:
                reap(block=True)
        return finished, failed, True
    finally:
        signal.signal(signal.SIGTERM, previous)
    return finished, failed, False


def _signal_all(running: dict, signum: int) -> None:
    for pid in running:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _last_line(layout: Layout, run: Run) -> str:
    lines = (layout.logs / f"{run.name}.log").read_text().strip().splitlines()
    return lines[-1][:200] if lines else "(no output)"


def write_result(run: Run, suite: Suite, layout: Layout) -> dict:
    run_dir = layout.run_dir(run)
    result = run_result(run, run_dir, run_overrides(suite, run.task, run.backbone))
    prune_checkpoints(run_dir)
    path = layout.result(run)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)  # a result file is whole or absent
    return result


def describe(result: dict) -> str:
    final = result["final"][result["metric"]]
    parts = [f"greedy {result['metric']} {_num(final)}", f"MMER {_num(result['mmer'])}"]
    if result["wall_clock_seconds"] is not None:
        parts.append(f"{result['wall_clock_seconds']:.0f} s")
    return ", ".join(parts)


# --- the table and the curves ----------------------------------------------------------------

def load_results(layout: Layout, suite: Suite) -> list[dict]:
    """The results under ``layout`` of the suite's tasks."""
    results = []
    for path in sorted(layout.results.glob("*.json")):
        result = json.loads(path.read_text())
        if result["task"] in suite.tasks:
            results.append(result)
    return results


def aggregate(results: list[dict], suite: Suite) -> list[dict]:
    """One row per task and backbone with results (suite order), over its seeds."""
    order = [*suite.backbones, *(b for b in BACKBONES if b not in suite.backbones)]
    rows = []
    for task in suite.tasks.values():
        for backbone in order:
            group = sorted((r for r in results
                            if r["task"] == task.name and r["backbone"] == backbone),
                           key=lambda r: r["seed"])
            if group:
                rows.append(aggregate_group(task, backbone, group))
    return rows


def aggregate_group(task: Task, backbone: str, group: list[dict]) -> dict:
    finals = [r["final"][task.metric] for r in group if r["final"][task.metric] is not None]
    mean, low, high = mean_interval(finals) if finals else (None, None, None)
    if task.metric == "success" and low is not None:  # a rate's interval stays in [0, 1]
        low, high = max(0.0, low), min(1.0, high)
    reached = [r["steps_to_threshold"] for r in group if r["steps_to_threshold"] is not None]
    seconds = [r["seconds_to_threshold"] for r in group
               if r.get("seconds_to_threshold") is not None]
    mmers = [r["mmer"] for r in group if r["mmer"] is not None]
    drop_per_seed = [drop_after_threshold(r["curve"][task.metric], task.threshold)
                     for r in group]
    drops = [d for d in drop_per_seed if d is not None]
    sps = [r["sps"] for r in group if r["sps"] is not None]
    wall = [r["wall_clock_seconds"] for r in group if r["wall_clock_seconds"] is not None]
    return {
        "task": task.name, "backbone": backbone, "metric": task.metric,
        "threshold": task.threshold, "budget": task.budget,
        "budgets_run": sorted({r["budget"] for r in group}),
        "seeds": [r["seed"] for r in group],
        "final_mean": mean, "final_ci95": [low, high] if low is not None else None,
        "final_per_seed": finals,
        "mmer": float(np.mean(mmers)) if mmers else None,
        "steps_to_threshold": float(np.mean(reached)) if reached else None,
        "reached_threshold": len(reached),
        "drop_per_seed": drop_per_seed,  # None: that seed never reached the threshold
        "largest_drop": max(drops) if drops else None,
        "drops_above_tolerance": sum(d > DROP_TOLERANCE for d in drops),
        "seconds_to_threshold": float(np.mean(seconds)) if seconds else None,
        "sps": float(np.mean(sps)) if sps else None,
        "wall_clock_seconds": float(np.mean(wall)) if wall else None,
        "reference": task.reference,
    }


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _steps(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    return f"{x / 1e3:.0f}k" if x >= 1e3 else f"{x:.0f}"


def _drop(row: dict) -> str:
    if row.get("largest_drop") is None:
        return "-"
    measured = sum(d is not None for d in row["drop_per_seed"])
    return f"{row['largest_drop']:.2f} ({row['drops_above_tolerance']}/{measured})"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 60 else f"{minutes / 60:.1f} h"


def markdown_table(rows: list[dict], suite: Suite) -> str:
    """The table: per task and backbone, over seeds."""
    references = {row["task"]: row["reference"] for row in rows if row["reference"]}
    header = ["task", "backbone", "seeds", "final greedy (95% CI)", "MMER",
              "steps to threshold (seeds)", "time to threshold",
              f"drop after threshold (seeds > {DROP_TOLERANCE:g})", "steps/s",
              "wall-clock / run"]
    if references:
        header.append(suite.reference_column)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 2 else "--:" for i in range(len(header))) + "|"]
    for row in rows:
        final = _num(row["final_mean"])
        if row["final_ci95"]:
            low, high = row["final_ci95"]
            final += f" [{_num(low)}, {_num(high)}]"
        task = suite.tasks[row["task"]]
        reached = f"{_steps(row['steps_to_threshold'])} ({row['reached_threshold']}/" \
                  f"{len(row['seeds'])})"
        cells = [f"{row['task']} ({task.metric}, {_steps(task.budget)})", row["backbone"],
                 str(len(row["seeds"])), final, _num(row["mmer"]), reached,
                 _duration(row.get("seconds_to_threshold")), _drop(row),
                 f"{row['sps']:,.0f}" if row["sps"] else "-",
                 _duration(row["wall_clock_seconds"])]
        if references:
            ref = references.get(row["task"])
            cells.append(_num(ref["value"], 3) if ref else "")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "- final greedy: the trainer's evaluation after training (greedy actions, episodes on "
        "env seeds not used in training), success rate or mean return as the task says; mean "
        "over seeds and its 95% t-interval over seeds (success intervals clipped to [0, 1]; "
        "none with one seed).",
        "- MMER: per run the maximum over training of the mean episodic return of an update "
        "(`charts/episodic_return`), averaged over runs.",
        "- steps to threshold: the first environment step at which the training success rate "
        "(return for tasks without success) of an update reached the task's threshold; the mean "
        "over the seeds that reached it, and how many did; time to threshold: the training "
        "seconds (rollout + update of one thread) up to that update, mean over the same seeds.",
        "- drop after threshold (stays solved): per run that reached the threshold, the "
        "largest fall of the same training curve from its best value so far to a later "
        "update's, after first reaching it; the worst of the seeds, and how many fell by more "
        f"than {DROP_TOLERANCE:g}. Each point is one update's episodes, so it includes their "
        "sampling noise.",
        "- steps/s: environment steps per second of training (rollout + update, one thread "
        "per run); wall-clock / run includes start-up and the final evaluation.",
    ]
    thresholds = "; ".join(f"{t.name} {t.metric} {t.threshold:g}" for t in suite.tasks.values()
                           if t.name in {row["task"] for row in rows})
    notes.append(f"- thresholds: {thresholds}.")
    for name, ref in references.items():
        notes.append(f"- {suite.reference_column}, {name}: {ref['source']}")
    mismatched = [row["task"] for row in rows if row["budgets_run"] != [row["budget"]]]
    if mismatched:
        notes.append(f"- runs of {', '.join(sorted(set(mismatched)))} were trained with "
                     f"another budget than the suite's (see table.json, budgets_run).")
    return "\n".join(lines + notes) + "\n"


def plot_task_curves(results: list[dict], suite: Suite, folder: Path) -> list[Path]:
    """``folder/<task>.png`` per task: the task's training metric, one line per backbone
    (mean and min-max band over seeds)."""
    from benchmarks.curves import plot_curves

    order = [*suite.backbones, *(b for b in BACKBONES if b not in suite.backbones)]
    paths = []
    for task in suite.tasks.values():
        groups = {}
        for backbone in order:
            curves = []
            for r in results:
                if r["task"] != task.name or r["backbone"] != backbone:
                    continue
                steps = np.asarray(r["curve"]["steps"], dtype=np.float64)
                values = np.asarray([np.nan if v is None else v
                                     for v in r["curve"][task.metric]], dtype=np.float64)
                keep = ~np.isnan(values)
                curves.append((steps[keep], values[keep]))
            if curves:
                groups[backbone] = curves
        if not groups:
            continue
        path = folder / f"{task.name}.png"
        title = f"{task.name}: {task.tests}" if task.tests else task.name
        plot_curves(groups, path, title[:90], METRICS[task.metric][1])
        paths.append(path)
    return paths


def report(suite: Suite, layout: Layout, docs: Path | None) -> str:
    """Write the table (markdown and JSON) and the curves from the finished runs."""
    results = load_results(layout, suite)
    rows = aggregate(results, suite)
    title = f"# {suite.name}: {len(results)} finished runs\n\n"
    table = title + (markdown_table(rows, suite) if rows else "No finished runs yet.\n")
    layout.out.mkdir(parents=True, exist_ok=True)
    (layout.out / "table.md").write_text(table)
    (layout.out / "table.json").write_text(json.dumps({"suite": suite.name, "rows": rows},
                                                      indent=1))
    curves = plot_task_curves(results, suite, layout.curves)
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        for name in ("table.md", "table.json"):
            shutil.copy(layout.out / name, docs / name)
        (docs / "curves").mkdir(exist_ok=True)
        for path in curves:
            shutil.copy(path, docs / "curves" / path.name)
    return table


# --- command line ----------------------------------------------------------------------------

def select_runs(suite: Suite, args: argparse.Namespace) -> list[Run]:
    tasks = args.tasks or list(suite.tasks)
    check_names("task", tasks, list(suite.tasks))
    backbones = args.backbones or [*suite.backbones, *(["gtrxl"] if args.gtrxl and
                                                       "gtrxl" not in suite.backbones else [])]
    check_names("backbone", backbones, BACKBONES)
    seeds = args.seeds or suite.seeds
    return [Run(suite.tasks[t], b, s) for t in tasks for b in backbones for s in seeds]


def adjust(suite: Suite, args: argparse.Namespace) -> None:
    """Apply ``--budget`` and ``--set`` to ``suite``."""
    if args.budget is not None:
        if args.budget <= 0:
            raise SuiteError(f"--budget must be > 0, got {args.budget}")
        for task in suite.tasks.values():
            task.budget = args.budget
    for key, raw in args.set:
        try:
            suite.forced[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise SuiteError(f"cannot parse the value {raw!r} of --set {key}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", help=f"suite file (default {FULL_SUITE.relative_to(HERE.parent)}"
                                        f"; --quick: {QUICK_SUITE.relative_to(HERE.parent)})")
    parser.add_argument("--quick", action="store_true", help="the quick suite (under a minute)")
    parser.add_argument("--tasks", nargs="+", help="run these tasks only")
    parser.add_argument("--backbones", nargs="+", help="run these backbones only")
    parser.add_argument("--seeds", nargs="+", type=int, help="run these seeds only")
    parser.add_argument("--gtrxl", action="store_true", help="also run gtrxl")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    parser.add_argument("--out", help="output folder (default benchmarks/compare_out/<suite>)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--budget", type=int, metavar="STEPS",
                        help="every task's budget (smoke tests and speed probes; use another "
                             "--out)")
    parser.add_argument("--set", nargs=2, action="append", default=[],
                        metavar=("KEY", "VALUE"),
                        help="a trainer option for every run, over the suite's (e.g. --set "
                             "eval_episodes 0); repeatable")
    parser.add_argument("--list", action="store_true",
                        help="list the selected runs, their state and command; run nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="write the table and curves from the finished runs; run nothing")
    parser.add_argument("--docs", help="also copy table.md, table.json and curves/ here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.jobs < 1:
            raise SuiteError(f"--jobs must be >= 1, got {args.jobs}")
        if args.suite and args.quick:
            raise SuiteError("give --suite or --quick, not both")
        suite = load_suite(args.suite or (QUICK_SUITE if args.quick else FULL_SUITE))
        adjust(suite, args)
        runs = select_runs(suite, args)
        layout = Layout(Path(args.out) if args.out else
                        HERE / "compare_out" / suite.path.stem)
        if args.list:
            for run in runs:
                state = run_state(run, layout)
                cmd = resume_command(layout.run_dir(run), args.device) if state == "resume" \
                    else train_command(run, suite, layout.runs, args.device)
                print(f"{run.name}  {state}  python {' '.join(cmd[1:])}")
            return 0
        if not args.report_only:
            check_runs([r for r in runs if run_state(r, layout) in ("new", "stale")], suite,
                       args.device)
    except SuiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed, interrupted = 0, False
    if not args.report_only:
        todo = [r for r in runs if run_state(r, layout) != "done"]
        for run in runs:
            if run not in todo:
                result = json.loads(layout.result(run).read_text())
                if result["budget"] != run.task.budget:
                    print(f"warning: {run.name} was trained with budget {result['budget']}, "
                          f"the suite now says {run.task.budget}; delete "
                          f"{layout.result(run)} and {layout.run_dir(run)} to rerun it",
                          file=sys.stderr)
        print(f"{len(runs) - len(todo)} of {len(runs)} runs done; running {len(todo)} with "
              f"{args.jobs} job(s) under {layout.out}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        _, failed, interrupted = execute(todo, suite, layout, args.jobs, args.device)
        print(f"wall-clock {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(report(suite, layout, Path(args.docs) if args.docs else None))
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
