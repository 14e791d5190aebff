"""The paper's experiments as preset grid files (fedbench/presets/*.toml, fedbench.presets)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest

import fedbench
from fedbench import presets
from fedbench.errors import FedbenchError
from fedbench.spec import parse_component, parse_defense

BOTH = {"paper", "reference-code"}
CTMA = ["ctma:beta=0.1", "ctma:beta=0.2", "ctma:beta=0.3"]
WBC_SWEEP = ["wbc:s=0.1", "wbc:s=0.2", "wbc:s=0.4", "wbc:s=0.7", "wbc:s=1"]
SIGMAS = ["0.1", "0.3", "1", "3", "10"]
DP_SWEEP = [f"{dp}:clip=5,sigma={s}" for dp in ("ldp", "cdp") for s in SIGMAS]

#: What each preset's description says it holds (on its default dataset, fmnist): attacks and
#: defenses as written (the reference cells none / fedavg included), partitions, malicious counts, and
#: the cells of one protocol and one seed.
DOCUMENTED = {
    "fig2": dict(attacks=["none", "poison"], defenses=["fedavg", "cma", "ctma:beta=0.3"], partitions={"iid"},
                 malicious={1, 2, 3, 4, 5}, per_setting=5 * 2 * 3),
    "fig3": dict(attacks=["none", "poison"], defenses=["fedavg", "wbc:s=0.4", "cma", *CTMA],
                 partitions={"iid", "shards"}, malicious={5}, per_setting=2 * 2 * 6),
    "fig4": dict(attacks=["none", "poison"], defenses=["fedavg", *WBC_SWEEP, *DP_SWEEP],
                 partitions={"iid", "shards"}, malicious={5}, per_setting=2 * 2 * 16),
    "table1": dict(attacks=["none", "poison:images=10"], defenses=["fedavg", "cma", *CTMA],
                   partitions={"iid", "shards"}, malicious={5}, per_setting=2 * 2 * 5),
    "fig5": dict(attacks=["none", "poison:images=10"], defenses=["fedavg", *WBC_SWEEP, *DP_SWEEP],
                 partitions={"iid", "shards"}, malicious={5}, per_setting=2 * 2 * 16),
    "fig6": dict(attacks=["none", "poison"], defenses=["fedavg", "cma", "wbc:s=0.4", "cma+wbc:s=0.4"],
                 partitions={"iid", "shards"}, malicious={5}, per_setting=2 * 2 * 4),
}


def canonical_attacks(texts):
    return {str(parse_component("attack", t)) for t in texts}


def canonical_defenses(texts):
    return {str(parse_defense(t)) for t in texts}


def stacks(cells):
    """What a grid compares, without rounds, seeds or protocol."""
    return {(str(mc.cell.attack), str(mc.cell.defense), str(mc.cell.partition), mc.cell.scenario.num_malicious)
            for mc in cells}


def test_every_documented_experiment_is_shipped():
    assert presets.names() == sorted(DOCUMENTED)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_preset_expands_to_its_documented_grid(name):
    preset, doc = presets.load(name), DOCUMENTED[name]
    cells = preset.cells()
    assert len(cells) == len({mc.key for mc in cells})
    assert len(cells) == doc["per_setting"] * len(BOTH) * len(preset.seeds)
    assert {mc.cell.protocol for mc in cells} == BOTH == set(preset.protocols)
    assert {str(mc.cell.attack) for mc in cells} == canonical_attacks(doc["attacks"])
    assert {str(mc.cell.defense) for mc in cells} == canonical_defenses(doc["defenses"])
    assert {str(mc.cell.partition).split(":")[0] for mc in cells} == doc["partitions"]
    assert {mc.cell.scenario.num_malicious for mc in cells} == doc["malicious"]
    assert {mc.cell.dataset.name for mc in cells} == {"fmnist"} == {preset.datasets[0]}
    assert {mc.cell.rounds for mc in cells} == {preset.rounds}
    assert {mc.cell.seed for mc in cells} == set(preset.seeds)
    # The paper's schedule: attacks from round 1 with probability 0.1, no warm start.
    schedules = {(mc.cell.scenario.attack_prob, mc.cell.scenario.attack_rounds, mc.warmup_rounds) for mc in cells}
    assert schedules == {(0.1, None, 0)}
    assert {mc.cell.scenario.clients_per_round for mc in cells} == {10}
    # Each protocol its own setting: no leaderboard mixes them.
    by_setting = {}
    for mc in cells:
        by_setting.setdefault(mc.setting(), set()).add(mc.cell.protocol)
    assert all(len(p) == 1 for p in by_setting.values())


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_description_states_claim_grids_protocols_rounds_and_cost(name):
    preset = presets.load(name)
    text = preset.describe()
    assert preset.claim and preset.claim in text
    needles = ("paper", "reference-code", f"{preset.rounds} rounds", "quick:", "cost (full, cpu)", "cost (quick, cuda)")
    for needle in needles:
        assert needle in text
    for grid in preset.grids:
        for defense in grid.defenses:
            assert defense in text


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_quick_runs_the_same_stacks_with_fewer_rounds_and_seeds(name):
    preset = presets.load(name)
    full, quick = preset.cells(), preset.cells(quick=True)
    assert stacks(quick) == stacks(full)
    assert {mc.cell.rounds for mc in quick} == {preset.quick_rounds} and preset.quick_rounds < preset.rounds
    assert {mc.cell.seed for mc in quick} == set(preset.quick_seeds) < set(preset.seeds)
    assert len(quick) == DOCUMENTED[name]["per_setting"] * len(preset.quick_protocols)
    assert {mc.cell.protocol for mc in quick} == {"paper"}
    # A fixed attack round inside the short run, so the quick run always sees an attack.
    assert all(mc.cell.scenario.attack_rounds and max(mc.cell.scenario.attack_rounds) < preset.quick_rounds
               for mc in quick)


def test_quick_takes_both_protocols_when_asked():
    quick = presets.load("fig6").cells(quick=True, protocols=["paper", "reference-code"])
    assert {mc.cell.protocol for mc in quick} == BOTH
    ref = [mc for mc in quick if mc.cell.protocol == "reference-code"]
    assert {(mc.cell.scenario.local_epochs, mc.cell.scenario.batch_size) for mc in ref} == {(10, 10)}


def test_rounds_seeds_and_dataset_override_the_preset():
    preset = presets.load("fig6")
    cells = preset.cells(rounds=7, seeds="3-4")
    assert {mc.cell.rounds for mc in cells} == {7}
    assert {mc.cell.seed for mc in cells} == {3, 4}
    assert len(cells) == DOCUMENTED["fig6"]["per_setting"] * 2 * 2
    quick = preset.cells(quick=True, rounds=12, seeds=[5])
    assert {(mc.cell.rounds, mc.cell.seed) for mc in quick} == {(12, 5)}
    cifar = preset.cells(dataset="cifar10", seeds=0)
    assert {mc.cell.dataset.name for mc in cifar} == {"cifar10"}
    assert {mc.cell.model.name for mc in cifar} == {"cifar-cnn"}


def test_a_dataset_specific_grid_applies_only_to_its_dataset():
    preset = presets.load("fig4")
    fmnist, cifar = preset.cells(seeds=0), preset.cells(seeds=0, dataset="cifar10")
    assert len(fmnist) == len(cifar)
    clips = lambda cells: {dict(part.params)["clip"] for mc in cells  # noqa: E731
                           for part in mc.cell.defense.parts() if part.name in ("ldp", "cdp")}
    assert clips(fmnist) == {5.0} and clips(cifar) == {10.0}


def test_an_unknown_preset_names_the_known_ones():
    with pytest.raises(FedbenchError) as info:
        presets.load("fig99")
    message = str(info.value)
    assert "fig99" in message
    for name in DOCUMENTED:
        assert name in message


def test_bad_overrides_are_refused_with_the_allowed_values():
    preset = presets.load("fig3")
    with pytest.raises(FedbenchError, match="fmnist, cifar10"):
        preset.cells(dataset="digits")
    with pytest.raises(FedbenchError, match="paper, reference-code"):
        preset.cells(protocols="warm")
    with pytest.raises(FedbenchError, match="beyond the last round"):
        preset.cells(quick=True, rounds=1)  # the quick attack round 2 no longer fits


def test_a_malformed_preset_file_says_which_key():
    with pytest.raises(FedbenchError, match="unknown key 'defences'"):
        presets.parse('title="t"\nclaim="c"\nprotocols=["paper"]\ndatasets=["fmnist"]\nrounds=5\nseeds=[0]\n'
                      '[quick]\nrounds=2\n[[grid]]\nattacks=["poison"]\ndefences=["cma"]\n', name="bad")


def test_preset_files_ship_with_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is found relative to the working directory
    folder = importlib.resources.files("fedbench") / "presets"
    shipped = {entry.name for entry in folder.iterdir() if entry.name.endswith(".toml")}
    assert shipped == {f"{name}.toml" for name in DOCUMENTED}
    assert set(presets.preset_files()) == set(DOCUMENTED)
    assert presets.load("fig3").name == "fig3"
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():  # in a checkout: the files are declared package data, so a wheel has them
        import tomllib

        data = tomllib.loads(pyproject.read_text())
        assert "presets/*.toml" in data["tool"]["setuptools"]["package-data"]["fedbench"]


def test_estimate_prices_cells_by_measured_seconds_per_round():
    preset = presets.load("fig6")
    cost = presets.ROUND_SECONDS[("cpu", "fmnist", "paper")]
    est = preset.estimate(quick=True)
    assert est.cells == 16 and est.rounds == 16 * preset.quick_rounds
    assert est.low == pytest.approx(cost.low * est.rounds) and est.high == pytest.approx(cost.high * est.rounds)
    assert "not measured" in str(preset.estimate(dataset="cifar10", device="cuda"))
    assert preset.estimate(device="cuda").low < preset.estimate(device="cpu").low


@pytest.mark.slow
def test_fig3_quick_undefended_cell_is_poisoned_right_after_the_attack(fmnist_dir, monkeypatch):
    monkeypatch.setenv("FEDBENCH_DATA_DIR", str(fmnist_dir))
    cells = presets.load("fig3").cells(quick=True)
    (mc,) = [mc for mc in cells if mc.cell.protocol == "paper" and str(mc.cell.attack) == "poison"
             and str(mc.cell.defense) == "fedavg" and mc.cell.partition.name == "iid"]
    result = fedbench.run_cell(mc.cell, data_dir=str(fmnist_dir))
    assert result.status == "ok"
    assert result.adversarial_rounds == list(mc.cell.scenario.attack_rounds)
    after = {row["round"]: row for row in result.rounds}
    assert all(after[r]["success"] > 0.5 for r in result.adversarial_rounds)


def test_reproduce_lists_every_preset_with_its_cost():
    from click.testing import CliRunner

    from fedbench.cli import main

    result = CliRunner().invoke(main, ["reproduce", "--list"])
    assert result.exit_code == 0, result.output
    for name in ("fig2", "fig3", "fig4", "fig5", "fig6", "table1"):
        assert f"\n{name} " in "\n" + result.output
    assert result.output.count("quick") == 6


def test_reproduce_dry_run_lists_the_quick_grid_and_an_unknown_name_is_a_clean_error(tmp_path):
    from click.testing import CliRunner

    from fedbench import presets
    from fedbench.cli import main

    store = tmp_path / "paper.db"
    result = CliRunner().invoke(main, ["reproduce", "fig3", "--quick", "--dry-run", "--store", str(store)])
    assert result.exit_code == 0, result.output
    listed = [line for line in result.stdout.splitlines() if "  new  " in line]
    assert len(listed) == len(presets.load("fig3").cells(quick=True)) == 24
    assert not store.exists()
    bad = CliRunner().invoke(main, ["reproduce", "nope"])
    assert bad.exit_code == 2 and "known presets: fig2, fig3" in bad.output
