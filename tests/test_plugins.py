"""The plugin system: entry points, FEDBENCH_PLUGINS, direct registration, hooks and registry checks."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner

import fedbench
import fedbench.plugins
from fedbench import FedbenchError, UnknownComponentError, make_cell, parse_component, run_cell
from fedbench.cli import main
from fedbench.plugins import get_manager, registry

REPO = Path(__file__).resolve().parents[1]


def installed_entry_points() -> list[str]:
    return sorted(ep.name for ep in metadata.entry_points(group="fedbench"))


# --------------------------------------------------------------------------------------------------
# Entry points and FEDBENCH_PLUGINS
# --------------------------------------------------------------------------------------------------
def test_installed_entry_points_are_the_ones_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["fedbench"]
    assert "fedavg" in declared
    assert installed_entry_points() == sorted(declared), "stale install: run `pip install -e .` again"


def test_fedbench_plugins_loads_only_the_named_entry_point(monkeypatch):
    monkeypatch.setenv("FEDBENCH_PLUGINS", "fedavg")
    fedbench.plugins.reset()
    pm = get_manager()
    assert pm.get_plugin("fedavg") is not None
    for name in set(installed_entry_points()) - {"fedavg"}:
        assert pm.get_plugin(name) is None, f"entry point {name!r} was loaded"
    reg = registry()
    origins = {entry.origin for kind in fedbench.components.KINDS for entry in reg.entries(kind).values()}
    assert {origin.split(" ")[0] for origin in origins} == {"fedbench", "fedavg"}
    assert reg.names("aggregator") == ["fedavg"]
    assert reg.names("attack") == ["none"]


def test_core_components_are_present_whatever_fedbench_plugins_says(monkeypatch):
    monkeypatch.setenv("FEDBENCH_PLUGINS", "")
    fedbench.plugins.reset()
    reg = registry()
    assert {"digits", "fmnist", "cifar10"} <= set(reg.names("dataset"))
    assert {"fmnist-cnn", "cifar-cnn", "mlp"} <= set(reg.names("model"))
    assert {"iid", "shards", "dirichlet"} <= set(reg.names("partition"))
    assert reg.names("attack") == ["none"]
    assert reg.names("aggregator") == []


def test_fedbench_plugins_tolerates_spaces_and_empty_items(monkeypatch):
    monkeypatch.setenv("FEDBENCH_PLUGINS", " fedavg , ,")
    fedbench.plugins.reset()
    assert registry().names("aggregator") == ["fedavg"]


def test_unknown_name_in_fedbench_plugins_lists_the_installed_ones(monkeypatch):
    monkeypatch.setenv("FEDBENCH_PLUGINS", "fedavg,nonesuch")
    fedbench.plugins.reset()
    with pytest.raises(FedbenchError) as err:
        registry()
    message = str(err.value)
    assert "nonesuch" in message
    installed = message.split("installed: ", 1)[1].split(", ")
    assert installed == installed_entry_points()


def test_core_package_never_imports_the_plugins_package():
    for path in sorted((REPO / "fedbench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] in ("fedbench_plugins", "plugins") for m in modules), path.name


# --------------------------------------------------------------------------------------------------
# Direct registration
# --------------------------------------------------------------------------------------------------
def test_registered_plugin_components_appear_in_the_registry(toy_plugin):
    reg = registry()
    assert "test-boost" in reg.names("attack")
    assert {"test-noise", "test-shrink"} <= set(reg.names("defense"))
    assert {"test-mean", "test-record"} <= set(reg.names("aggregator"))
    assert "test-blobs" in reg.names("dataset")
    assert reg.entries("attack")["test-boost"].origin == "toy (registered directly)"
    assert reg.kind_of("test-noise") == "defense"


def test_unregistered_plugin_is_gone(toy_plugin):
    assert "test-boost" in registry().names("attack")
    fedbench.unregister_plugin("toy")
    with pytest.raises(UnknownComponentError):
        parse_component("attack", "test-boost")


def test_direct_registration_survives_a_reset(toy_plugin):
    fedbench.plugins.reset()
    assert "test-boost" in registry().names("attack")


def test_registered_attack_is_listed_by_the_cli(toy_plugin):
    result = CliRunner().invoke(main, ["list", "attacks"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "test-boost" in line)  # a table row, maybe wrapped
    assert "boost=1.0 (a number > 0)" in row
    assert "Test attack:" in row
    assert "toy (registered directly)" in row


def test_registered_attack_runs_from_the_cli(toy_plugin):
    result = CliRunner().invoke(
        main, ["run", "--dataset", "digits", "--attack", "test-boost:boost=2", "--rounds", "2", "--attack-rounds", "1",
               "--json"],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["adversarial_rounds"] == [1]
    assert payload["cell"]["attack"] == {"kind": "attack", "name": "test-boost", "params": {"boost": 2.0}}
    calls = registry().get("attack", "test-boost").calls
    assert calls == [(1, (0, 1, 2, 3, 4))]  # digits: the paper's M = 5 malicious clients, ids 0..4


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------
class RoundLogger:
    def __init__(self):
        self.calls = []

    @fedbench.hookimpl
    def round_finished(self, cell, round, metrics):
        self.calls.append((cell, round, metrics))


class CarelessLogger:
    @fedbench.hookimpl
    def round_finished(self, cell, round, metrics):
        metrics["accuracy"] = -1.0


def test_round_finished_is_called_once_per_round_with_the_metrics(use_plugin):
    logger = use_plugin(RoundLogger(), "logger")
    cell = make_cell(dataset="digits", rounds=3)
    result = run_cell(cell)
    assert [rnd for _, rnd, _ in logger.calls] == [1, 2, 3]
    assert all(seen is cell for seen, _, _ in logger.calls)
    assert [metrics for _, _, metrics in logger.calls] == result.rounds
    assert {"accuracy", "loss", "adversarial"} <= set(logger.calls[0][2])


def test_an_observer_that_mutates_metrics_does_not_change_the_result(use_plugin):
    use_plugin(CarelessLogger(), "careless")
    result = run_cell(make_cell(dataset="digits", rounds=2))
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in result.rounds)
    assert result.final_accuracy == result.rounds[-1]["accuracy"] >= 0.0


# --------------------------------------------------------------------------------------------------
# Registry checks
# --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class NotAnAttack(fedbench.ClientDefense):
    """A client defense that a broken plugin registers as an attack."""

    name: ClassVar[str] = "test-misfiled"


class MisfilingPlugin:
    @fedbench.hookimpl
    def register_attacks(self, register):
        register(NotAnAttack)


class NamelessAttack(fedbench.Attack):
    """An attack without a name."""


class NamelessPlugin:
    @fedbench.hookimpl
    def register_attacks(self, register):
        register(NamelessAttack)


@dataclass(kw_only=True)
class ImpostorNone(fedbench.Attack):
    """A second attack called 'none'."""

    name: ClassVar[str] = "none"


class ImpostorPlugin:
    @fedbench.hookimpl
    def register_attacks(self, register):
        register(ImpostorNone)


def test_plugin_registering_a_class_of_the_wrong_base_is_rejected(use_plugin):
    use_plugin(MisfilingPlugin(), "misfiling")
    with pytest.raises(FedbenchError) as err:
        registry()
    message = str(err.value)
    assert "misfiling" in message and "NotAnAttack" in message
    assert "not a Attack" in message


def test_plugin_registering_something_that_is_not_a_class_is_rejected(use_plugin):
    class Plugin:
        @fedbench.hookimpl
        def register_aggregators(self, register):
            register(lambda updates, weights, generator: updates.mean(0))

    use_plugin(Plugin(), "lambda")
    with pytest.raises(FedbenchError, match="not a Aggregator"):
        registry()


def test_component_without_a_name_is_rejected(use_plugin):
    use_plugin(NamelessPlugin(), "nameless")
    with pytest.raises(FedbenchError, match="NamelessAttack without a 'name'"):
        registry()


def test_two_plugins_registering_the_same_name_is_an_error_naming_both(use_plugin):
    use_plugin(ImpostorPlugin(), "impostor")
    with pytest.raises(FedbenchError) as err:
        registry()
    message = str(err.value)
    assert "attack 'none' is registered twice" in message
    assert "fedbench (core)" in message and "impostor (registered directly)" in message


def test_registering_the_same_plugin_twice_is_harmless(toy_plugin):
    fedbench.register_plugin(toy_plugin, name="toy")  # e.g. a notebook cell run a second time
    assert "test-boost" in registry().names("attack")


def test_a_misspelled_hook_name_is_a_fedbench_error_naming_the_plugin(use_plugin):
    class Typo:
        @fedbench.hookimpl
        def register_atacks(self, register):  # sic
            pass

    use_plugin(Typo(), "typo")
    with pytest.raises(fedbench.FedbenchError, match=r"plugin typo \(registered directly\):.*register_atacks"):
        fedbench.registry()


def test_registering_a_module_its_entry_point_already_loaded_is_harmless(use_plugin):
    import fedbench_plugins.robust as robust

    use_plugin(robust, "my-robust")
    assert "cma" in fedbench.registry().names("aggregator")


def test_a_plugin_that_cannot_be_imported_is_listed_as_broken_and_the_others_keep_working(monkeypatch):
    real = fedbench.plugins._entry_points()
    ghost = metadata.EntryPoint(name="ghost", value="fedbench_no_such_module_anywhere", group="fedbench")
    monkeypatch.setattr(fedbench.plugins, "_entry_points", lambda: [*real, ghost])
    fedbench.plugins.reset()
    assert "poison" in registry().names("attack")  # every other plugin loads
    origin, why = fedbench.plugins.broken_plugins()["ghost"]
    assert why == "cannot be imported: ModuleNotFoundError: No module named 'fedbench_no_such_module_anywhere'"
    listed = CliRunner().invoke(main, ["list", "attacks"])
    assert listed.exit_code == 0 and "Broken plugins" in listed.output and "ghost" in listed.output
    with pytest.raises(UnknownComponentError, match=r"plugins that failed to load: ghost \(cannot be imported"):
        parse_component("attack", "ghostly")


def test_a_plugin_that_raises_while_registering_is_left_out_whole(use_plugin):
    @dataclass(kw_only=True)
    class HalfAttack(fedbench.Attack):
        """Registered by a plugin whose next hook raises."""

        name: ClassVar[str] = "half-attack"

    class Half:
        @fedbench.hookimpl
        def register_attacks(self, register):
            register(HalfAttack)

        @fedbench.hookimpl
        def register_aggregators(self, register):
            raise RuntimeError("boom while registering")

    use_plugin(Half(), "half")
    reg = registry()
    assert "half-attack" not in reg.names("attack") and "cma" in reg.names("aggregator")
    assert fedbench.plugins.broken_plugins()["half"] == (
        "half (registered directly)", "raised while registering aggregators: RuntimeError: boom while registering")
    result = run_cell(make_cell(dataset="digits", attack="poison", rounds=2, attack_rounds=(2,)))
    assert result.status == "ok"  # cells that do not need the broken plugin run as before
