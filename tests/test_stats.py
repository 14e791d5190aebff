"""Confidence intervals over seeds: Student t intervals (BCa bootstrap from 10 seeds) of the leaderboard's means and paired
differences between defenses (``fedbench leaderboard --vs``)."""

from __future__ import annotations

import io
import json
import math

import pandas as pd
import pytest
from click.testing import CliRunner

from fedbench import leaderboard as lb
from fedbench.cli import main
from fedbench.stats import BOOTSTRAP_MIN, interval, paired_difference, t_interval
from fedbench.store import Store
from result_stores import fill_two_seeds, put

T_975_DF1 = 12.706204736174705  # Student t quantiles, from a table
T_975_DF2 = 4.302652729749464


@pytest.fixture
def store_path(tmp_path):
    """Two seeds of poison against fedavg and wbc (the numbers of test_leaderboard's store)."""
    return fill_two_seeds(tmp_path / "runs.db")


def test_t_interval_of_three_known_values_is_mean_plus_minus_t_times_standard_error():
    low, high = t_interval([1.0, 2.0, 3.0])
    half = T_975_DF2 * 1.0 / math.sqrt(3)  # sample std 1
    assert (low, high) == pytest.approx((2 - half, 2 + half), abs=1e-9)
    assert half == pytest.approx(2.4841, abs=1e-4)


def test_one_seed_has_no_interval_not_a_zero_width_one(tmp_path):
    assert all(math.isnan(v) for v in t_interval([0.7]))
    assert all(math.isnan(v) for v in t_interval([0.7, math.nan]))
    path = tmp_path / "one.db"
    with Store.open(path) as store:
        put(store, "none", "fedavg", 0, 0.9)
        put(store, "poison", "fedavg", 0, 0.7, success=[0.1, 0.9, 0.8, 0.7], mitigation=[(2, True)])
        cells = lb.cell_frame(store)
    board = lb.build(cells)
    assert math.isnan(board.loc[0, "score_ci_low"]) and math.isnan(board.loc[0, "poison/accuracy_ci_high"])
    text = lb.render(board, "md", cells, spread="ci")
    assert "0.700 [n/a]" in text and "[0.700, 0.700]" not in text


def test_equal_values_give_the_point_as_interval():
    assert t_interval([0.25, 0.25, 0.25]) == (0.25, 0.25)


# mitigation rounds of 12 seeds: mostly 1, a long tail -- the kind of values a t interval misreads
SKEWED = [1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 7, 12]


def test_from_ten_seeds_on_the_interval_is_scipys_bca_bootstrap_with_a_fixed_seed():
    import numpy as np
    from scipy import stats as st

    expected = st.bootstrap((np.array(SKEWED, dtype=float),), np.mean, confidence_level=0.95, n_resamples=9999,
                            method="BCa", random_state=np.random.default_rng(0)).confidence_interval
    low, high = interval(SKEWED)
    assert (low, high) == (pytest.approx(expected.low, abs=1e-12), pytest.approx(expected.high, abs=1e-12))
    assert interval(SKEWED) == (low, high)  # the same values, the same interval
    t_low, t_high = t_interval(SKEWED)
    mean = sum(SKEWED) / len(SKEWED)
    # the t interval is symmetric and reaches below the smallest possible mean (1); BCa follows the skew
    assert t_low < 1.0 < low and high - mean > mean - low
    assert t_high - mean == pytest.approx(mean - t_low)
    # below 10 values it stays the t interval
    assert interval(SKEWED[:9]) == t_interval(SKEWED[:9])
    assert BOOTSTRAP_MIN == 10


def test_bootstrap_of_nearly_tied_values_falls_back_to_the_percentile_interval_and_of_equal_ones_is_the_point():
    tied = [0.0] * 11 + [1.0]
    low, high = interval(tied)
    assert 0.0 <= low <= sum(tied) / 12 <= high <= 1.0 and not math.isnan(low)
    assert interval([0.3] * 12) == (0.3, 0.3)
    assert paired_difference(dict(enumerate(SKEWED)), dict(enumerate(SKEWED))).low == 0.0


def test_an_interval_is_cut_to_the_range_its_quantity_can_take():
    # success peaks 0.9, 1, 1: the t interval reaches 1.11, a rate's mean cannot
    low, high = interval([0.9, 1.0, 1.0], bounds=(0.0, 1.0))
    assert low == pytest.approx(t_interval([0.9, 1.0, 1.0])[0]) and high == 1.0
    assert interval([0, 0, 3], bounds=(0.0, math.inf))[0] == 0.0  # mitigation rounds
    assert all(math.isnan(v) for v in interval([0.5], bounds=(0.0, 1.0)))  # still no interval from one seed
    assert lb.bounds_of("poison/success_peak") == (0.0, 1.0) and lb.bounds_of("clean_cost") == (-1.0, 1.0)
    assert lb.bounds_of("poison/mitigation_max") == (0.0, math.inf) and lb.bounds_of("score") == (0.0, 1.0)


