"""The ``fedbench`` command: version, listing, running, JSON output and how errors reach the user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import ClassVar

import pytest
import torch
import torchvision
from click.testing import CliRunner

import fedbench
from fedbench.cli import main


def invoke(*args: str):
    # a wide console, so that table rows of `fedbench list` are not wrapped
    return CliRunner(env={"COLUMNS": "300"}).invoke(main, list(args))


def assert_clean_usage_error(result, fragment: str) -> str:
    """Exit code 2, no traceback, one ``Error:`` line that contains ``fragment``; returns that line."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), "an exception escaped instead of a clean exit"
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0]
    return errors[0]


def test_version_is_the_installed_distributions():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output == f"fedbench, version {metadata.version('fedbench-suite')}\n"


def test_help_names_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "run" in result.output and "list" in result.output


# --------------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------------
def test_list_without_a_kind_shows_every_kind():
    result = invoke("list")
    assert result.exit_code == 0, result.output
    for title in ("Attacks", "Client defenses", "Aggregators", "Datasets", "Models", "Partitions"):
        assert title in result.stdout


def row_of(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"│ {name} "))


def test_list_datasets_shows_parameters_and_origin():
    result = invoke("list", "datasets")
    assert result.exit_code == 0, result.output
    row = row_of(result.stdout, "digits")
    assert "test_size=300 (an integer >= 1)" in row
    assert "scikit-learn's embedded 8x8 handwritten digits" in row
    assert row.rstrip("│ ").endswith("fedbench (core)")


def test_list_datasets_shows_default_model_and_scenario_defaults():
    result = invoke("list", "datasets")
    row = row_of(result.stdout, "digits")
    assert "model: mlp" in row
    assert "num_clients=20" in row and "lr=0.05" in row


def test_list_defenses_includes_the_aggregators():
    result = invoke("list", "defenses")
    assert result.exit_code == 0, result.output
    assert "Client defenses" in result.stdout and "Aggregators" in result.stdout
    assert "fedavg" in result.stdout


@pytest.mark.parametrize("kind", ["partitions", "partition", "PARTITIONS"])
def test_list_accepts_singular_plural_and_any_case(kind):
    result = invoke("list", kind)
    assert result.exit_code == 0, result.output
    assert "dirichlet" in result.stdout and "per_client=2 (an integer >= 1)" in result.stdout


def test_unknown_list_kind_is_a_clean_error():
    line = assert_clean_usage_error(invoke("list", "gizmos"), "unknown kind 'gizmos'")
    assert "attacks" in line and "partitions" in line


