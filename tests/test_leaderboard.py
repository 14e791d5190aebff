"""Leaderboards from a result store: the numbers, the robustness score, censoring and every export.

The store is filled with hand-made outcomes, so every expected number can be worked out by hand."""

from __future__ import annotations

import io
import json
import math

import pandas as pd
import pytest
from click.testing import CliRunner

import fedbench
from fedbench import leaderboard as lb
from fedbench.cli import main
from fedbench.store import Store
from result_stores import ROUNDS, Sneaky, SneakyPlugin, fill_two_seeds, put

@pytest.fixture
def store_path(tmp_path):
    """Two seeds of poison against fedavg and wbc, with the clean reference cells."""
    return fill_two_seeds(tmp_path / "runs.db")


def board_of(path) -> pd.DataFrame:
    leaderboard, _ = fedbench.load_results(path)
    return leaderboard.set_index("defense")


def test_score_is_accuracy_times_one_minus_lasting_success_averaged_over_seeds(store_path):
    board = board_of(store_path)
    # wbc: success from the attack round on = (0.8, 0.2, 0.2) -> mean 0.4; seeds: 0.8 and 0.7 accuracy
    assert board.loc["wbc", "score_mean"] == pytest.approx((0.8 * 0.6 + 0.7 * 0.6) / 2)
    assert board.loc["wbc", "score_std"] == pytest.approx(math.sqrt(2 * (0.03 ** 2)))  # sample std of 0.48, 0.42
    assert board.loc["fedavg", "score_mean"] == pytest.approx((0.7 * 0.2 + 0.6 * 0.2) / 2)
    assert list(board["rank"]) == [1, 2] and list(board.index) == ["wbc", "fedavg"]
    assert board.loc["wbc", "poison/success_peak_mean"] == pytest.approx(0.8)
    assert board.loc["wbc", "poison/success_avg_mean"] == pytest.approx(0.4)
    assert (board["seeds"] == 2).all()


def test_drop_and_cost_are_against_clean_fedavg_of_the_same_seed(store_path):
    board = board_of(store_path)
    assert board.loc["wbc", "clean_accuracy_mean"] == pytest.approx(0.83)
    assert board.loc["wbc", "clean_cost_mean"] == pytest.approx(0.02)
    assert board.loc["fedavg", "clean_cost_mean"] == 0
    assert board.loc["wbc", "poison/accuracy_mean"] == pytest.approx(0.75)
    assert board.loc["wbc", "poison/drop_mean"] == pytest.approx(0.10)
    assert board.loc["fedavg", "poison/drop_mean"] == pytest.approx(0.20)
    assert board.loc["wbc", "poison/drop_std"] == pytest.approx(0.0)


def test_censored_mitigation_is_a_lower_bound_shown_as_at_least_with_a_note(store_path):
    board = board_of(store_path)
    assert board.loc["fedavg", "poison/mitigation_max_mean"] == 2 and board.loc["fedavg", "poison/mitigation_max_censored"]
    assert board.loc["wbc", "poison/mitigation_avg_mean"] == 1 and not board.loc["wbc", "poison/mitigation_avg_censored"]
    note = ("≥: at least one attack was still active when the next attack or the end of the run came; "
            "the mean (or max) of mitigation rounds is a lower bound")
    with Store.read(store_path) as store:
        cells = lb.cell_frame(store)
    text = lb.render(lb.build(cells), "md", cells)
    fedavg_row = next(line for line in text.splitlines() if line.startswith("| 2 | fedavg"))
    assert "| ≥2.0 ± 0.0 | ≥2.0 ± 0.0 |" in fedavg_row and ">" not in fedavg_row
    assert f"_{note}_" in text
    tex = lb.render(lb.build(cells), "latex", cells)
    assert r"$\geq$2.0 $\pm$ 0.0" in tex and "≥" not in tex.split("% score")[0]
    assert note in lb.render(lb.build(cells), "html", cells)
    table = CliRunner().invoke(main, ["leaderboard", "--store", str(store_path)]).output
    fedavg_line = next(line for line in table.splitlines() if " fedavg " in line)
    assert "≥2.0 ± 0.0" in fedavg_line and ">2" not in fedavg_line
    assert note in table


