"""One path from the training loop to every sink of its scalars.

The trainer computes each update's scalars once and hands them to a :class:`Metrics` object
(``metrics.record(scalars, step)``), which forwards them unchanged to its sinks, as SB3's
logger feeds its output formats:

- :class:`TensorBoard`: event files in the run directory (``tensorboard --logdir runs``);
- :class:`WandbRun`: an optional Weights & Biases run (``--track``; the ``wandb`` extra);
- :class:`ProgressBar`: the tqdm bar over environment steps, with the latest return, success
  rate and SPS.

``step`` is the global environment step (CleanRL's ``global_step``); the scalars keep
CleanRL's names (``charts/SPS``, ``losses/approx_kl``, ...). A sink is anything with
``write(scalars, step)`` and ``close()``; it must not modify ``scalars``. In a data-parallel
run only rank 0 has sinks. Optional packages are imported by the sinks that need them, so this
module costs nothing to import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

WANDB_INSTALL = 'pip install "trxl_rl[wandb]" (in a checkout: pip install -e ".[wandb]")'
# The W&B run a run directory logs to: a resumed run continues it.
WANDB_RUN_ID_FILE = "wandb_run_id"


class Sink(Protocol):
    def write(self, scalars: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class Metrics:
    """Forwards every :meth:`record` to each of ``sinks`` (none: records go nowhere, as on
    the ranks other than 0). Closing it (or leaving its ``with`` block) closes every sink,
    even if one of them fails."""

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self.sinks = list(sinks)
        self._closing = contextlib.ExitStack()
        for sink in self.sinks:
            self._closing.callback(sink.close)

    def record(self, scalars: Mapping[str, float], step: int) -> None:
        """Hand ``scalars`` (name -> value) of global step ``step`` to every sink."""
        for sink in self.sinks:
            sink.write(scalars, step)

    def close(self) -> None:
        self._closing.close()

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class TensorBoard:
    """Scalars as TensorBoard events in ``log_dir``.

    :param purge_step: the first step a resumed run logs: events the interrupted run wrote
        from this step on (after its last checkpoint) are hidden, so the resumed run's replace
        them (``SummaryWriter(purge_step=...)``). None for a new run.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def write(self, scalars: Mapping[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def check_wandb() -> None:
    """:raises ImportError: ``wandb`` cannot be imported; the message is one line that names
    the fix."""
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        missing = isinstance(err, ModuleNotFoundError) and err.name == "wandb"
        reason = "" if missing else f" (it is installed but fails to import: {err})"
        raise ImportError(f"--track needs the wandb package{reason}: {WANDB_INSTALL}; or "
                          "run without tracking (--track false)") from None


class WandbRun:
    """Scalars as the history of a Weights & Biases run, against ``global_step`` (the x-axis
    of every chart, as in CleanRL's tracked runs).

    The run is named after the run directory and keeps its files there (``run_dir/wandb``);
    its id is stored in ``run_dir/wandb_run_id``, so a resumed run directory continues the
    same W&B run (``resume="allow"``). W&B cannot forget what it was sent: where the run it
    continues already holds steps that the resumed training logs again (those after the last
    checkpoint), they are not sent twice; the values are those of the interrupted run (on
    CPU the same, as the resumed run computes exactly what it computed, timings aside).
    Offline (``WANDB_MODE=offline``) W&B holds nothing to compare with, and everything is
    written; ``wandb sync`` uploads it.

    :param config: the resolved training config, stored as the W&B run's config.
    """

    def __init__(self, run_dir: str | Path, project: str, entity: str | None,
                 config: dict[str, Any]) -> None:
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.run = wandb.init(project=project, entity=entity, name=run_dir.name, id=run_id,
                              resume="allow" if run_id else None, dir=str(run_dir),
                              config=config)
        if run_id is None:
            id_file.write_text(f"{self.run.id}\n")
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")
        # What a resumed W&B run holds: its last global_step and the names logged so far.
        last = self.run.summary.get("global_step")
        self._held = None if last is None else (last, set(self.run.summary.keys()))

    def write(self, scalars: Mapping[str, float], step: int) -> None:
        if self._held is not None:
            last, names = self._held
            if step < last or (step == last and names.issuperset(scalars)):
                return  # the interrupted run sent these
            if step > last:
                self._held = None
        self.run.log({**scalars, "global_step": step})

    def close(self) -> None:
        self.run.finish()


class ProgressBar:
    """A tqdm bar over environment steps (``total``, starting at ``initial``) that shows the
    latest mean episodic return (``ret``), success rate (``success``) and ``SPS``; values a
    record lacks (no episode ended in that update) keep their last value."""

    SHOWN = (("charts/episodic_return", "ret"), ("charts/success_rate", "success"))

    def __init__(self, total: int, initial: int = 0) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.shown: dict[str, float] = {}

    def write(self, scalars: Mapping[str, float], step: int) -> None:
        for key, short in self.SHOWN:
            if key in scalars:
                self.shown[short] = round(scalars[key], 3)
        if "charts/SPS" in scalars:
            self.shown["SPS"] = int(scalars["charts/SPS"])
        self.bar.set_postfix(self.shown, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class Threshold:
    """When training first reaches ``value``: the first update whose training success rate
    (``metric="success"``, ``charts/success_rate``) or mean episodic return (``"return"``,
    ``charts/episodic_return``) is at least ``value``, with the environment steps and the
    training seconds (start-up and final evaluation left out) up to the end of that update.

    :param reached: what an earlier sitting of a resumed run found (:meth:`state`).
    """

    CHARTS = {"success": "charts/success_rate", "return": "charts/episodic_return"}

    def __init__(self, metric: str, value: float | None, reached: dict | None = None) -> None:
        self.metric, self.value = metric, value
        reached = reached or {}
        self.steps: int | None = reached.get("steps")
        self.seconds: float | None = reached.get("seconds")

    def check(self, scalars: Mapping[str, float], step: int, seconds: float
              ) -> dict[str, float]:
        """The scalars to log with this update's (``threshold/steps``,
        ``threshold/seconds``) if it is the first to reach the threshold; else none."""
        if self.value is None or self.steps is not None:
            return {}
        score = scalars.get(self.CHARTS[self.metric])
        if score is None or score < self.value:
            return {}
        self.steps, self.seconds = step, seconds
        return {"threshold/steps": float(step), "threshold/seconds": seconds}

    def state(self) -> dict[str, Any]:
        """Plain data for ``summary.json`` and checkpoints: metric, value, steps and seconds
        (None until reached)."""
        return {"metric": self.metric, "value": self.value, "steps": self.steps,
                "seconds": self.seconds}


class StopWhenSolved:
    """Whether training may end before its budget (``stop_at``): after ``updates`` updates in
    a row whose training success rate (``metric="success"``) or mean episodic return
    (``"return"``) is at least ``value``, and, where :meth:`check` is given a ``confirm``
    (``stop_greedy_episodes``), once the greedy policy reaches ``value`` too. An update in
    which no episode ended neither counts nor breaks the run. In a data-parallel run it reads
    the scalars reduced over the ranks, so every rank stops after the same update.

    :param value: None: never (the whole budget is trained).
    :param reached: a checkpoint's :meth:`state`; its count of updates in a row (and the
        greedy checks so far) is kept only if it was counted against the same metric and value.
    """

    def __init__(self, metric: str, value: float | None, updates: int,
                 reached: dict | None = None) -> None:
        self.metric, self.value, self.updates = metric, value, updates
        reached = reached or {}
        same = (reached.get("metric"), reached.get("value")) == (metric, value)
        self.in_a_row: int = reached.get("in_a_row", 0) if same else 0
        self.steps: int | None = reached.get("steps") if same else None  # where it stopped
        # [{"steps": step, "score": greedy score}] of every greedy check so far
        self.checks: list[dict[str, float]] = list(reached.get("checks", [])) if same else []

    @property
    def solved(self) -> bool:
        return self.value is not None and self.steps is not None

    def check(self, scalars: Mapping[str, float], step: int,
              confirm: Callable[[], float] | None = None) -> bool:
        """After an update (at environment step ``step``): whether training stops now.

        :param confirm: called once the training metric has held for ``updates`` updates; the
            greedy policy's score, which must reach ``value`` too (None: no such check).
        """
        score = scalars.get(Threshold.CHARTS[self.metric])
        if self.value is None or score is None or self.solved:
            return self.solved
        self.in_a_row = self.in_a_row + 1 if score >= self.value else 0
        if self.in_a_row < self.updates:
            return False
        if confirm is not None:
            self.checks.append({"steps": step, "score": float(confirm())})
            if not self.checks[-1]["score"] >= self.value:  # nan (no success defined) too
                return False
        self.steps = step
        return True

    def scalars(self, step: int) -> dict[str, float]:
        """The scalar to log with the update at ``step``: its greedy check's score
        (``stop/greedy_score``), if it ran one; else none."""
        if self.checks and self.checks[-1]["steps"] == step:
            return {"stop/greedy_score": self.checks[-1]["score"]}
        return {}

    def __str__(self) -> str:
        return (f"training {self.metric} >= {self.value:g} in {self.updates} updates in a row "
                f"(stop_at)" + (f", greedy {self.checks[-1]['score']:.3g} on held-out seeds"
                                if self.checks else ""))

    def state(self) -> dict[str, Any]:
        """Plain data for checkpoints and ``summary.json``: metric, value, updates, the
        updates in a row so far, the greedy checks so far and the step it stopped at (None: it
        did not stop early)."""
        return {"metric": self.metric, "value": self.value, "updates": self.updates,
                "in_a_row": self.in_a_row, "checks": self.checks, "steps": self.steps}
