"""Specs are data: the ``name:k=v`` grammar, defense stacks, scenarios, protocols and cell hashes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest

import fedbench
from fedbench import CellSpec, Scenario, SpecError, UnknownComponentError, make_cell, parse_component, parse_defense
from fedbench.plugins import registry


# --------------------------------------------------------------------------------------------------
# Components: round trips and defaults
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, text",
    [
        ("partition", "iid"),
        ("partition", "shards"),
        ("partition", "shards:per_client=3"),
        ("partition", "dirichlet:alpha=0.1"),
        ("partition", "dirichlet:alpha=1e-3"),
        ("partition", " dirichlet : alpha = 2 "),
        ("model", "mlp:hidden=16"),
        ("dataset", "digits:test_size=200"),
        ("attack", "none"),
    ],
)
def test_component_spec_parses_back_from_its_label_and_canonical_form(kind, text):
    spec = parse_component(kind, text)
    assert parse_component(kind, str(spec)) == spec
    assert parse_component(kind, spec.canonical()) == spec


def test_plugin_component_spec_parses_back_from_its_label(toy_plugin):
    spec = parse_component("attack", "test-boost:boost=2.5")
    assert str(spec) == "test-boost:boost=2.5"
    assert parse_component("attack", str(spec)) == spec
    assert dict(spec.params) == {"boost": 2.5}


def test_defaults_are_filled_so_implicit_and_explicit_specs_are_equal():
    implicit = parse_component("partition", "shards")
    explicit = parse_component("partition", "shards:per_client=2")
    assert implicit == explicit
    assert implicit.params == (("per_client", 2),)
    assert str(explicit) == "shards"  # the label leaves defaults out
    assert explicit.canonical() == "shards:per_client=2"


def test_label_shows_only_parameters_that_differ_from_defaults():
    assert str(parse_component("partition", "dirichlet:alpha=0.5")) == "dirichlet"
    assert str(parse_component("partition", "dirichlet:alpha=0.25")) == "dirichlet:alpha=0.25"


def test_values_are_coerced_to_the_parameters_type():
    spec = parse_component("partition", "dirichlet:alpha=2")
    (name, value), = spec.params
    assert name == "alpha" and value == 2.0 and isinstance(value, float)


def test_cells_with_implicit_and_explicit_defaults_have_the_same_hash():
    implicit = make_cell(dataset="digits", partition="shards", defense="fedavg")
    explicit = make_cell(dataset="digits:test_size=300", partition="shards:per_client=2", model="mlp:hidden=64",
                         defense="fedavg")
    assert implicit == explicit
    assert implicit.hash() == explicit.hash()


# --------------------------------------------------------------------------------------------------
# Defense stacks
# --------------------------------------------------------------------------------------------------
def test_defense_stack_without_aggregator_implies_fedavg(toy_plugin):
    stack = parse_defense("test-noise")
    assert stack.aggregator.name == "fedavg"
    assert [c.name for c in stack.client] == ["test-noise"]
    assert parse_defense("fedavg+test-noise") == stack
    assert str(stack) == "test-noise"


def test_bare_fedavg_is_a_stack_without_client_defenses():
    stack = parse_defense("fedavg")
    assert stack.client == ()
    assert stack.aggregator.name == "fedavg"
    assert str(stack) == "fedavg"


@pytest.mark.parametrize(
    "text",
    ["fedavg", "test-noise", "test-noise:scale=0.5+test-shrink", "test-shrink+test-noise", "test-mean",
     "test-noise+test-mean", "test-mean+test-shrink:factor=0.25+test-noise:scale=0"],
)
def test_defense_stack_parses_back_from_its_label(toy_plugin, text):
    stack = parse_defense(text)
    assert parse_defense(str(stack)) == stack


def test_client_defenses_keep_the_order_given(toy_plugin):
    assert [c.name for c in parse_defense("test-shrink+test-noise").client] == ["test-shrink", "test-noise"]
    assert [c.name for c in parse_defense("test-noise+test-shrink").client] == ["test-noise", "test-shrink"]


def test_aggregator_may_stand_anywhere_in_the_stack(toy_plugin):
    assert parse_defense("test-noise+test-mean") == parse_defense("test-mean+test-noise")


def test_a_stack_with_two_aggregators_is_an_error(toy_plugin):
    with pytest.raises(SpecError, match="2 aggregators") as err:
        parse_defense("fedavg+test-noise+test-mean")
    assert "fedavg" in str(err.value) and "test-mean" in str(err.value)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def test_unknown_attack_lists_the_known_attacks():
    with pytest.raises(UnknownComponentError) as err:
        parse_component("attack", "nope")
    message = str(err.value)
    assert "unknown attack 'nope'" in message
    listed = message.split("known attacks: ", 1)[1]
    assert listed.split(", ") == registry().names("attack")


def test_unknown_defense_lists_defenses_and_aggregators(toy_plugin):
    with pytest.raises(SpecError) as err:
        parse_defense("test-noise+nope")
    message = str(err.value)
    assert "'nope'" in message
    listed = message.split("known defenses, pre-aggregators and aggregators: ", 1)[1].split(", ")
    assert {"fedavg", "test-mean", "test-noise", "test-shrink"} <= set(listed)


def test_unknown_component_error_is_a_spec_error_and_a_fedbench_error():
    with pytest.raises(SpecError):
        parse_component("model", "resnet-9000")
    with pytest.raises(fedbench.FedbenchError):
        parse_component("partition", "nope")


def test_unknown_parameter_is_named_and_the_allowed_ones_listed():
    with pytest.raises(SpecError) as err:
        parse_component("partition", "shards:per_clients=3")
    message = str(err.value)
    assert "unknown parameter 'per_clients'" in message
    assert "per_client (an integer >= 1, default 2)" in message


def test_parameter_given_to_a_component_without_parameters_says_so():
    with pytest.raises(SpecError, match="takes no parameters"):
        parse_component("attack", "none:strength=3")


@pytest.mark.parametrize(
    "text, parameter, allowed",
    [
        ("shards:per_client=two", "per_client", "an integer >= 1"),
        ("shards:per_client=2.5", "per_client", "an integer >= 1"),
        ("shards:per_client=0", "per_client", "an integer >= 1"),
        ("dirichlet:alpha=zero", "alpha", "a number > 0"),
        ("dirichlet:alpha=0", "alpha", "a number > 0"),
        ("dirichlet:alpha=nan", "alpha", "a number > 0"),
    ],
)
def test_ill_typed_or_out_of_range_value_names_the_parameter_and_what_is_allowed(text, parameter, allowed):
    with pytest.raises(SpecError) as err:
        parse_component("partition", text)
    message = str(err.value)
    assert f"parameter '{parameter}'" in message
    assert f"allowed: {allowed}" in message


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("shards:per_client", "expected key=value"),
        ("shards:=3", "expected key=value"),
        ("shards:per_client=", "expected key=value"),
        ("shards:per_client=2,", "expected key=value"),
        ("shards:per_client=2,per_client=3", "given twice"),
        (":per_client=2", "empty component name"),
    ],
)
def test_malformed_key_value_lists_are_errors(text, fragment):
    with pytest.raises(SpecError, match=fragment):
        parse_component("partition", text)


@pytest.mark.parametrize("text", ["", "fedavg+", "+fedavg", "fedavg++fedavg"])
def test_empty_parts_of_a_defense_stack_are_errors(text):
    with pytest.raises(SpecError, match="empty part"):
        parse_defense(text)


# --------------------------------------------------------------------------------------------------
# Cells: serialisation and hashes
# --------------------------------------------------------------------------------------------------
def _full_cell():
    return make_cell(
        dataset="digits", partition="dirichlet:alpha=0.3", attack="test-boost:boost=3",
        defense="test-noise:scale=0.1+test-mean", protocol="reference-code", seed=7, rounds=9,
        attack_rounds=(5, 2), num_clients=25,
    )


def test_cell_spec_round_trips_through_dict_and_json(toy_plugin):
    cell = _full_cell()
    assert CellSpec.from_dict(cell.to_dict()) == cell
    again = CellSpec.from_dict(json.loads(cell.to_json()))
    assert again == cell
    assert again.hash() == cell.hash()
    assert again.scenario.attack_rounds == (2, 5)


def test_cell_spec_from_another_version_is_refused(toy_plugin):
    data = _full_cell().to_dict()
    data["version"] = 999
    with pytest.raises(SpecError, match="version 999"):
        CellSpec.from_dict(data)


def test_cell_from_a_dict_naming_an_unregistered_component_fails_cleanly_when_run():
    data = make_cell(dataset="digits", rounds=1).to_dict()
    data["attack"]["name"] = "uninstalled"
    cell = CellSpec.from_dict(data)
    with pytest.raises(UnknownComponentError, match="unknown attack 'uninstalled'"):
        fedbench.run_cell(cell)


def test_cell_from_a_dict_with_an_unknown_parameter_is_a_spec_error():
    data = make_cell(dataset="digits", partition="shards", rounds=1).to_dict()
    data["partition"]["params"] = {"per_clients": 3}  # e.g. stored before a parameter was renamed
    with pytest.raises(SpecError, match="per_clients"):
        fedbench.run_cell(CellSpec.from_dict(data))


def _reversed_keys(value):
    if isinstance(value, dict):
        return {k: _reversed_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed_keys(v) for v in value]
    return value


def test_hash_does_not_depend_on_dict_order(toy_plugin):
    cell = _full_cell()
    shuffled = _reversed_keys(cell.to_dict())
    assert list(shuffled) != list(cell.to_dict())
    assert CellSpec.from_dict(shuffled) == cell
    assert CellSpec.from_dict(shuffled).hash() == cell.hash()


def test_hash_tells_cells_apart():
    base = make_cell(dataset="digits")
    others = [
        make_cell(dataset="digits", seed=1),
        make_cell(dataset="digits", rounds=31),
        make_cell(dataset="digits", partition="shards"),
        make_cell(dataset="digits", lr=0.1),
        make_cell(dataset="digits", protocol="reference-code"),
        make_cell(dataset="digits", attack_rounds=(3,)),
    ]
    hashes = {base.hash()} | {cell.hash() for cell in others}
    assert len(hashes) == 1 + len(others)
    assert all(len(h) == 16 and int(h, 16) >= 0 for h in hashes)


_HASH_SNIPPET = (
    "import fedbench; print(fedbench.make_cell(dataset='digits', partition='shards:per_client=3', "
    "model='mlp:hidden=32', seed=5, rounds=12, attack_rounds=(4, 2), lr=0.02).hash())"
)


def test_hash_is_the_same_in_another_process_with_another_hash_seed():
    expected = make_cell(
        dataset="digits", partition="shards:per_client=3", model="mlp:hidden=32", seed=5, rounds=12,
        attack_rounds=(4, 2), lr=0.02,
    ).hash()
    hash_seed = "4242" if os.environ.get("PYTHONHASHSEED") != "4242" else "17"
    # only the fedavg entry point: the cell needs nothing else
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "FEDBENCH_PLUGINS": "fedavg"}
    proc = subprocess.run([sys.executable, "-c", _HASH_SNIPPET], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_stating_a_scenario_default_with_an_int_keeps_the_hash():
    default = make_cell(dataset="digits")
    explicit = make_cell(dataset="digits", momentum=0)
    assert explicit == default
    assert explicit.hash() == default.hash()


@dataclass(kw_only=True)
class IntDefaultAttack(fedbench.Attack):
    """Test attack whose float parameter has an int default."""

    name: ClassVar[str] = "test-int-default"
    boost: float = fedbench.param(2, "a float parameter declared with an int default", check=fedbench.Range(lo=0))


class IntDefaultPlugin:
    @fedbench.hookimpl
    def register_attacks(self, register):
        register(IntDefaultAttack)


def test_int_default_of_a_float_parameter_hashes_like_the_explicit_value(use_plugin):
    use_plugin(IntDefaultPlugin(), "int-default")
    implicit = make_cell(attack="test-int-default")
    explicit = make_cell(attack="test-int-default:boost=2")
    assert implicit == explicit
    assert implicit.hash() == explicit.hash()


# --------------------------------------------------------------------------------------------------
# Scenario
# --------------------------------------------------------------------------------------------------
def test_scenario_defaults_are_the_papers_text():
    sc = Scenario()
    assert (sc.num_clients, sc.num_malicious, sc.clients_per_round, sc.attack_prob) == (100, 5, 10, 0.1)
    assert (sc.local_epochs, sc.batch_size, sc.lr, sc.momentum, sc.client_data_frac) == (1, 32, 0.01, 0.0, 1.0)
    assert sc.attack_rounds is None


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_clients": 10, "num_malicious": 5, "clients_per_round": 6}, "clients_per_round"),
        ({"num_clients": 10, "num_malicious": 0, "clients_per_round": 11}, "clients_per_round"),
        ({"clients_per_round": 0}, "clients_per_round"),
        ({"num_clients": 5, "num_malicious": 5, "clients_per_round": 1}, "num_malicious"),
        ({"num_malicious": -1}, "num_malicious"),
        ({"num_malicious": 6, "clients_per_round": 5}, "num_malicious"),
        ({"num_clients": 0}, "num_clients"),
        ({"attack_prob": 1.5}, "attack_prob"),
        ({"attack_prob": -0.1}, "attack_prob"),
        ({"local_epochs": 0}, "local_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"client_data_frac": 0.0}, "client_data_frac"),
        ({"client_data_frac": 1.5}, "client_data_frac"),
        ({"eval": "sometimes"}, "eval"),
        ({"attack_rounds": (0, 3)}, "attack_rounds"),
    ],
)
def test_scenario_rejects_impossible_settings_naming_the_field(kwargs, field):
    with pytest.raises(SpecError) as err:
        Scenario(**kwargs)
    assert str(err.value).startswith(f"scenario: {field}=")


def test_scenario_sorts_and_deduplicates_attack_rounds():
    assert Scenario(attack_rounds=[9, 2, 9, 4]).attack_rounds == (2, 4, 9)


def test_make_cell_rejects_unknown_scenario_parameter():
    with pytest.raises(SpecError) as err:
        make_cell(num_client=10)
    assert "unknown scenario parameter 'num_client'" in str(err.value)
    assert "num_clients" in str(err.value)


def test_make_cell_rejects_unknown_protocol_listing_known_ones():
    with pytest.raises(SpecError, match="known protocols: paper, reference-code"):
        make_cell(protocol="authors")


@pytest.mark.parametrize("rounds", [0, -3, 2.5])
def test_make_cell_rejects_non_positive_or_fractional_rounds(rounds):
    with pytest.raises(SpecError, match="rounds="):
        make_cell(rounds=rounds)


# --------------------------------------------------------------------------------------------------
# Protocol layering: paper defaults < dataset defaults < protocol < explicit keywords
# --------------------------------------------------------------------------------------------------
def test_reference_code_protocol_is_the_authors_training_setup():
    sc = make_cell(dataset="fmnist", protocol="reference-code").scenario
    assert (sc.local_epochs, sc.batch_size, sc.momentum, sc.client_data_frac) == (10, 10, 0.5, 0.8)
    assert (sc.num_clients, sc.clients_per_round, sc.lr) == (100, 10, 0.01)


def test_paper_protocol_on_fmnist_is_the_plain_paper_scenario():
    cell = make_cell(dataset="fmnist")
    assert cell.scenario == Scenario()
    assert cell.model.name == "fmnist-cnn"


def test_explicit_keywords_override_protocol_and_dataset_defaults():
    sc = make_cell(dataset="digits", protocol="reference-code", local_epochs=2, num_clients=30, lr=0.2).scenario
    assert (sc.local_epochs, sc.num_clients, sc.lr) == (2, 30, 0.2)
    assert (sc.batch_size, sc.momentum, sc.client_data_frac) == (10, 0.5, 0.8)


def test_dataset_scenario_defaults_apply_under_every_protocol():
    digits = registry().get("dataset", "digits")
    for protocol in ("paper", "reference-code"):
        sc = make_cell(dataset="digits", protocol=protocol).scenario
        for key, value in digits.scenario_defaults.items():
            assert getattr(sc, key) == value
    paper = make_cell(dataset="digits").scenario
    assert dataclasses.replace(paper, num_clients=100, lr=0.01) == Scenario()


def test_none_keywords_leave_the_layered_value_alone():
    assert make_cell(dataset="digits", lr=None).scenario.lr == make_cell(dataset="digits").scenario.lr


def test_model_defaults_to_the_datasets_own():
    assert make_cell(dataset="digits").model == parse_component("model", "mlp")
    assert make_cell(dataset="fmnist").model.name == "fmnist-cnn"
    assert make_cell(dataset="cifar10").model.name == "cifar-cnn"


def test_attack_rounds_beyond_the_last_round_are_an_error():
    with pytest.raises(SpecError, match=r"attack round 9 is beyond the last round \(5\)"):
        make_cell(dataset="digits", rounds=5, attack_rounds=(3, 9))
    assert make_cell(dataset="digits", rounds=9, attack_rounds=(3, 9)).scenario.attack_rounds == (3, 9)


@pytest.mark.parametrize("command", [["run"], ["matrix", "--attacks", "poison", "--defenses", "fedavg", "--dry-run"]])
def test_the_cli_refuses_attack_rounds_beyond_the_last_round(command, tmp_path):
    from click.testing import CliRunner

    from fedbench.cli import main

    result = CliRunner().invoke(main, [*command, "--rounds", "5", "--attack-rounds", "3,9", "--store", str(tmp_path / "r.db")]
                                if command[0] == "matrix" else [*command, "--rounds", "5", "--attack-rounds", "3,9"])
    assert result.exit_code == 2, result.output
    assert "attack round 9 is beyond the last round (5)" in result.output
    assert not (tmp_path / "r.db").exists()
