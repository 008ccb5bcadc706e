"""Specification of the throughput benchmark's --repeat rounds (benchmarks/run.py)."""

from benchmarks.run import combine, table


def row(name, sps, base=None):
    return {"name": name, "what": name, "base": base, "sps": sps, "peak_rss_mib": 1.0,
            "share": {"env": 0.2, "inference": 0.3, "update": 0.5}}


def test_repeated_rounds_report_median_sps_and_median_paired_ratio():
    rounds = [[row("a", 100), row("b", 50, "a")],
              [row("a", 200), row("b", 120, "a")],   # a fast moment of the host
              [row("a", 150), row("b", 60, "a")]]
    a, b = combine(rounds)
    assert a["sps"] == 150 and a["sps_rounds"] == [100, 200, 150]
    assert b["sps"] == 60 and b["vs"] == 0.5  # ratios 0.5, 0.6, 0.4 within the rounds
    assert "| b | b | 60 | 0.50x a |" in table([a, b])


def test_one_round_is_reported_as_measured():
    rounds = [[row("a", 100), row("b", 50, "a")]]
    assert combine(rounds) == rounds[0]
    assert "| b | b | 50 | 0.50x a |" in table(rounds[0])
