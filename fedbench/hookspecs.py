"""The contract between fedbench and its plugins: every hook, specified once.

A plugin is any module or object with functions marked ``@fedbench.hookimpl`` whose names match the
specifications below. Built-in components are plugins too, loaded through the ``fedbench``
entry-point group exactly like a third-party package's.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import pluggy

hookspec = pluggy.HookspecMarker("fedbench")
hookimpl = pluggy.HookimplMarker("fedbench")


@hookspec
def register_attacks(register: Callable[[type], None]) -> None:
    """Register attack classes: call ``register(cls)`` for each subclass of
    :class:`fedbench.components.Attack`. Names must be unique across all plugins."""


@hookspec
def register_defenses(register: Callable[[type], None]) -> None:
    """Register client-defense classes (subclasses of :class:`fedbench.components.ClientDefense`),
    which run inside benign clients' local training."""


@hookspec
def register_preaggregators(register: Callable[[type], None]) -> None:
    """Register pre-aggregators (subclasses of :class:`fedbench.components.PreAggregator`): server
    stages that map the ``[n, P]`` stack of updates (and their weights) to a new stack before the
    aggregator, e.g. clipping, nearest-neighbour mixing, bucketing. A defense stack may hold any
    number; they run in the order written (``nnm+bucketing:s=2+krum``)."""


@hookspec
def register_aggregators(register: Callable[[type], None]) -> None:
    """Register server aggregation rules (subclasses of :class:`fedbench.components.Aggregator`):
    ``aggregate(updates [n, P], weights [n], ctx)`` returns the update ``[P]`` the server adds to the
    global model; ``ctx`` (:class:`fedbench.components.ServerContext`) holds what a real server knows
    (client ids, round, global parameters, the scenario's f, a random stream, root-data training).
    A defense stack holds at most one; ``fedavg`` is implied when it names none. One aggregator object
    serves exactly one cell, so state across rounds lives on it.

    Client defenses, pre-aggregators and aggregators share one namespace: a name registered under two
    of these kinds (or twice) is an error naming both plugins."""


@hookspec
def register_datasets(register: Callable[[type], None]) -> None:
    """Register datasets (subclasses of :class:`fedbench.components.Dataset`)."""


@hookspec
def register_models(register: Callable[[type], None]) -> None:
    """Register model architectures (subclasses of :class:`fedbench.components.Model`)."""


@hookspec
def register_partitions(register: Callable[[type], None]) -> None:
    """Register ways to split training data among clients (subclasses of
    :class:`fedbench.components.Partition`)."""


@hookspec
def round_finished(cell: Any, round: int, metrics: Mapping[str, Any]) -> None:
    """Observe a finished round: ``cell`` is the :class:`fedbench.spec.CellSpec` being run, ``round``
    counts from 1, ``metrics`` maps names (``accuracy``, ``loss``, ``adversarial``, the attack's own
    metrics) to plain Python values. Called once per round, in the process that runs the cell, for
    logging to TensorBoard, W&B, CSV and the like. Return values are ignored; do not mutate."""
