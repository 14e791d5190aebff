"""fedbench: a plugin-based benchmark of attacks and defenses in federated learning.

The public API is small: build a cell with :func:`make_cell`, run it with :func:`run_cell`, and
write plugins against the component classes and :data:`hookimpl`. Importing fedbench stays cheap:
torch is imported only when a run or a component needs it.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import Any

from fedbench.components import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Aggregator,
    Attack,
    AttackEnv,
    ClientDefense,
    Dataset,
    DatasetTensors,
    MaliciousRound,
    Model,
    Partition,
    PreAggregator,
    Range,
    ServerContext,
    StepState,
    param,
)
from fedbench.errors import DataError, FedbenchError, SpecError, UnknownComponentError
from fedbench.hookspecs import hookimpl
from fedbench.plugins import register_plugin, registry, unregister_plugin
from fedbench.spec import CellSpec, ComponentSpec, DefenseStack, Scenario, make_cell, parse_component, parse_defense

try:
    __version__ = _metadata.version("fedbench-suite")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"


def run_cell(cell: CellSpec, **kwargs: Any):
    """Run one cell; see :func:`fedbench.engine.run_cell`."""
    from fedbench.engine import run_cell as _run

    return _run(cell, **kwargs)


def load_results(store: str = "fedbench-runs.db"):
    """``(leaderboard, per-round metrics)`` DataFrames of a result store; see :mod:`fedbench.leaderboard`."""
    from fedbench.leaderboard import load_results as _load

    return _load(store)


def __getattr__(name: str) -> Any:
    """Lazy exports that need torch: ``fedbench.cross_entropy`` (the benign training objective, for
    attacks that wrap it)."""
    if name == "cross_entropy":
        from fedbench.training import cross_entropy

        return cross_entropy
    raise AttributeError(f"module 'fedbench' has no attribute {name!r}")


__all__ = [
    "AT_LEAST_ONE", "NON_NEGATIVE", "POSITIVE", "UNIT", "cross_entropy",
    "Aggregator", "Attack", "AttackEnv", "CellSpec", "ClientDefense", "ComponentSpec", "DataError", "Dataset",
    "DatasetTensors", "DefenseStack", "FedbenchError", "MaliciousRound", "Model", "Partition", "PreAggregator", "Range",
    "Scenario", "ServerContext", "SpecError", "StepState", "UnknownComponentError", "hookimpl", "load_results", "make_cell", "param",
    "parse_component", "parse_defense", "register_plugin", "registry", "run_cell", "unregister_plugin",
    "__version__",
]
