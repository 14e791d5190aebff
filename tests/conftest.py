"""Shared fixtures for the core's tests.

* ``fmnist_dir``: the folder holding the real Fashion-MNIST (``FashionMNIST/raw``); tests that need it
  are skipped, with the reason, where it is missing. Nothing is ever downloaded.
* ``toy_plugin``: a throw-away plugin registered directly (an attack, two client defenses, two
  aggregators and a synthetic dataset), for tests that need components the core does not ship.
* An autouse fixture that gives every test a freshly built plugin manager and removes whatever the
  test registered, so ``FEDBENCH_PLUGINS`` changes and direct registrations never leak.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import fedbench
import fedbench.plugins
from fedbench.components import NON_NEGATIVE, POSITIVE

#: The repository sits beside ``shared/`` (here and in CI), which holds the offline datasets.
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def fmnist_root() -> Path:
    """Where the real Fashion-MNIST should be: ``$FEDBENCH_DATA_DIR`` if set, else ``../shared/datasets``."""
    env = os.environ.get("FEDBENCH_DATA_DIR")
    return Path(env).expanduser() if env else SHARED_DATASETS


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    root = fmnist_root()
    if not (root / "FashionMNIST" / "raw").is_dir():
        pytest.skip(
            f"real Fashion-MNIST not found: no FashionMNIST/raw under {root} "
            "(set FEDBENCH_DATA_DIR to the folder that holds FashionMNIST/)"
        )
    return root


@pytest.fixture(scope="session")
def cifar_jpeg_dir() -> Path:
    root = fmnist_root()
    if not (root / "cifar10-jpeg" / "cifar10_jpeg_bytes.npz").is_file():
        pytest.skip(f"offline CIFAR-10 copy not found: no cifar10-jpeg/cifar10_jpeg_bytes.npz under {root}")
    return root


@pytest.fixture(autouse=True)
def fresh_plugin_manager():
    """Rebuild the plugin manager after every test and drop the plugins the test registered.

    ``reset()`` is lazy, so the next test rebuilds the manager under its own environment (after
    ``monkeypatch`` has restored ``FEDBENCH_PLUGINS``)."""
    before = [name for _, name in fedbench.plugins._extra]
    fedbench.plugins.reset()
    yield
    for name in {name for _, name in fedbench.plugins._extra} - set(before):
        fedbench.unregister_plugin(name)
    fedbench.plugins.reset()


@pytest.fixture
def use_plugin():
    """``use_plugin(obj, name)`` registers a plugin for the duration of one test."""
    names: list[str] = []

    def use(plugin, name: str):
        fedbench.register_plugin(plugin, name=name)
        names.append(name)
        return plugin

    yield use
    for name in names:
        fedbench.unregister_plugin(name)


# --------------------------------------------------------------------------------------------------
# A throw-away plugin with one component of most kinds
# --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class BoostedHonest(fedbench.Attack):
    """Test attack: honest local training, updates multiplied by boost."""

    name: ClassVar[str] = "test-boost"
    #: (round, malicious client ids) of every call, across all runs of a test
    calls: ClassVar[list] = []
    boost: float = fedbench.param(1.0, "factor on the honest updates", check=POSITIVE)

    def malicious_updates(self, rnd):
        BoostedHonest.calls.append((rnd.round, rnd.client_ids))
        return self.boost * rnd.train(rnd.client_data)


@dataclass(kw_only=True)
class NoisyUpload(fedbench.ClientDefense):
    """Test defense: Gaussian noise on each update, keyed by the client's defense key (and the global RNG)."""

    name: ClassVar[str] = "test-noise"
    scale: float = fedbench.param(0.01, "std of the added noise", check=NON_NEGATIVE)

    def on_update(self, updates, keys):
        from fedbench.rng import uniform

        torch.rand(7)  # a careless defense that also draws from torch's global stream
        noise = torch.special.ndtri(uniform(keys, ("test-noise",), (updates.shape[1],)))  # inverse normal CDF
        return updates + self.scale * noise


