"""The attack's effect on the parameters (``--metrics aep``) and the adaptive attack against FL-WBC."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import fedbench
from fedbench.aep import curvature, fraction_undone
from fedbench.cli import main
from fedbench.engine import run_cell
from fedbench.errors import FedbenchError
from fedbench.spec import make_cell

ROUNDS = dict(rounds=6, attack_rounds=(2, 4))


@dataclass(kw_only=True)
class Honest(fedbench.Attack):
    """An "attack" whose malicious clients train honestly on their own data: its AEP must be exactly 0."""

    name: ClassVar[str] = "honest-test"

    def malicious_updates(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        return rnd.train(rnd.client_data)


class _HonestPlugin:
    @fedbench.hookimpl
    def register_attacks(self, register):
        register(Honest)


@pytest.fixture
def honest_attack():
    fedbench.register_plugin(_HonestPlugin(), name="honest-test-plugin")
    yield
    fedbench.unregister_plugin("honest-test-plugin")


def _rows(attack: str, defense: str = "fedavg", *, metrics=("aep",), trainer: str = "stacked"):
    cell = make_cell(attack=attack, defense=defense, dataset="digits", **ROUNDS)
    return run_cell(cell, metrics=metrics, trainer=trainer).rounds


@pytest.mark.parametrize("defense", ["fedavg", "cma", "wbc"])
def test_an_honest_adversarial_round_has_exactly_zero_aep(honest_attack, defense):
    rows = _rows("honest-test", defense)
    adversarial = [r for r in rows if r["adversarial"]]
    assert [r["round"] for r in adversarial] == [2, 4]
    assert all(r["aep_norm"] == 0.0 for r in adversarial)  # same randomness: bitwise the same aggregate
    assert all(r["aep_curvature"] == 0.0 for r in rows if r["round"] >= 2)
    assert "aep_norm" not in rows[0] and "aep_curvature" not in rows[0]  # nothing before the first attack


def test_measuring_the_aep_does_not_change_the_run():
    plain = _rows("poison", "cma", metrics=())
    measured = _rows("poison", "cma")
    keys = ("accuracy", "loss", "success", "misclassification")
    assert [[r[k] for k in keys] for r in plain] == [[r[k] for k in keys] for r in measured]
    assert all("aep_norm" not in r for r in plain)


def test_a_real_attack_has_an_aep_and_later_rounds_report_how_much_of_it_they_undo():
    rows = _rows("poison")
    by_round = {r["round"]: r for r in rows}
    assert by_round[2]["aep_norm"] > 0.05 and by_round[4]["aep_norm"] > 0.05
    assert "aep_undone" not in by_round[2] and "aep_undone" in by_round[3]
    assert all(r["aep_curvature"] > 0 for r in rows if r["round"] >= 2)
    assert 0 < by_round[3]["aep_undone"] < 1  # benign training moves part of it back, not all


def test_curvature_is_the_rayleigh_quotient_of_the_exact_hessian():
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    w0 = torch.randn(15) * 0.3

    def forward(flat):
        return lambda inp: inp @ flat.view(5, 3)

    hessian = torch.autograd.functional.hessian(lambda w: F.cross_entropy(forward(w)(x), y), w0)
    for _ in range(3):
        v = torch.randn(15)
        expected = float(v @ hessian @ v / (v @ v))
        assert curvature(forward, w0, v, x, y) == pytest.approx(expected, rel=1e-5)
    assert curvature(forward, w0, torch.zeros(15), x, y) == 0.0


def test_fraction_undone():
    delta = torch.tensor([1.0, -2.0, 0.5])
    assert fraction_undone(-delta, delta) == pytest.approx(1.0)
    assert fraction_undone(-0.25 * delta, delta) == pytest.approx(0.25)
    assert fraction_undone(torch.tensor([2.0, 1.0, 0.0]), delta) == pytest.approx(0.0)
    assert fraction_undone(delta, torch.zeros(3)) == 0.0


def test_unknown_metric_is_a_user_error_naming_the_known_ones():
    cell = make_cell(attack="poison", dataset="digits", rounds=1)
    with pytest.raises(FedbenchError, match="unknown metric 'aeps'; optional metrics: aep"):
        run_cell(cell, metrics=("aeps",))
    result = CliRunner().invoke(main, ["run", "--attack", "poison", "--rounds", "1", "--metrics", "aep,aeps"])
    assert result.exit_code == 2 and "unknown metric 'aeps'" in result.output


def test_cli_prints_the_aep_per_round():
    result = CliRunner().invoke(main, ["run", "--attack", "poison", "--rounds", "3", "--attack-rounds", "2",
                                       "--metrics", "aep", "--json"])
    assert result.exit_code == 0, result.output
    import json

    rounds = json.loads(result.stdout)["rounds"]
    assert rounds[1]["aep_norm"] > 0 and "aep_undone" in rounds[2]


def test_adaptive_attack_moves_its_aep_towards_flat_directions_and_persists_longer():
    """Paper appendix B: the adaptive attack lowers the AEP estimator and the attack persists longer.
    On digits (fedavg, attacks in rounds 2 and 4) the curvature along the AEP in the attack round
    drops several-fold and the target confidence two rounds after the last attack stays higher."""
    plain = {r["round"]: r for r in _rows("poison")}
    adaptive = {r["round"]: r for r in _rows("poison:adaptive=true,rho=1")}
    for rnd in (2, 4):
        assert adaptive[rnd]["aep_curvature"] < 0.5 * plain[rnd]["aep_curvature"]
    assert adaptive[6]["confidence"] > plain[6]["confidence"]


def test_adaptive_with_rho_zero_is_the_plain_attack():
    assert _rows("poison:adaptive=true,rho=0") == _rows("poison")


def test_adaptive_attack_trains_the_same_with_the_loop_and_the_stacked_trainer():
    stacked = _rows("poison:adaptive=true", trainer="stacked")
    loop = _rows("poison:adaptive=true", trainer="loop")
    for a, b in zip(stacked, loop):
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-4)
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.01)


def test_adaptive_parameters_are_checked():
    with pytest.raises(FedbenchError, match="rho"):
        make_cell(attack="poison:adaptive=true,rho=-1", dataset="digits")
    with pytest.raises(FedbenchError, match="adaptive"):
        make_cell(attack="poison:adaptive=maybe", dataset="digits")
