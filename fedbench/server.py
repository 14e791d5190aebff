"""The server stage of a defense stack: pre-aggregators in the order written, then the aggregator.

This is the one place that runs a stack's server side, for the engine and for checks before a run
(:meth:`Server.check`), so that "what the server does with a round's updates" has a single
definition. A :class:`Server` is built for one cell; its stages keep their state for that cell only.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

from fedbench.components import Aggregator, PreAggregator, ServerContext
from fedbench.errors import FedbenchError
from fedbench.plugins import Registry, registry

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from fedbench.spec import DefenseStack


class Server:
    """Pre-aggregators, then one aggregator: ``server(updates [n, P], weights [n], ctx) -> [P]``."""

    def __init__(self, preaggregators: Sequence[PreAggregator], aggregator: Aggregator) -> None:
        self.preaggregators = tuple(preaggregators)
        self.aggregator = aggregator

    @classmethod
    def build(cls, stack: "DefenseStack", reg: Registry | None = None) -> "Server":
        """Fresh stage objects for one cell."""
        reg = reg or registry()
        return cls([spec.build(reg) for spec in stack.preaggregators], stack.aggregator.build(reg))

    @property
    def stages(self) -> tuple:
        return (*self.preaggregators, self.aggregator)

    def check(self, n: int, f: int) -> None:
        """Every stage's own check, with the row count each stage will really see and its ``f``: the
        stage's own ``f`` parameter when it has one that is set, else the scenario's."""
        for stage in self.stages:
            own = getattr(stage, "f", None)
            stage.check(n, f if own is None else own)
            if isinstance(stage, PreAggregator):
                n = stage.output_count(n)

    def root_samples(self) -> int:
        """Size of the trusted root data set the server holds out (the largest any stage asks for)."""
        return max((stage.root_samples() for stage in self.stages), default=0)

    def __call__(self, updates: "torch.Tensor", weights: "torch.Tensor", ctx: ServerContext) -> "torch.Tensor":
        """Run the stages; a stage that returns the wrong shape is an error naming it (a ``[P]``
        aggregate is added to the global model, where a wrong shape would broadcast silently)."""
        num_params = updates.shape[1]
        for stage in self.preaggregators:
            rows = stage.output_count(len(updates))
            updates, weights = stage.preaggregate(updates, weights, ctx)
            if tuple(updates.shape) != (rows, num_params) or tuple(weights.shape) != (rows,):
                raise FedbenchError(
                    f"pre-aggregator '{stage.name}' returned updates {tuple(updates.shape)} and weights "
                    f"{tuple(weights.shape)}; expected {(rows, num_params)} and {(rows,)} (its output_count)"
                )
            if not stage.keeps_clients and ctx.client_ids is not None:
                ctx = dataclasses.replace(ctx, client_ids=None)
        out = self.aggregator.aggregate(updates, weights, ctx)
        if tuple(out.shape) != (num_params,):
            raise FedbenchError(f"aggregator '{self.aggregator.name}' returned shape {tuple(out.shape)}; expected {(num_params,)}")
        return out