@dataclass(kw_only=True)
class ShrinkUpload(fedbench.ClientDefense):
    """Test defense: multiplies each update by a factor."""

    name: ClassVar[str] = "test-shrink"
    factor: float = fedbench.param(0.5, "factor on the updates", check=POSITIVE)

    def on_update(self, updates, keys):
        return self.factor * updates


@dataclass(kw_only=True)
class PlainMean(fedbench.Aggregator):
    """Test aggregator: the unweighted mean of the updates."""

    name: ClassVar[str] = "test-mean"

    def aggregate(self, updates, weights, ctx):
        return updates.mean(0)


@dataclass(kw_only=True)
class RecordingFedAvg(fedbench.Aggregator):
    """Test aggregator: the weighted mean, recording the weights of every call."""

    name: ClassVar[str] = "test-record"
    calls: ClassVar[list] = []

    def aggregate(self, updates, weights, ctx):
        RecordingFedAvg.calls.append((tuple(updates.shape), weights.tolist()))
        w = weights.to(updates.dtype)
        return (w / w.sum()) @ updates


@dataclass(kw_only=True)
class Blobs(fedbench.Dataset):
    """Test dataset: four Gaussian blobs as 1x4x4 images (600 train, 2,500 test)."""

    name: ClassVar[str] = "test-blobs"
    default_model: ClassVar[str] = "mlp"
    scenario_defaults: ClassVar[dict] = {"num_clients": 10, "num_malicious": 2, "clients_per_round": 5}

    def load(self, data_dir):
        g = torch.Generator().manual_seed(0)
        centres = 3 * torch.randn(4, 1, 4, 4, generator=g)

        def draw(n):
            y = torch.arange(n) % 4
            return centres[y] + torch.randn(n, 1, 4, 4, generator=g), y

        (trx, tr_y), (tex, te_y) = draw(600), draw(2500)
        return fedbench.DatasetTensors(trx, tr_y, tex, te_y, num_classes=4)


class ToyPlugin:
    """The hook implementations of the throw-away plugin."""

    @fedbench.hookimpl
    def register_attacks(self, register):
        register(BoostedHonest)

    @fedbench.hookimpl
    def register_defenses(self, register):
        register(NoisyUpload)
        register(ShrinkUpload)

    @fedbench.hookimpl
    def register_aggregators(self, register):
        register(PlainMean)
        register(RecordingFedAvg)

    @fedbench.hookimpl
    def register_datasets(self, register):
        register(Blobs)


@pytest.fixture
def toy_plugin(use_plugin):
    """The throw-away plugin, registered as ``toy`` for one test; its call logs start empty."""
    BoostedHonest.calls.clear()
    RecordingFedAvg.calls.clear()
    return use_plugin(ToyPlugin(), "toy")


# --------------------------------------------------------------------------------------------------
# Comparing runs
# --------------------------------------------------------------------------------------------------
def _assert_trainers_agree(cell, tol: float = 1e-4):
    """Run ``cell`` with the loop and the stacked trainer and check they give the same run: the same
    adversarial rounds and metric names, every metric within ``tol``. The two trainers sum the same
    gradients in a different order, so float32 rounding (about 1e-6 a step) is all that may differ.
    Returns ``(loop, stacked)``."""
    loop, stacked = fedbench.run_cell(cell, trainer="loop"), fedbench.run_cell(cell, trainer="stacked")
    assert loop.status == stacked.status == "ok"
    assert loop.adversarial_rounds == stacked.adversarial_rounds
    for a, b in zip(loop.rounds, stacked.rounds, strict=True):
        assert a.keys() == b.keys()
        for key in [k for k in a if k not in ("round", "adversarial", "eval_n")]:
            assert a[key] == pytest.approx(b[key], abs=tol), (a["round"], key)
    return loop, stacked


@pytest.fixture
def assert_trainers_agree():
    """The check above, for tests: ``loop, stacked = assert_trainers_agree(cell)``."""
    return _assert_trainers_agree
