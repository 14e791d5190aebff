"""Test plugins whose code raises inside a round, for tests/test_plugin_faults.py. A module of their
own (not a test file), so that worker processes can import them too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import fedbench


@dataclass(kw_only=True)
class BrokenAttack(fedbench.Attack):
    """Test attack: raises ValueError in its malicious_updates."""

    name: ClassVar[str] = "test-broken"

    def malicious_updates(self, rnd):
        raise ValueError(f"the broken attack gives up in round {rnd.round}")


@dataclass(kw_only=True)
class WrongShape(fedbench.Attack):
    """Test attack: returns one value too many per client (the engine's own check raises)."""

    name: ClassVar[str] = "test-wrong-shape"

    def malicious_updates(self, rnd):
        honest = rnd.train(rnd.client_data)
        return torch.cat([honest, honest[:, :1]], dim=1)


@dataclass(kw_only=True)
class BrokenAggregator(fedbench.Aggregator):
    """Test aggregator: hands torch mismatched shapes, so torch's own Python code raises."""

    name: ClassVar[str] = "test-broken-mean"

    def aggregate(self, updates, weights, ctx):
        return _weighted(updates, weights[:-1])


def _weighted(updates, weights):
    """A helper of the plugin's, below its component: the plugin is still the one to blame."""
    return torch.functional.einsum("c,cp->p", weights.to(updates.dtype), updates)


@fedbench.hookimpl
def register_attacks(register):
    register(BrokenAttack)
    register(WrongShape)


@fedbench.hookimpl
def register_aggregators(register):
    register(BrokenAggregator)
