"""The core's own components, registered through the same hooks as every plugin.

These are what the engine cannot do without: the datasets and models it ships, the partitions, and
the ``none`` attack (a run with no malicious clients). They are always loaded, whatever
``FEDBENCH_PLUGINS`` says. Attacks, defenses and aggregators proper live in ``plugins/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedbench import data, models
from fedbench.components import Attack
from fedbench.hookspecs import hookimpl


@dataclass(kw_only=True)
class NoAttack(Attack):
    """No attack: every client is benign and no round is adversarial (the clean reference run)."""

    name: ClassVar[str] = "none"
    active: ClassVar[bool] = False


@hookimpl
def register_attacks(register):
    register(NoAttack)


@hookimpl
def register_datasets(register):
    for cls in (data.Digits, data.FashionMNIST, data.Cifar10, data.ImageFolder, data.Npz):
        register(cls)


@hookimpl
def register_models(register):
    for cls in (models.FmnistCNN, models.CifarCNN, models.MLP):
        register(cls)


@hookimpl
def register_partitions(register):
    for cls in (data.IID, data.Shards, data.DirichletPartition):
        register(cls)
