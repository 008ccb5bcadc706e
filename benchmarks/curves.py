"""Learning curves from training runs: read logged scalars, plot mean and band over seeds.

    from benchmarks.curves import read_scalars, plot_curves
    curves = {"memory on": [read_scalars(run, "charts/success_rate") for run in runs_on], ...}
    plot_curves(curves, Path("curve.png"), "MiniGrid-MemoryS9", "training success rate")

A curve is ``(steps, values)``: two 1-D numpy arrays, x = environment steps (all envs
together, as the trainer logs them). Runs are TensorBoard run directories written by
``python -m trxl_rl.train`` (``runs/<run>/``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

Curve = tuple[np.ndarray, np.ndarray]


def read_scalars(run_dir: str | Path, tag: str) -> Curve:
    """Every logged value of ``tag`` in a run directory, by step (the last write of a step
    wins, so a resumed run's re-logged steps count once)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return np.zeros(0), np.zeros(0)
    by_step = {event.step: event.value for event in events.Scalars(tag)}
    steps = np.array(sorted(by_step), dtype=np.float64)
    return steps, np.array([by_step[s] for s in sorted(by_step)], dtype=np.float64)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (fewer at the start)."""
    if window <= 1 or len(values) == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


def band(curves: list[Curve], points: int = 200) -> tuple[np.ndarray, ...]:
    """Mean, min and max over curves on a common grid of steps (each curve interpolated
    linearly; the grid ends where the shortest curve ends).

    :return: ``(grid, mean, low, high)``, each ``[points]``.
    """
    curves = [c for c in curves if len(c[0])]
    start = max(c[0][0] for c in curves)
    end = min(c[0][-1] for c in curves)
    grid = np.linspace(start, end, points)
    stacked = np.stack([np.interp(grid, steps, values) for steps, values in curves])
    return grid, stacked.mean(0), stacked.min(0), stacked.max(0)


def plot_curves(groups: dict[str, list[Curve]], path: Path, title: str, ylabel: str,
                window: int = 5) -> None:
    """One line per group (the mean over its curves, each smoothed over ``window`` logged
    points) and a shaded band from the lowest to the highest curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, curves in groups.items():
        curves = [(steps, smooth(values, window)) for steps, values in curves if len(steps)]
        if not curves:
            continue
        grid, mean, low, high = band(curves)
        line, = ax.plot(grid, mean, label=f"{label} ({len(curves)} run"
                                          f"{'s' if len(curves) > 1 else ''})")
        ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
