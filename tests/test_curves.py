"""Specification of the learning-curve helpers (benchmarks/curves.py)."""

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from benchmarks.curves import band, plot_curves, read_scalars, smooth


def test_smooth_is_a_trailing_moving_average():
    assert np.allclose(smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    assert np.array_equal(smooth(np.array([1.0, 2.0]), 1), [1.0, 2.0])


def test_band_interpolates_curves_onto_a_common_grid():
    a = (np.array([0.0, 10.0]), np.array([0.0, 1.0]))
    b = (np.array([0.0, 5.0, 8.0]), np.array([1.0, 1.0, 1.0]))
    grid, mean, low, high = band([a, b], points=5)
    assert np.allclose(grid, [0, 2, 4, 6, 8])  # ends where the shortest curve ends
    assert np.allclose(low, [0.0, 0.2, 0.4, 0.6, 0.8]) and np.allclose(high, 1.0)
    assert np.allclose(mean, (low + high) / 2)


def test_read_scalars_keeps_the_last_write_of_a_step_and_plots(tmp_path):
    writer = SummaryWriter(str(tmp_path / "run"))
    for step, value in ((10, 0.1), (20, 0.2), (20, 0.3), (30, 0.4)):
        writer.add_scalar("charts/success_rate", value, step)
    writer.close()
    steps, values = read_scalars(tmp_path / "run", "charts/success_rate")
    assert steps.tolist() == [10, 20, 30] and np.allclose(values, [0.1, 0.3, 0.4])
    assert len(read_scalars(tmp_path / "run", "missing")[0]) == 0
    plot_curves({"run": [(steps, values)]}, tmp_path / "curve.png", "title", "success")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