# --------------------------------------------------------------------------------------------------
# run: errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--attack", "nope"], "known attacks: "),
        (["--defense", "nope"], "known defenses, pre-aggregators and aggregators: "),
        (["--defense", "fedavg+fedavg"], "2 aggregators"),
        (["--partition", "shards:per_client=zero"], "parameter 'per_client' got 'zero'; allowed: an integer >= 1"),
        (["--partition", "shards:per_clients=3"], "unknown parameter 'per_clients'"),
        (["--partition", "shards:per_client"], "expected key=value"),
        (["--dataset", "nope"], "known datasets: "),
        (["--clients", "8"], "clients_per_round"),
        (["--lr", "0"], "lr=0.0 is not allowed"),
        (["--model", "fmnist-cnn"], "expects inputs of shape (1, 28, 28)"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_run_with_a_bad_spec_exits_2_with_one_line(args, fragment):
    result = invoke("run", "--dataset", "digits", "--rounds", "1", *args)
    assert_clean_usage_error(result, fragment)
    assert result.stderr.count("\n") == 1  # the message and nothing else


@pytest.mark.parametrize("value, fragment", [("3,x", "expected comma-separated round numbers"), ("0,4", "rounds count from 1")])
def test_bad_attack_rounds_is_a_usage_error(value, fragment):
    line = assert_clean_usage_error(invoke("run", "--attack-rounds", value, "--rounds", "1"), fragment)
    assert "--attack-rounds" in line


def test_unknown_protocol_is_a_usage_error():
    assert_clean_usage_error(invoke("run", "--protocol", "authors"), "'authors' is not one of 'paper', 'reference-code'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_exits_2_with_advice():
    line = assert_clean_usage_error(invoke("run", "--device", "cuda", "--rounds", "1"), "no CUDA GPU")
    assert "--device cpu" in line


def test_missing_dataset_exits_2_naming_the_folder(monkeypatch, tmp_path):
    def refuse(self, *args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", refuse)
    result = invoke("run", "--dataset", "fmnist", "--data-dir", str(tmp_path / "empty"), "--rounds", "1")
    assert_clean_usage_error(result, str(tmp_path / "empty"))


def test_errors_from_the_installed_command_carry_no_traceback():
    command = shutil.which("fedbench")
    argv = [command] if command else [sys.executable, "-m", "fedbench.cli"]
    env = {**os.environ, "FEDBENCH_PLUGINS": "fedavg"}
    proc = subprocess.run([*argv, "run", "--attack", "nope", "--rounds", "1"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == ("Error: unknown attack 'nope'; known attacks: none "
                           "(FEDBENCH_PLUGINS=fedavg loads only those plugins and the core)\n")


# --------------------------------------------------------------------------------------------------
# run: output
# --------------------------------------------------------------------------------------------------
def test_run_json_prints_only_parseable_json():
    result = invoke("run", "--dataset", "digits", "--rounds", "2", "--seed", "4", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)  # the whole of stdout is the JSON document
    assert 0.0 <= payload["final_accuracy"] <= 1.0
    assert [row["round"] for row in payload["rounds"]] == [1, 2]
    assert payload["final_accuracy"] == payload["rounds"][-1]["accuracy"]
    assert payload["status"] == "ok"
    cell = fedbench.CellSpec.from_dict(payload["cell"])
    assert cell.seed == 4 and cell.rounds == 2
    assert payload["hash"] == cell.hash()


def test_run_passes_scenario_options_into_the_cell():
    result = invoke("run", "--dataset", "digits", "--rounds", "1", "--clients", "12", "--malicious", "2",
                    "--per-round", "4", "--epochs", "2", "--batch-size", "16", "--lr", "0.1", "--momentum", "0.5",
                    "--data-frac", "0.5", "--attack-rounds", "1", "--eval", "full", "--partition", "dirichlet:alpha=2",
                    "--protocol", "reference-code", "--json")
    assert result.exit_code == 0, result.output
    cell = json.loads(result.stdout)["cell"]
    assert cell["scenario"] == {**cell["scenario"], "num_clients": 12, "num_malicious": 2, "clients_per_round": 4,
                                "local_epochs": 2, "batch_size": 16, "lr": 0.1, "momentum": 0.5,
                                "client_data_frac": 0.5, "attack_rounds": [1], "eval": "full"}
    assert cell["partition"]["params"] == {"alpha": 2.0}
    assert cell["protocol"] == "reference-code"


def test_run_prints_rounds_and_a_summary():
    result = invoke("run", "--dataset", "digits", "--rounds", "2")
    assert result.exit_code == 0, result.output
    assert "round    1" in result.stdout and "round    2" in result.stdout
    assert "final benign accuracy" in result.stdout


def test_run_quiet_prints_only_the_summary():
    result = invoke("run", "--dataset", "digits", "--rounds", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert "round    1" not in result.output and "protocol paper" not in result.output
    assert "final benign accuracy (full test set)" in result.stdout and "wall time" in result.stdout


@dataclass(kw_only=True)
class Destroyer(fedbench.Aggregator):
    """Test aggregator that makes the model non-finite."""

    name: ClassVar[str] = "test-destroy"

    def aggregate(self, updates, weights, ctx):
        return torch.full((updates.shape[1],), float("inf"))


@dataclass(kw_only=True)
class Silent(fedbench.Attack):
    """Test attack that trains honestly and reports no success metric."""

    name: ClassVar[str] = "test-silent"


class CliPlugin:
    @fedbench.hookimpl
    def register_aggregators(self, register):
        register(Destroyer)

    @fedbench.hookimpl
    def register_attacks(self, register):
        register(Silent)


def test_diverged_run_exits_1(use_plugin):
    use_plugin(CliPlugin(), "cli-test")
    result = invoke("run", "--dataset", "digits", "--defense", "test-destroy", "--rounds", "3")
    assert result.exit_code == 1
    assert "diverged" in result.output and "round 1" in result.output


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def test_run_json_is_strict_json_when_the_attack_reports_no_success(use_plugin):
    use_plugin(CliPlugin(), "cli-test")
    result = invoke("run", "--dataset", "digits", "--attack", "test-silent", "--attack-rounds", "1", "--rounds", "2",
                    "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout, parse_constant=_refuse_constant)
    assert payload["adversarial_rounds"] == [1]


# --------------------------------------------------------------------------------------------------
# run: what reaches the screen or the pipe
# --------------------------------------------------------------------------------------------------
def round_lines(output: str) -> dict[int, str]:
    return {int(line.split()[1]): line for line in output.splitlines() if line.startswith("round ")}


def test_adversarial_rounds_are_marked_in_the_per_round_lines():
    result = invoke("run", "--rounds", "3", "--attack", "poison", "--attack-rounds", "2")
    assert result.exit_code == 0, result.output
    lines = round_lines(result.stdout)
    assert lines[2].startswith("round    2 [attack]  accuracy=")
    assert "[attack]" not in lines[1] + lines[3]


@dataclass(kw_only=True)
class Markup(fedbench.Attack):
    """Test attack whose name looks like rich markup (a closing tag with nothing to close)."""

    name: ClassVar[str] = "mark[/]"


class MarkupPlugin:
    @fedbench.hookimpl
    def register_attacks(self, register):
        register(Markup)


def test_names_from_plugins_are_printed_literally_not_as_markup(use_plugin):
    use_plugin(MarkupPlugin(), "markup-test")
    result = invoke("run", "--rounds", "2", "--attack", "mark[/]", "--attack-rounds", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("digits mark[/] vs fedavg seed=0 · protocol paper · 2 rounds · cell ")
    assert round_lines(result.stdout)[1].startswith("round    1 [attack]")


def test_piped_output_is_one_record_per_line_whatever_the_width():
    # COLUMNS=80 is what a pipe gets by default; the header and the round lines here are longer
    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, [
        "run", "--rounds", "3", "--attack", "poison:images=2,lam=0.5", "--attack-rounds", "2",
        "--defense", "cma+wbc:s=0.2", "--partition", "dirichlet:alpha=0.5"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    label = "digits poison:images=2,lam=0.5 vs cma+wbc:s=0.2 seed=0"
    assert lines[0].startswith(label + " · protocol paper · 3 rounds · cell ") and len(lines[0]) > 80
    rounds = round_lines(result.stdout)
    assert sorted(rounds) == [1, 2, 3]
    assert all(len(line) > 80 and line.rstrip().endswith(tuple("0123456789")) and "misclassification=" in line
               for line in rounds.values())
    assert lines[1:4] == [rounds[1], rounds[2], rounds[3]]  # nothing wrapped onto lines of its own


# --------------------------------------------------------------------------------------------------
# run --store and export
# --------------------------------------------------------------------------------------------------
def test_run_store_records_the_cell_as_the_matrix_does(tmp_path):
    from fedbench.matrix import MatrixCell
    from fedbench.store import Store

    store = tmp_path / "runs.db"
    args = ["--rounds", "3", "--attack", "poison", "--attack-rounds", "2", "--seed", "1"]
    result = invoke("run", *args, "--store", str(store))
    assert result.exit_code == 0, result.output
    cell = fedbench.make_cell(attack="poison", attack_rounds=(2,), seed=1, rounds=3)
    assert f"recorded as cell {cell.hash()} in {store}" in result.stdout
    with Store.read(store) as st:
        (record,) = st.cells()
        assert (record.key, record.status, record.attempts) == (cell.hash(), "ok", 1)
        assert record.label == MatrixCell(cell).info()["label"] and record.spec == cell.to_dict()
        assert st.provenance(record.key)["fedbench"] == fedbench.__version__
    board, rounds = fedbench.load_results(store)
    assert list(board["defense"]) == ["fedavg"] and list(rounds["round"]) == [1, 2, 3]
    assert invoke("leaderboard", "--store", str(store)).exit_code == 0
    # the matrix over the same setting takes the cell from the store instead of running it again
    listing = invoke("matrix", "--attacks", "poison", "--defenses", "fedavg", "--seeds", "1", "--rounds", "3",
                     "--attack-rounds", "2", "--store", str(store), "--dry-run")
    assert f"{cell.hash()}  ok " in listing.stdout
    # --json keeps stdout a JSON document; the record is replaced, not duplicated
    again = invoke("run", *args, "--store", str(store), "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["hash"] == cell.hash()
    with Store.read(store) as st:
        assert [(r.key, r.attempts) for r in st.cells()] == [(cell.hash(), 2)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")) == []


def test_run_store_with_missing_data_stores_nothing(monkeypatch, tmp_path):
    def refuse(self, *args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", refuse)
    store = tmp_path / "runs.db"
    result = invoke("run", "--dataset", "fmnist", "--data-dir", str(tmp_path / "nowhere"), "--rounds", "1",
                    "--store", str(store))
    assert_clean_usage_error(result, "no FashionMNIST/raw/ under")
    assert list(tmp_path.iterdir()) == []


def test_export_writes_per_round_metrics_and_cells_with_their_labels(tmp_path):
    import pandas as pd

    store = tmp_path / "runs.db"
    for defense in ("fedavg", "wbc"):
        result = invoke("run", "--rounds", "3", "--attack", "poison", "--attack-rounds", "2", "--defense", defense,
                        "--store", str(store), "--quiet")
        assert result.exit_code == 0, result.output
    wide, long, cells = tmp_path / "rounds.csv", tmp_path / "long.csv", tmp_path / "cells.csv"
    result = invoke("export", "--store", str(store), "--rounds", str(wide), "--cells", str(cells))
    assert result.exit_code == 0, result.output
    assert f"6 rows of per-round metrics written to {wide}" in result.stderr
    frame = pd.read_csv(wide)
    assert list(frame.columns[:14]) == ["key", "setting", "dataset", "partition", "attack", "defense", "seed",
                                        "warmup_rounds", "status", "round", "adversarial", "accuracy", "loss", "eval_n"]
    assert {"success", "confidence"} <= set(frame.columns)
    assert sorted(zip(frame["defense"], frame["round"])) == [(d, r) for d in ("fedavg", "wbc") for r in (1, 2, 3)]
    assert list(frame.loc[frame["defense"] == "wbc", "adversarial"]) == [False, True, False]

    assert invoke("export", "--store", str(store), "--rounds", str(long), "--form", "long").exit_code == 0
    tidy = pd.read_csv(long)
    assert list(tidy.columns[-4:]) == ["round", "adversarial", "metric", "value"]
    metrics = set(tidy["metric"])
    assert {"accuracy", "loss", "eval_n", "success"} <= metrics and "adversarial" not in metrics
    back = tidy.pivot_table(index=["defense", "round"], columns="metric", values="value")
    assert back.loc[("wbc", 2), "accuracy"] == pytest.approx(frame.set_index(["defense", "round"]).loc[("wbc", 2), "accuracy"])

    per_cell = pd.read_csv(cells)
    assert sorted(per_cell["defense"]) == ["fedavg", "wbc"] and (per_cell["status"] == "ok").all()
    assert {"final_accuracy", "mitigation_avg", "mitigation_avg_censored"} <= set(per_cell.columns)
    to_stdout = invoke("export", "--store", str(store), "--cells", "-")
    assert to_stdout.stdout.splitlines()[0].startswith("key,setting,")


def test_export_needs_a_target_and_an_existing_store(tmp_path):
    assert_clean_usage_error(invoke("export", "--store", str(tmp_path / "runs.db")), "nothing to export")
    assert_clean_usage_error(invoke("export", "--store", str(tmp_path / "none.db"), "--rounds", "-"), "no result store")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# help
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["run"], ["matrix"], ["leaderboard"], ["export"], ["list"]])
def test_help_is_plain_text_without_rest_markup(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "``" not in result.output


def test_list_defenses_shows_every_stage_of_a_stack_with_where_it_runs():
    result = invoke("list", "defenses")
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.index("Client defenses") < out.index("Pre-aggregators") < out.index("Aggregators")
    assert "stage: inside every benign client's local training" in out and "stage: server, before the aggregator" in out
    assert "``" not in out
    for name in ("wbc", "ldp", "clip", "nnm", "bucketing", "krum", "fltrust", "cma"):
        assert f"\n│ {name} " in out or f"┃ {name} " in out or f"│ {name} " in out
    assert invoke("list", "pre-aggregators").exit_code == 0 and "Aggregators" not in invoke("list", "preaggregators").output


def test_run_summary_says_na_for_an_attack_without_a_success_metric(toy_plugin):
    result = invoke("run", "--attack", "test-boost", "--rounds", "3", "--attack-rounds", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert "n/a (the attack reports no success metric)" in result.output
    assert "peak success" not in result.output


def test_run_store_without_the_gpu_it_asks_for_stores_nothing(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    store = tmp_path / "r.db"
    assert_clean_usage_error(invoke("run", "--device", "cuda", "--rounds", "1", "--store", str(store)), "no CUDA GPU")
    assert not store.exists()
