"""Specification of the data-parallel scaling benchmark's rows and table
(benchmarks/scaling.py); the measurements themselves are benchmarks.run's."""

import argparse

import pytest

from benchmarks.run import combine
from benchmarks.scaling import parse_row, table


def test_rows_name_ranks_threads_and_device():
    assert parse_row("2x1") == (2, 1, "cpu")
    assert parse_row("1x16") == (1, 16, "cpu")
    assert parse_row("2x4:cuda") == (2, 4, "cuda")
    for bad in ("2", "0x1", "2x", "ax1", "2x1:tpu"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected env, RxT or RxT:cuda"):
            parse_row(bad)


def row(name, sps, ranks=1, threads=1):
    return {"name": name, "base": None if name == "1x1" else "1x1", "sps": sps,
            "ranks": ranks, "threads": threads, "device": "cpu", "peak_rss_mib": 300.0,
            "share": {"env": 0.2, "inference": 0.3, "update": 0.5},
            "max_abs_first_minibatch_kl": 1e-10}


def test_table_gives_each_row_as_a_ratio_to_one_rank_of_one_thread():
    rounds = [[row("1x1", 100), row("2x1", 180, ranks=2)],
              [row("1x1", 50), row("2x1", 95, ranks=2)]]  # a slow moment of the host
    lines = table(combine(rounds)).splitlines()
    assert lines[2].startswith("| 1x1 | 1 x 1 | cpu | ")
    assert lines[3].startswith("| 2x1 | 2 x 1 | cpu | ") and "| 1.90x |" in lines[3]
    assert "| 1.80x |" in table(rounds[0])