def test_csv_and_json_exports_keep_censoring_as_a_flag_column(store_path):
    csv = pd.read_csv(io.StringIO(CliRunner().invoke(main, ["leaderboard", "--store", str(store_path), "--format", "csv"]).output))
    by_defense = csv.set_index("defense")
    assert by_defense.loc["fedavg", "poison/mitigation_avg_mean"] == 2.0  # a number, not "≥2.0"
    assert bool(by_defense.loc["fedavg", "poison/mitigation_avg_censored"]) is True
    assert bool(by_defense.loc["wbc", "poison/mitigation_avg_censored"]) is False
    records = json.loads(CliRunner().invoke(main, ["leaderboard", "--store", str(store_path), "--format", "json"]).output)
    assert {r["defense"]: r["poison/mitigation_max_censored"] for r in records} == {"fedavg": True, "wbc": False}


def test_diverged_cell_scores_zero_and_failed_cell_leaves_its_seed_unscored(tmp_path):
    path = tmp_path / "runs.db"
    with Store.open(path) as store:
        put(store, "none", "fedavg", 0, 0.9)
        put(store, "poison", "fedavg", 0, 0.5, success=[0, 1, 1, 1], mitigation=[(2, True)])
        put(store, "none", "cma", 0, 0.9)
        put(store, "poison", "cma", 0, 0.1, status="diverged", message="non-finite loss or parameters in round 3")
        put(store, "none", "wbc", 0, 0.9)
        put(store, "poison", "wbc", 0, math.nan, status="failed", message="RuntimeError: oops")
    board = board_of(path)
    assert board.loc["cma", "score_mean"] == 0 and board.loc["cma", "poison/accuracy_mean"] == pytest.approx(0.1)
    assert board.loc["cma", "poison/status"] == "1 diverged"
    assert math.isnan(board.loc["wbc", "score_mean"]) and board.loc["wbc", "seeds"] == 0
    assert board.loc["wbc", "poison/status"] == "1 failed" and board.loc["wbc", "rank"] == 3
    result = CliRunner().invoke(main, ["leaderboard", "--store", str(path)])
    assert result.exit_code == 0
    assert "diverged: poison vs cma, seed 0 -- non-finite loss or parameters in round 3" in result.output
    assert "failed: poison vs wbc, seed 0 -- RuntimeError: oops" in result.output


def test_csv_round_trips_through_pandas_with_the_documented_columns(store_path, tmp_path):
    out = tmp_path / "board.csv"
    result = CliRunner().invoke(main, ["leaderboard", "--store", str(store_path), "--output", str(out)])
    assert result.exit_code == 0, result.output
    back = pd.read_csv(out)
    expected = [*lb.SETTING_COLUMNS, *lb.ROW_COLUMNS, *lb.attack_columns("poison")]
    assert list(back.columns) == expected
    original, _ = fedbench.load_results(store_path)
    pd.testing.assert_frame_equal(back, original, check_dtype=False)
    assert set(back["defense"]) == {"fedavg", "wbc"} and (back["poison/status"] == "ok").all()


def test_json_export_is_the_same_table(store_path):
    result = CliRunner().invoke(main, ["leaderboard", "--store", str(store_path), "--format", "json"])
    records = json.loads(result.output)
    assert [r["defense"] for r in records] == ["wbc", "fedavg"]
    assert records[0]["poison/drop_mean"] == pytest.approx(0.10) and records[0]["protocol"] == "paper"


