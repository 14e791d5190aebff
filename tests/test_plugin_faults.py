"""A plugin whose code raises inside a round: its cell fails with a message that names the plugin
(and the component, and where the plugin came from), in the matrix and in fedbench run; an error
the core raises itself keeps its own message.

The raising plugins live in tests/plugins_that_raise.py, importable by worker processes."""

from __future__ import annotations

import importlib
from importlib import metadata

import pytest
import torch
from click.testing import CliRunner

import fedbench
from fedbench.cli import main
from fedbench.executors import culprit, failure_of
from fedbench.plugins import plugin_of_module
from fedbench.store import Store

PLUGIN = "plugins_that_raise"
raising = importlib.import_module(PLUGIN)
SCENARIO = ["--rounds", "3", "--attack-rounds", "2"]
ATTACK_RAISED = (f"attack 'test-broken' of plugin '{PLUGIN}' (registered directly) raised "
                 "ValueError: the broken attack gives up in round 2")
AGGREGATOR_RAISED = f"aggregator 'test-broken-mean' of plugin '{PLUGIN}' (registered directly) raised RuntimeError: einsum()"
CORE_RAISED = "FedbenchError: attack 'test-wrong-shape' returned updates of shape (5, "


@pytest.fixture
def plugin(use_plugin):
    return use_plugin(raising, PLUGIN)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_plugin_that_raises_in_a_round_fails_its_cells_with_a_message_naming_it(plugin, tmp_path, jobs):
    store = tmp_path / "runs.db"
    result = CliRunner().invoke(main, ["matrix", "--attacks", "poison,test-broken,test-wrong-shape",
                                       "--defenses", "test-broken-mean", *SCENARIO, "--jobs", str(jobs),
                                       "--store", str(store)])
    assert result.exit_code == 1, result.output  # as for any failed cell: the leaderboard, then exit 1
    with Store.read(store) as st:
        cells = {(r.attack, r.defense): r for r in st.cells()}
    assert {pair for pair, r in cells.items() if r.status == "ok"} == {("none", "fedavg"), ("poison", "fedavg")}
    assert cells[("test-broken", "fedavg")].message == ATTACK_RAISED
    for attack in ("none", "poison", "test-broken", "test-wrong-shape"):  # the aggregator raises in round 1
        assert cells[(attack, "test-broken-mean")].message.startswith(AGGREGATOR_RAISED), attack
        assert "_weighted" in cells[(attack, "test-broken-mean")].error  # the traceback is kept
    assert cells[("test-wrong-shape", "fedavg")].message.startswith(CORE_RAISED)  # the core's check: as before
    assert f"failed: test-broken vs fedavg, seed 0 -- {ATTACK_RAISED}" in result.output


def test_fedbench_run_prints_the_traceback_then_one_line_naming_the_plugin_and_exits_1(plugin, tmp_path):
    store = tmp_path / "runs.db"
    result = CliRunner().invoke(main, ["run", "--attack", "test-broken", *SCENARIO, "--store", str(store), "--json"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == f"Error: {ATTACK_RAISED}"
    assert "Traceback" in result.stderr and "in malicious_updates" in result.stderr
    with Store.read(store) as st:
        (record,) = st.cells()
    assert record.status == "failed" and record.message == ATTACK_RAISED

    result = CliRunner().invoke(main, ["run", "--defense", "test-broken-mean", *SCENARIO, "--quiet"])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith(f"Error: {AGGREGATOR_RAISED}")
    assert "Summary" not in result.stdout


def test_an_error_the_core_raises_in_fedbench_run_stays_one_line_and_exit_2(plugin):
    result = CliRunner().invoke(main, ["run", "--attack", "test-wrong-shape", *SCENARIO, "--quiet"])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: attack 'test-wrong-shape' returned updates of shape (5, ")
    assert "Traceback" not in result.stderr and "plugin" not in result.stderr


def test_an_entry_point_plugin_is_named_with_its_entry_point_and_distribution():
    from fedbench_plugins.krum import Krum

    with pytest.raises(IndexError) as caught:
        Krum(f=1).aggregate(torch.zeros(7), torch.ones(7), fedbench.ServerContext())  # a vector, not a stack
    version = metadata.version("fedbench-suite")
    where = f"entry point fedbench.krum = fedbench_plugins.krum, fedbench-suite {version}"
    assert culprit(caught.value) == f"aggregator 'krum' of plugin 'krum' ({where})"
    assert failure_of(caught.value)["message"].startswith(f"aggregator 'krum' of plugin 'krum' ({where}) raised IndexError: ")


def test_the_core_and_foreign_code_belong_to_no_plugin(plugin, toy_plugin):
    assert plugin_of_module("fedbench_plugins.poison")[0] == "poison"
    assert plugin_of_module(PLUGIN) == (PLUGIN, "registered directly")
    assert plugin_of_module("conftest") == ("toy", "registered directly")  # an object plugin: its class's module
    for module in ("fedbench", "fedbench.engine", "fedbench.builtins", "torch.functional", "builtins", None):
        assert plugin_of_module(module) is None, module
    with pytest.raises(ZeroDivisionError) as caught:
        1 / 0
    assert culprit(caught.value) is None and failure_of(caught.value)["message"] == "ZeroDivisionError: division by zero"