def test_leaderboard_exports_ci_columns_beside_mean_and_std(store_path):
    csv = pd.read_csv(io.StringIO(CliRunner().invoke(main, ["leaderboard", "--store", str(store_path),
                                                            "--format", "csv"]).output)).set_index("defense")
    cols = list(csv.columns)
    assert cols[cols.index("score_mean"):cols.index("score_mean") + 4] == ["score_mean", "score_std", "score_ci_low",
                                                                            "score_ci_high"]
    # wbc's score per seed: 0.48 and 0.42 -> mean 0.45, standard error 0.03, t(0.975, 1 df) = 12.71
    half = T_975_DF1 * 0.03
    assert csv.loc["wbc", "score_ci_low"] == pytest.approx(0.45 - half)
    assert csv.loc["wbc", "score_ci_high"] == pytest.approx(0.45 + half)
    assert {"poison/success_avg_ci_low", "clean_accuracy_ci_high"} <= set(cols)
    records = json.loads(CliRunner().invoke(main, ["leaderboard", "--store", str(store_path), "--format", "json"]).output)
    assert records[0]["defense"] == "wbc" and records[0]["score_ci_high"] == pytest.approx(0.45 + half)


def test_paired_difference_of_a_defense_against_itself_is_exactly_zero(store_path):
    with Store.read(store_path) as store:
        diff = lb.compare(lb.cell_frame(store), "wbc").set_index("defense")
    for col in ("score", "clean_accuracy", "poison/accuracy", "poison/success_avg"):
        assert diff.loc["wbc", f"{col}_diff"] == 0.0
        assert (diff.loc["wbc", f"{col}_diff_ci_low"], diff.loc["wbc", f"{col}_diff_ci_high"]) == (0.0, 0.0)
        assert diff.loc["wbc", f"{col}_diff_n"] == 2
    same = paired_difference({0: 0.3, 1: 0.5, 2: 0.9}, {0: 0.3, 1: 0.5, 2: 0.9})
    assert (same.mean, same.low, same.high, same.n, same.significant) == (0.0, 0.0, 0.0, 3, False)


def test_paired_difference_pairs_values_by_seed():
    d = paired_difference({0: 0.9, 1: 0.6, 2: 0.3, 3: 0.1}, {0: 0.8, 1: 0.5, 2: 0.1})  # seed 3 has no partner
    assert d.n == 3 and d.mean == pytest.approx(0.4 / 3)
    diffs = [0.1, 0.1, 0.2]
    mean, sd = sum(diffs) / 3, math.sqrt(sum((x - 0.4 / 3) ** 2 for x in diffs) / 2)
    assert (d.low, d.high) == pytest.approx((mean - T_975_DF2 * sd / math.sqrt(3), mean + T_975_DF2 * sd / math.sqrt(3)))
    one = paired_difference({0: 0.9}, {0: 0.5})
    assert one.mean == pytest.approx(0.4) and math.isnan(one.low) and not one.significant


def test_leaderboard_vs_prints_paired_differences_and_marks_those_excluding_zero(store_path):
    result = CliRunner().invoke(main, ["leaderboard", "--store", str(store_path), "--vs", "fedavg", "--format", "md"])
    assert result.exit_code == 0, result.output
    # score per seed: wbc 0.48, 0.42; fedavg 0.14, 0.12 -> differences 0.34, 0.30: mean 0.32, se 0.02
    low, high = 0.32 - T_975_DF1 * 0.02, 0.32 + T_975_DF1 * 0.02
    wbc_row = next(line for line in result.output.splitlines() if line.startswith("| wbc |"))
    assert f"+0.320 [{low:+.3f}, {high:+.3f}]*" in wbc_row
    assert "| fedavg | +0.000 [+0.000, +0.000] |" in result.output
    assert "Paired difference to fedavg" in result.output and "paired by seed" in result.output
    csv = pd.read_csv(io.StringIO(CliRunner().invoke(
        main, ["leaderboard", "--store", str(store_path), "--vs", "fedavg", "--format", "csv"]).output)).set_index("defense")
    assert csv.loc["wbc", "score_diff"] == pytest.approx(0.32) and csv.loc["wbc", "score_diff_ci_low"] == pytest.approx(low)
    assert (csv["vs"] == "fedavg").all()
    table = CliRunner().invoke(main, ["leaderboard", "--store", str(store_path), "--vs", "fedavg", "--ci"])
    assert table.exit_code == 0 and "score Δ" in table.output and "95% Student t" in table.output


def test_leaderboard_vs_an_unknown_defense_is_a_clear_error(store_path):
    result = CliRunner().invoke(main, ["leaderboard", "--store", str(store_path), "--vs", "krum"])
    assert result.exit_code == 2 and "--vs krum" in result.output and "fedavg, wbc" in result.output