def test_html_export_escapes_plugin_provided_names(tmp_path):
    fedbench.register_plugin(SneakyPlugin(), name="sneaky")
    try:
        path = tmp_path / "runs.db"
        with Store.open(path) as store:
            put(store, "none", "fedavg", 0, 0.9)
            put(store, "none", Sneaky.name, 0, 0.8)
            put(store, "poison", "fedavg", 0, 0.7, success=[0, 0.5, 0.5, 0.5])
            put(store, "poison", Sneaky.name, 0, 0.6, success=[0, 0.5, 0.5, 0.5], status="diverged",
                message="<img src=x onerror=alert(1)>")
    finally:
        fedbench.unregister_plugin("sneaky")
    out = tmp_path / "board.html"
    result = CliRunner().invoke(main, ["leaderboard", "--store", str(path), "--output", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "http" not in page  # self-contained
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page and "&lt;img src=x" in page
    md = CliRunner().invoke(main, ["leaderboard", "--store", str(path), "--format", "md"]).output
    assert "<script" not in md
    tex = CliRunner().invoke(main, ["leaderboard", "--store", str(path), "--format", "latex"]).output
    assert r"\textless{}script\textgreater{}" in tex


def test_latex_export_is_a_booktabs_table_with_escaped_text(store_path):
    result = CliRunner().invoke(main, ["leaderboard", "--store", str(store_path), "--format", "latex"])
    tex = result.output
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\multicolumn{6}{c}{poison}", r"\cmidrule(lr){6-11}"):
        assert rule in tex
    assert r"\#" in tex and r"$\pm$" in tex and "±" not in tex.split("% score")[0]
    assert tex.count(r"\begin{tabular}") == 1 and r"0.750 $\pm$ 0.071" in tex


def test_leaderboard_states_the_protocol_that_produced_it(tmp_path):
    path = tmp_path / "runs.db"
    with Store.open(path) as store:
        put(store, "none", "fedavg", 0, 0.9)
        put(store, "none", "fedavg", 0, 0.8, warmup=2)
    board, _ = fedbench.load_results(path)
    assert len(board) == 2 and sorted(board["warmup_rounds"]) == [0, 2]
    paper, warm = sorted(board["setting"], key=len)
    assert paper.startswith("protocol paper (attacks and defenses from round 1)")
    assert "warm start: 2 rounds of clean FedAvg, then attacks and defenses from round 3 (not the paper's protocol)" in warm
    md = CliRunner().invoke(main, ["leaderboard", "--store", str(path), "--format", "md"]).output
    assert md.count("**Setting: protocol paper") == 2


def test_load_results_gives_the_leaderboard_and_per_round_metrics(store_path):
    board, rounds = fedbench.load_results(store_path)
    assert len(board) == 2 and len(rounds) == 8 * ROUNDS
    assert list(rounds.columns[:14]) == ["key", "setting", "dataset", "partition", "attack", "defense", "seed",
                                         "warmup_rounds", "status", "round", "adversarial", "accuracy", "loss", "eval_n"]
    poisoned = rounds[(rounds["attack"] == "poison") & (rounds["defense"] == "wbc") & (rounds["seed"] == 0)]
    assert list(poisoned["success"]) == [0.1, 0.8, 0.2, 0.2] and list(poisoned["adversarial"]) == [False, True, False, False]
    assert rounds["eval_n"].dtype == "Int64"


def test_leaderboard_of_a_missing_store_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["leaderboard", "--store", str(tmp_path / "none.db")])
    assert result.exit_code == 2 and "no result store" in result.output
    assert not (tmp_path / "none.db").exists()


def test_an_attack_without_a_success_metric_is_left_out_of_the_score_and_shown_as_na(tmp_path):
    with Store.open(tmp_path / "r.db") as store:
        put(store, "none", "fedavg", 0, 0.9)
        put(store, "poison", "fedavg", 0, 0.8, success=[0.0, 0.6, 0.4, 0.2], mitigation=[(2, True)])
        put(store, "backdoor", "fedavg", 0, 0.7)  # reports no success metric
        frame = lb.cell_frame(store)
    board = lb.build(frame)
    row = board.iloc[0]
    assert row["score_mean"] == pytest.approx(0.8 * (1 - 0.4))  # the poison term alone, not (0.48 + 0.7) / 2
    assert math.isnan(row["backdoor/success_avg_mean"]) and math.isnan(row["backdoor/mitigation_avg_mean"])
    assert row["backdoor/accuracy_mean"] == pytest.approx(0.7)


def test_with_no_attack_that_measures_success_the_score_is_na(tmp_path):
    with Store.open(tmp_path / "r.db") as store:
        put(store, "none", "fedavg", 0, 0.9)
        put(store, "backdoor", "fedavg", 0, 0.7)
        board = lb.build(lb.cell_frame(store))
    assert math.isnan(board.iloc[0]["score_mean"]) and board.iloc[0]["seeds"] == 0
