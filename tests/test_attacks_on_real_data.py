"""Every attack of the catalogue runs on the real image datasets, not only on ``digits``: Fashion-MNIST
(1x28x28, the paper's CNN) and CIFAR-10 (3x32x32, the paper's LeNet), each for two rounds with an
attack in round 2 on a small slice of every client's data (2%), through both trainers' default."""

from __future__ import annotations

import math

import pytest

from fedbench.engine import run_cell
from fedbench.plugins import registry
from fedbench.spec import make_cell

pytestmark = pytest.mark.slow  # real data: ~1-2 s a cell on 2 idle cores, ~1 minute for the module

ATTACKS = [name for name in registry().names("attack") if name not in ("none", "nan")]


@pytest.mark.parametrize("dataset,fixture", [("fmnist", "fmnist_dir"), ("cifar10", "cifar_jpeg_dir")])
@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_runs_on_real_images(attack, dataset, fixture, request):
    root = request.getfixturevalue(fixture)
    spec = "poison:adaptive=true" if attack == "poison" else attack
    cell = make_cell(attack=spec, defense="cma", dataset=dataset, rounds=2, attack_rounds=(2,), client_data_frac=0.02)
    result = run_cell(cell, data_dir=str(root))
    assert result.adversarial_rounds == [2]
    last = result.rounds[-1]
    assert math.isfinite(last["loss"]) and 0.0 <= last["accuracy"] <= 1.0
    assert 0.0 <= last["success"] <= 1.0  # every attack reports a success (untargeted: the benign error)
    assert result.status == "ok", result.message
